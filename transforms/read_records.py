"""Raw records of JSONL and Parquet files (BARC tasks or text): lines by byte offset, rows by row group, and
their conversion to ``ArcTask`` or ``TextSample`` dicts; locators as transforms/read.py describes. Plain
functions, no Beam transforms.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from apache_beam.io.filesystem import CompressedFile
from apache_beam.io.filesystems import FileSystems

from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.read_arc import DEFAULT_MAX_TRAIN_EXAMPLES, barc_row_to_task
from transforms.read_json import (
    MAX_RECORD_BYTES,
    RecordError,
    decode_json_line,
    describe_error,
    failure_reason,
    read_failure,
)

BYTE, ROW = "byte", "row"


def text_row_to_sample(row: Any, *, dataset: str, sample_id: str, source: str, text_field: str = "text") -> dict:
    """A ``TextSample`` from a row with a text column."""
    if not isinstance(row, dict):
        raise RecordError(f"record is {type(row).__name__}, expected a JSON object with {text_field!r}")
    if text_field not in row:
        raise RecordError(f"record has no {text_field!r} field (keys: {sorted(row)[:10]})")
    return {"sample_id": sample_id, "dataset": dataset, "task_id": sample_id, "test_index": 0,
            "augmentation": "{}", "source": source, "text": row[text_field]}


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
    failure = failure_reason(payload)
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
                yield offset, read_failure(f"the file cannot be read from this offset on: {describe_error(error)}")
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
                    f"{describe_error(error)}")
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
