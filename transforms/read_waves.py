"""The input cut into *units* (pieces read whole) and *waves* (consecutive units of about ``wave_bytes``), for
the local runner's waves (pipeline/waves.py), and :class:`ReadUnits`, which reads one wave's units.

Units follow the input order of transforms/read.py (files sorted by path, then bytes or rows in file order):

* an uncompressed JSONL file: byte ranges of at most ``wave_bytes``; a range owns the lines that *start* in it
  (:class:`transforms.read.JsonlLinesSource`), so ids are byte offsets exactly as the whole-file reader gives;
* a compressed JSONL file: the whole file (it cannot be entered mid-stream);
* a Parquet file, local, ``gs://`` or on the hub: each row group (its uncompressed size from the footer);
* an ARC-AGI challenges file: the whole file (its tasks are listed by sorted id, a few MB at most);
* a folder of task files: each file.

The plan is a pure function of the input's files and sizes, so a resumed run cuts the same waves. Footers are
read lazily, when the plan reaches a file: a hub dataset is not opened beyond the waves a budget needs.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.range_trackers import OffsetRangeTracker

from transforms import datasets, read_hub_text
from transforms.datasets import DatasetSource
from transforms.dead_letter import DEAD_LETTER_TAG
from transforms.read import (
    DEFAULT_MAX_TRAIN_EXAMPLES, JsonlLinesSource, ReadResult, _LoadArcChallenges, _LoadArcTaskFile, _ParseRawRecords,
)
from transforms.read_json import MAX_RECORD_BYTES, read_failure
from transforms.read_json import describe_error as _describe_error
from transforms.read_records import BYTE, ROW, iter_parquet_rows

JSONL_RANGE, ROW_GROUP, HUB_ROW_GROUP, TASK_FILE, CHALLENGES = (
    "jsonl_range", "row_group", "hub_row_group", "task_file", "challenges")
WHOLE = OffsetRangeTracker.OFFSET_INFINITY


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """One piece of the input read whole: ``[start, stop)`` bytes of a JSONL file, or row group ``start``."""

    kind: str
    path: str
    start: int = 0
    stop: int = 0
    size: int = 0  # input bytes it stands for: what waves are cut by
    error: str = ""  # why the file's footer could not be read when planning: the unit becomes a dead letter


def _file_size(path: str) -> int:
    return int(FileSystems.match([path])[0].metadata_list[0].size_in_bytes)


def _compressed(path: str) -> bool:
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def _jsonl_units(path: str, chunk: int) -> Iterator[ReadUnit]:
    size = _file_size(path)
    if _compressed(path):
        yield ReadUnit(JSONL_RANGE, path, 0, WHOLE, size)
        return
    for start in range(0, max(size, 1), chunk):
        yield ReadUnit(JSONL_RANGE, path, start, min(start + chunk, size), min(chunk, size - start))


def _parquet_units(path: str, kind: str) -> Iterator[ReadUnit]:
    import pyarrow.parquet as pq

    try:
        if kind == HUB_ROW_GROUP:
            sizes = read_hub_text.row_group_sizes(path)
        else:
            with FileSystems.open(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
                sizes = [metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)]
    except Exception as error:  # the reader turns it into one dead letter naming the file
        yield ReadUnit(kind, path, -1, -1, 0, error=_describe_error(error))
        return
    for group, size in enumerate(sizes):
        yield ReadUnit(kind, path, group, group + 1, int(size))


def plan_units(source: DatasetSource, chunk_bytes: int) -> Iterator[ReadUnit]:
    """The input's units in input order (see the module docstring)."""
    if source.kind == datasets.ARC_CHALLENGES:
        yield ReadUnit(CHALLENGES, source.files[0], 0, 0, _file_size(source.files[0]))
        return
    for path in source.files:
        if source.kind == datasets.ARC_TASK_FILES:
            yield ReadUnit(TASK_FILE, path, 0, 0, _file_size(path))
        elif source.file_format == "jsonl":
            yield from _jsonl_units(path, chunk_bytes)
        elif source.file_format == read_hub_text.HUB_PARQUET:
            yield from _parquet_units(path, HUB_ROW_GROUP)
        else:
            yield from _parquet_units(path, ROW_GROUP)


FIRST_WAVE_FRACTION = 8


def unit_bytes(wave_bytes: int) -> int:
    """The largest JSONL range: an eighth of a wave, so the first wave can be that small."""
    return max(1, wave_bytes // FIRST_WAVE_FRACTION) if wave_bytes else 1 << 62


def plan_waves(units: Iterable[ReadUnit], wave_bytes: int) -> Iterator[list[ReadUnit]]:
    """Consecutive units, cut as soon as a wave reaches its size: ``wave_bytes / 8`` for the first wave (so
    the device starts, and the first shard is committed, early), ``wave_bytes`` after it; 0 puts every unit in
    one wave."""
    wave, size, target = [], 0, unit_bytes(wave_bytes)
    for unit in units:
        wave.append(unit)
        size += unit.size
        if wave_bytes and size >= target:
            yield wave
            wave, size, target = [], 0, wave_bytes
    if wave:
        yield wave


def _read_jsonl_range(unit: ReadUnit, max_bytes: int):
    source = JsonlLinesSource(unit.path, validate=False, max_record_bytes=max_bytes)
    for path, offset, line in source.read_records(unit.path, OffsetRangeTracker(unit.start, unit.stop)):
        yield path, BYTE, offset, line


class _ReadUnitRecords(beam.DoFn):
    """A JSONL range or Parquet row group -> raw ``(path, locator_kind, index, payload)`` records; a unit that
    cannot be read is one failure payload (a dead letter naming it), and reading goes on."""

    def __init__(self, columns: list[str], max_record_bytes: int = MAX_RECORD_BYTES):
        self._columns, self._max_bytes = list(columns), max_record_bytes

    def process(self, unit: ReadUnit):
        if unit.start < 0:
            yield unit.path, ROW, -1, read_failure(f"the file cannot be read as Parquet: {unit.error}")
            return
        try:
            if unit.kind == JSONL_RANGE:
                yield from _read_jsonl_range(unit, self._max_bytes)
            elif unit.kind == HUB_ROW_GROUP:
                for index, row in read_hub_text.iter_hub_rows(unit.path, self._columns, unit.start, self._max_bytes):
                    yield unit.path, ROW, index, row
            else:
                for index, row in iter_parquet_rows(unit.path, self._columns, [unit.start], self._max_bytes):
                    yield unit.path, ROW, index, row
        except Exception as error:  # one unreadable unit is one dead letter
            where = "bytes" if unit.kind == JSONL_RANGE else "row group"
            yield unit.path, (BYTE if unit.kind == JSONL_RANGE else ROW), -1, read_failure(
                f"{where} {unit.start} cannot be read: {_describe_error(error)}")


class ReadUnits(beam.PTransform):
    """One wave's units -> a :class:`transforms.read.ReadResult` ``(main, dead_letter)`` of unvalidated
    records, with the ids, sources and counters of :class:`transforms.read.ReadRawRecords`."""

    def __init__(self, source: DatasetSource, units: list[ReadUnit],
                 max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES, max_record_bytes: int = MAX_RECORD_BYTES,
                 labels: Optional[dict] = None):
        super().__init__()
        self._source, self._units, self._max_train = source, list(units), max_train_examples
        self._max_bytes = max_record_bytes
        self._labels = labels

    def expand(self, pbegin):
        source = self._source
        units = pbegin | "Units" >> beam.Create(self._units)
        if source.kind == datasets.ARC_CHALLENGES:
            loaded = units | "LoadChallenges" >> beam.ParDo(
                _LoadArcChallenges(source, None, self._max_bytes)).with_outputs(DEAD_LETTER_TAG, main="main")
            return ReadResult(loaded.main | "Spread" >> beam.Reshuffle(), loaded[DEAD_LETTER_TAG])
        if source.kind == datasets.ARC_TASK_FILES:
            loaded = (units | "Paths" >> beam.Map(lambda unit: unit.path) | "Spread" >> beam.Reshuffle()
                      | "LoadTaskFile" >> beam.ParDo(_LoadArcTaskFile(source.dataset, self._max_bytes)).with_outputs(
                          DEAD_LETTER_TAG, main="main"))
            return ReadResult(loaded.main, loaded[DEAD_LETTER_TAG])
        columns = [source.text_field] if source.kind == datasets.TEXT else ["examples"]
        labels = self._labels or datasets.file_labels(source.files)
        parsed = (units | "Spread" >> beam.Reshuffle()
                  | "ReadUnit" >> beam.ParDo(_ReadUnitRecords(columns, self._max_bytes))
                  | "Parse" >> beam.ParDo(_ParseRawRecords(source, labels, self._max_train, self._max_bytes))
                  .with_outputs(DEAD_LETTER_TAG, main="main"))
        return ReadResult(parsed.main, parsed[DEAD_LETTER_TAG])
