"""Byte-range reading of JSONL: every line exactly once, whatever the splits, with stable byte-offset ids."""
from __future__ import annotations

import gzip
import json
import random

import apache_beam as beam
import pytest
from apache_beam.io import source_test_utils
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.read import JsonlLinesSource, ReadTasks
from transforms.read_records import iter_jsonl_lines


def random_row(rng: random.Random) -> dict:
    def grid():
        height, width = rng.randint(1, 12), rng.randint(1, 12)
        return [[rng.randint(0, 9) for _ in range(width)] for _ in range(height)]

    return {"examples": [[grid(), grid()] for _ in range(rng.randint(2, 6))], "source": "x" * rng.randint(0, 300),
            "seeds": ["s"]}


def write_lines(path, rows, line_endings):
    """Writes rows as JSONL with the given line endings; returns the expected (offset, stripped line) list."""
    expected, data = [], bytearray()
    for row, ending in zip(rows, line_endings):
        line = json.dumps(row).encode()
        expected.append((len(data), line))
        data += line + ending
    path.write_bytes(bytes(data))
    return expected


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """About 3 MB of BARC-like rows of very different lengths, some CRLF, the last without a newline."""
    rng = random.Random(7)
    rows = [random_row(rng) for _ in range(3000)]
    rows[10] = rows[11]  # duplicate rows still get distinct ids
    endings = [b"\r\n" if i % 97 == 5 else b"\n" for i in range(len(rows))]
    endings[-1] = b""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    expected = write_lines(path, rows, endings)
    assert path.stat().st_size > 2_000_000
    return path, expected


def read_all(source, start=None, stop=None):
    return [(offset, line.rstrip(b"\r\n")) for _, offset, line in
            source_test_utils.read_from_source(source, start, stop)]


def test_splits_yield_every_line_exactly_once(big_jsonl):
    path, expected = big_jsonl
    source = JsonlLinesSource(str(path))
    assert read_all(source) == expected
    for bundle_size in (64 * 1024, 100_003, 1_000_000):
        splits = list(source.split(desired_bundle_size=bundle_size))
        assert len(splits) >= path.stat().st_size // bundle_size
        records = []
        for split in splits:
            records += read_all(split.source, split.start_position, split.stop_position)
        assert records == expected  # in order, none twice, none missing
        source_test_utils.assert_sources_equal_reference_source(
            (source, None, None), [(s.source, s.start_position, s.stop_position) for s in splits])


def test_dynamic_splits_at_every_fraction(tmp_path):
    rng = random.Random(3)
    path = tmp_path / "small.jsonl"
    write_lines(path, [{"n": i, "pad": "y" * rng.randint(0, 40)} for i in range(25)], [b"\n"] * 25)
    source = JsonlLinesSource(str(path))
    split = list(source.split(desired_bundle_size=1 << 20))[0]
    source_test_utils.assert_split_at_fraction_exhaustive(split.source, split.start_position, split.stop_position)


def test_compressed_jsonl_is_read_whole_with_uncompressed_offsets(tmp_path):
    rows = [{"n": i} for i in range(50)]
    plain = tmp_path / "rows.jsonl"
    expected = write_lines(plain, rows, [b"\n"] * 50)
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_all(JsonlLinesSource(str(packed))) == expected
    assert [(o, l.rstrip(b"\n")) for o, l in iter_jsonl_lines(str(packed))] == expected


def test_pipeline_with_small_bundles_reads_each_record_once(big_jsonl):
    path, expected = big_jsonl
    expected_ids = [f"big:{offset}" for offset, _ in expected]
    assert len(set(expected_ids)) == len(expected)

    pipeline = BeamTestPipeline(runner=FnApiRunner())
    result = pipeline | ReadTasks(str(path), desired_bundle_size=128 * 1024)
    assert_that(result.main | beam.Map(lambda task: task["record_id"]), equal_to(expected_ids), label="ids")
    assert_that(result.dead_letter, equal_to([]), label="no dead letters")
    run = pipeline.run()
    run.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in run.metrics().query()["counters"]}
    assert counters["records_read"] == len(expected) == counters["records_valid"]
