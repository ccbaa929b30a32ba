"""gs:// inputs read through the same code as local ones, against a local GCS emulator (gcp-storage-emulator)."""
from __future__ import annotations

import io
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.util import assert_that, equal_to

from transforms import datasets
from transforms.datasets import resolve_dataset
from tests.test_read import run_pipeline as run
from transforms.read import ReadTasks

G = [[1, 2], [3, 4]]


@pytest.fixture(scope="module")
def gcs(gcs_emulator):
    return f"{gcs_emulator.root}/read"


def put(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def test_gcs_jsonl_parquet_and_task_folder(gcs):
    rows = [{"examples": [[[[i % 10]], G], [G, [[i % 10]]]], "pad": "z" * (i * 37 % 500)} for i in range(200)]
    lines = [json.dumps(row).encode() + b"\n" for row in rows]
    lines[50] = b"{broken\n"
    put(f"{gcs}/barc/part-0.jsonl", b"".join(lines[:120]))
    put(f"{gcs}/barc/part-1.jsonl", b"".join(lines[120:]))
    offsets = [sum(map(len, lines[:i])) for i in range(120)] + [sum(map(len, lines[120:i])) for i in range(120, 200)]
    expected_ids = [f"part-{0 if i < 120 else 1}:{offsets[i]}" for i in range(200) if i != 50]

    buffer = io.BytesIO()
    pq.write_table(pa.table({"examples": [row["examples"] for row in rows[:5]]}), buffer, row_group_size=2)
    put(f"{gcs}/pq/rows.parquet", buffer.getvalue())
    for name in ("t1", "t2"):
        put(f"{gcs}/tasks/{name}.json", json.dumps({"train": [{"input": G, "output": G}],
                                                    "test": [{"input": G}]}).encode())

    source = resolve_dataset(f"{gcs}/barc/*.jsonl")
    assert source.files == (f"{gcs}/barc/part-0.jsonl", f"{gcs}/barc/part-1.jsonl")
    assert source.dataset == f"{gcs}/barc/*.jsonl"
    folder = resolve_dataset(f"{gcs}/tasks")
    assert folder.kind == datasets.ARC_TASK_FILES and len(folder.files) == 2

    def build(pipeline):
        barc = pipeline | "Barc" >> ReadTasks(source, desired_bundle_size=2000)
        assert_that(barc.main | beam.Map(lambda t: t["record_id"]), equal_to(expected_ids), label="barc")
        assert_that(barc.dead_letter | beam.Map(lambda d: (d["source"], d["record"])),
                    equal_to([(f"{gcs}/barc/part-0.jsonl:{offsets[50]}", "{broken")]), label="dead")
        parquet = pipeline | "Parquet" >> ReadTasks(f"{gcs}/pq/*.parquet")
        assert_that(parquet.main | beam.Map(lambda t: t["source"]),
                    equal_to([f"{gcs}/pq/rows.parquet#row{i}" for i in range(5)]), label="parquet")
        tasks = pipeline | "Tasks" >> ReadTasks(folder)
        assert_that(tasks.main | beam.Map(lambda t: t["task_id"]), equal_to(["t1", "t2"]), label="tasks")

    counters = run(build)
    assert counters["records_read"] == 200 + 5 + 2
    assert counters["records_rejected"] == 1


def test_gcs_missing_object_names_the_path(gcs):
    with pytest.raises(FileNotFoundError, match=f"no file matches the pattern '{gcs}/nothing/\\*.jsonl'"):
        resolve_dataset(f"{gcs}/nothing/*.jsonl")
    with pytest.raises(FileNotFoundError, match=f"file not found: '{gcs}/nothing/x.parquet'"):
        resolve_dataset(f"{gcs}/nothing/x.parquet")
