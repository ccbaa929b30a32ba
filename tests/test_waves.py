"""The local runner in waves (pipeline/waves.py, transforms/read_waves.py): waves cover the input exactly once,
give the activations of a single wave, resume across waves, keep the counts adding up, and --max_tokens selects
an input-order prefix that a larger budget extends. Pipeline runs are in this process (one model for all)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.dataset as ds
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.waves import Budget, input_order_key
from transforms.datasets import resolve_dataset
from transforms.read import ReadTasks
from transforms.read_waves import ReadUnits, plan_units, plan_waves, unit_bytes
from transforms.write import activations_to_numpy

WORDS = "grid cell row column pattern shape square line border corner fill copy move rotate".split()
MAX_SEQ_LEN = 256
# Each wave costs two Beam pipeline runs: a few waves of this corpus (a small first one, then full ones) show what
# more would, and the token budgets below still end in different waves.
WAVE_BYTES = 12000


def write_corpus(path: Path, docs: int = 36, seed: int = 0, bad_line: bool = True) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 420)))})
             for _ in range(docs)]
    if bad_line:
        lines.insert(docs // 2, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def record_ids(read_result, label):
    return read_result.main | f"Ids{label}" >> beam.Map(lambda record: record["sample_id"])


def test_waves_read_every_line_once_with_the_whole_file_ids(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    source = resolve_dataset(f"text:{corpus}")
    waves = list(plan_waves(plan_units(source, unit_bytes(6000)), 6000))
    assert len(waves) >= 4 and sum(u.size for u in waves[0]) < 6000  # a small first wave, then full ones
    pipeline = BeamTestPipeline(runner=FnApiRunner())
    whole = record_ids(pipeline | "Whole" >> ReadTasks(source, validate=False), "Whole")
    parts = [record_ids(pipeline | f"Wave{i}" >> ReadUnits(source, units), i) for i, units in enumerate(waves)]
    together = parts | beam.Flatten() | "Sorted" >> beam.combiners.ToList() | beam.Map(sorted)
    expected = whole | "WholeSorted" >> beam.combiners.ToList() | "SortWhole" >> beam.Map(sorted)
    assert_that(together | "Pair" >> beam.Map(lambda ids, want: ids == want and len(ids) == 36,
                                                want=beam.pvalue.AsSingleton(expected)), equal_to([True]))
    pipeline.run().wait_until_finish()


def test_a_compressed_file_is_one_unit_read_whole(tmp_path):
    import gzip

    corpus = write_corpus(tmp_path / "c.jsonl", docs=5, bad_line=False)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    source = resolve_dataset(f"text:{tmp_path}/c.jsonl.gz")
    units = list(plan_units(source, 10))
    assert len(units) == 1 and units[0].start == 0
    pipeline = BeamTestPipeline(runner=FnApiRunner())
    ids = record_ids(pipeline | ReadUnits(source, units), "Gz")
    offsets, position = [], 0
    for line in corpus.read_bytes().splitlines(keepends=True):
        offsets.append(f"c:{position}")
        position += len(line)
    assert_that(ids, equal_to(offsets))
    pipeline.run().wait_until_finish()


def test_parquet_waves_are_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)]}), tmp_path / "a.parquet", row_group_size=3)
    units = list(plan_units(resolve_dataset(f"text:{tmp_path}/a.parquet"), 1))
    assert [(u.kind, u.start) for u in units] == [("row_group", g) for g in range(4)]
    assert [len(w) for w in plan_waves(units, 1)] == [1, 1, 1, 1]


def test_budget_is_an_input_order_prefix_whatever_the_waves():
    labels = {"a": 0, "b": 1}
    samples = [{"sample_id": f"{f}:{offset}/c{c}", "token_ids": [0] * (1 + (offset + c) % 7)}
               for f in "ab" for offset in (0, 9, 100, 2000) for c in range(3)]
    order = sorted(samples, key=lambda s: input_order_key(s["sample_id"], labels))
    assert [s["sample_id"] for s in order[:4]] == ["a:0/c0", "a:0/c1", "a:0/c2", "a:9/c0"]
    for budget in (1, 10, 25, 60):
        chosen_whole = Budget(budget).select(list(samples), labels)
        cut = Budget(budget)
        chosen_waves = []
        for wave in (order[:5], order[5:6], order[6:]):  # waves are consecutive in input order
            if not cut.spent:
                random.Random(budget).shuffle(wave := list(wave))
                chosen_waves += cut.select(wave, labels)
        assert [s["sample_id"] for s in chosen_waves] == [s["sample_id"] for s in chosen_whole]
        assert sum(len(s["token_ids"]) for s in chosen_whole) <= budget
        assert chosen_whole == order[:len(chosen_whole)]


@pytest.mark.parametrize("args, message", [
    (["--runner=DataflowRunner", "--max_tokens=5"], "--max_tokens needs the local runner"),
    (["--max_samples=2", "--max_tokens=5"], "pass --max_tokens alone"),
])
def test_budgets_waves_cannot_serve_are_refused(args, message, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ExtractOptions, OptionError
    from pipeline.waves import check_wave_options

    options = PipelineOptions([f"--output={tmp_path}", *args])
    dataset = resolve_dataset(f"text:{write_corpus(tmp_path / 'c.jsonl', docs=2)}")
    with pytest.raises(OptionError, match=message):
        check_wave_options(options, options.view_as(ExtractOptions), dataset)


# ------------------------------------------------------------------------------------------ pipeline runs

def run(capsys, *args) -> dict:
    from pipeline.run import main

    capsys.readouterr()
    code = main(["--runner=DirectRunner", "--layers=1", "--hooks=resid_post", "--dtype=float32",
                 "--batch_size=2", f"--max_seq_len={MAX_SEQ_LEN}", "--progress_interval=0", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out[out.index("{"):])


def activations(output: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(output / "activations", format="parquet", partitioning="hive").to_table()
    ids, positions = table.column("sample_id").to_pylist(), table.column("position").to_pylist()
    values = activations_to_numpy(table)
    rows: dict[str, list] = {}
    for index, (sample, position) in enumerate(zip(ids, positions)):
        rows.setdefault(sample, []).append((position, index))
    return {sample: values[[i for _, i in sorted(pairs)]] for sample, pairs in rows.items()}


def committed_ids(output: Path) -> list[str]:
    return sorted(ds.dataset(output / "samples", format="parquet").to_table(columns=["sample_id"])
                  .column("sample_id").to_pylist())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("waves")
    corpus = write_corpus(work / "corpus.jsonl")
    return work, corpus, tiny_checkpoint


def test_waves_match_one_wave_and_counts_add_up(runs, capsys):
    work, corpus, model = runs
    common = [f"--model={model}", f"--dataset=text:{corpus}"]
    waves = run(capsys, *common, f"--output={work / 'waves'}", f"--wave_bytes={WAVE_BYTES}")
    whole = run(capsys, *common, f"--output={work / 'whole'}", "--wave_bytes=0")
    assert committed_ids(work / "waves") == committed_ids(work / "whole")
    assert len(set(committed_ids(work / "waves"))) == len(committed_ids(work / "waves")) == waves["samples_written"]
    mine, reference = activations(work / "waves"), activations(work / "whole")
    assert mine.keys() == reference.keys()
    for sample, values in reference.items():
        np.testing.assert_allclose(mine[sample], values, rtol=1e-5, atol=1e-5, err_msg=sample)
    for summary in (waves, whole):
        assert summary["records_read"] == 37 == summary["records_valid"] + summary["records_rejected"]
        assert summary["records_rejected"] == 1
    letters = [line for path in (work / "waves" / "dead_letter").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(letters) == 1 and "not json" in letters[0]
    assert waves["tokens"] == whole["tokens"]
    from pipeline.verify import main as verify

    assert verify([str(work / "waves")]) == 0


def test_resume_across_waves_writes_each_missing_sample_once(runs, capsys, tmp_path):
    work, corpus, model = runs
    if not (work / "waves" / "samples").is_dir():
        pytest.skip("needs test_waves_match_one_wave_and_counts_add_up's output")
    output = tmp_path / "resumed"
    shutil.copytree(work / "waves", output)
    markers = sorted((output / "samples").glob("*.parquet"))
    for marker in markers[::2]:  # every other shard of every wave loses its commit
        marker.unlink()
    summary = run(capsys, f"--model={model}", f"--dataset=text:{corpus}", f"--output={output}",
                  f"--wave_bytes={WAVE_BYTES}", "--resume")
    assert committed_ids(output) == committed_ids(work / "waves")  # every sample once
    assert summary["records_read"] == summary["records_valid"] + summary["records_rejected"]
    mine, reference = activations(output), activations(work / "waves")
    for sample, values in reference.items():
        np.testing.assert_allclose(mine[sample], values, rtol=1e-5, atol=1e-5, err_msg=sample)


def test_token_budget_is_a_prefix_and_a_larger_one_extends_it(runs, capsys, tmp_path):
    work, corpus, model = runs
    common = [f"--model={model}", f"--dataset=text:{corpus}", f"--output={tmp_path / 'budget'}",
              f"--wave_bytes={WAVE_BYTES}"]
    first = run(capsys, *common, "--max_tokens=3000")
    chosen = committed_ids(tmp_path / "budget")
    second = run(capsys, *common, "--max_tokens=7000", "--resume")
    extended = committed_ids(tmp_path / "budget")
    assert set(chosen) < set(extended) and len(extended) == len(set(extended))
    assert 3000 - MAX_SEQ_LEN < first["tokens"] <= 3000 and 7000 - MAX_SEQ_LEN < second["tokens"] <= 7000
    if (work / "whole" / "samples").is_dir():  # each budget took the input-order prefix of the whole input
        every = ds.dataset(work / "whole" / "samples", format="parquet").to_table(
            columns=["sample_id", "num_tokens"]).to_pylist()
        ordered = sorted(every, key=lambda s: input_order_key(s["sample_id"], {"corpus": 0}))
        spent = np.cumsum([s["num_tokens"] for s in ordered])
        for budget, ids in ((3000, chosen), (7000, extended)):
            assert sorted(s["sample_id"] for s, total in zip(ordered, spent) if total <= budget) == ids


def test_token_budget_on_arc_tasks(tiny_checkpoint, capsys, tmp_path):
    from tests.arc_fixtures import write_challenges

    dataset, tasks = write_challenges(tmp_path / "challenges.json", count=4, bad=True)
    common = [f"--model={tiny_checkpoint}", f"--dataset={dataset}", "--max_seq_len=2048"]
    whole = run(capsys, *common, f"--output={tmp_path / 'whole'}", "--max_tokens=1000000")
    every = ds.dataset(tmp_path / "whole" / "samples", format="parquet").to_table(
        columns=["sample_id", "num_tokens"]).to_pylist()
    ordered = sorted(every, key=lambda s: input_order_key(s["sample_id"], {}))
    budget = ordered[0]["num_tokens"] + ordered[1]["num_tokens"] + ordered[2]["num_tokens"] // 2
    cut = run(capsys, *common, f"--output={tmp_path / 'cut'}", f"--max_tokens={budget}")
    assert whole["records_read"] == len(tasks) == whole["records_valid"] + whole["records_rejected"]
    assert committed_ids(tmp_path / "cut") == sorted(s["sample_id"] for s in ordered[:2])
    assert cut["tokens"] == ordered[0]["num_tokens"] + ordered[1]["num_tokens"]


def test_spilled_samples_come_back_exactly_without_pickle():
    from pipeline.waves import decode_sample, encode_sample

    sample = {"sample_id": "t/t0/a0", "test_index": np.int64(2), "prompt": "héllo \n", "test_output": [[1, 2]],
              "token_ids": np.array([3, -1, 151643], np.int32),
              "annotations": {"part": np.array([0, 5, 8], np.int8), "row": np.array([-1, 0, 1], np.int16)}}
    line = encode_sample(sample)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and not line.startswith(b"\x80")
    back = decode_sample(line)
    assert back["test_index"] == 2 and back["prompt"] == sample["prompt"] and back["test_output"] == [[1, 2]]
    pairs = [(back["token_ids"], sample["token_ids"])] + [
        (back["annotations"][name], sample["annotations"][name]) for name in ("part", "row")]
    for got, want in pairs:
        assert got.dtype == want.dtype and np.array_equal(got, want) and got.flags.writeable
    with pytest.raises(TypeError, match="cannot store"):
        encode_sample({"bad": object()})


def _fake_spill_root(parent: Path, pid: int, owner: dict | None, tag: str = "abc123") -> Path:
    from pipeline.waves import SPILL_MARKER, SPILL_PREFIX

    root = parent / f"{SPILL_PREFIX}{pid}-{tag}"
    (root / "wave00000-x").mkdir(parents=True)
    (root / "wave00000-x" / "spill.jsonl").write_bytes(b"{}\n")
    if owner is not None:
        (root / SPILL_MARKER).write_text(json.dumps(owner))
    return root


def test_only_the_spill_folders_of_dead_runs_are_removed(tmp_path):
    import os
    import platform
    import subprocess
    import sys

    from pipeline.waves import SPILL_MARKER, make_spill_root, remove_stale_spill_roots

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    host = platform.node()
    stale = _fake_spill_root(tmp_path, dead, {"pid": dead, "host": host, "started": None})
    # This process's pid, but a start time it never had: a killed run whose pid was reused since.
    reused = _fake_spill_root(tmp_path, os.getpid(), {"pid": os.getpid(), "host": host, "started": "1"})
    live = Path(make_spill_root(str(tmp_path)))
    assert json.loads((live / SPILL_MARKER).read_text())["pid"] == os.getpid()
    kept = [_fake_spill_root(tmp_path, dead, None, "unmarked"),  # not this tool's, or its marker not yet written
            _fake_spill_root(tmp_path, dead, {"pid": dead, "host": host + "-other"}, "other-host"),
            _fake_spill_root(tmp_path, dead, {"pid": os.getpid(), "host": host}, "wrong-pid"),
            tmp_path / "arc-activations-waves-notes"]
    kept[-1].mkdir()

    removed = remove_stale_spill_roots(str(tmp_path))
    assert sorted(removed) == sorted([str(stale), str(reused)])
    assert sorted(tmp_path.iterdir()) == sorted(kept + [live])


def test_a_wave_run_that_fails_removes_its_spill_folder(tmp_path, monkeypatch):
    import tempfile

    import pipeline.waves as waves

    def fail(*args):
        raise RuntimeError("wave failed")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(waves, "WaveRun", fail)
    with pytest.raises(RuntimeError, match="wave failed"):
        waves.run_in_waves(None, None, (), None)
    assert list(tmp_path.iterdir()) == []
