"""python -m pipeline.inspect on an output the real pipeline wrote: finished, running (a live lease), stopped before
its manifest, empty; the text report and --json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.inspect import inspect_output
from tests.pipeline_output import HOOKS, LAYER, pipeline_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_checkpoint):
    return pipeline_output(tmp_path_factory, tiny_checkpoint)


def run_inspect(*args, process=False):
    """`python -m pipeline.inspect ARGS`: in this process unless `process` (one CLI run keeps that path tested)."""
    if process:
        return subprocess.run([sys.executable, "-m", "pipeline.inspect", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    import contextlib
    import io

    from pipeline.inspect import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["pipeline.inspect", *args], code, stdout.getvalue(), stderr.getvalue())


def test_a_finished_output_at_a_glance(output):
    manifest = json.loads((output / "manifest.json").read_text())
    done = run_inspect(output, "--json", process=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "finished" and report["live_hosts"] == [] and report["problems"] == []
    assert report["d_model"] == 64 and report["storage_dtype"] == "bfloat16" and report["format_version"] == 2
    counts = manifest["counts"]
    assert report["shards"] == counts["shards"] and report["samples"] == counts["samples"] == 4
    assert {(a["hook"], a["layer"]): a["tokens"] for a in report["activations"]} == {
        (hook, LAYER): counts["tokens_per_hook_layer"][hook][str(LAYER)] for hook in HOOKS}
    assert sum(a["bytes"] for a in report["activations"]) == report["bytes"]["activations"]
    assert [d["samples"] for d in report["datasets"]] == [4] and report["tokens"] == counts["tokens"]
    assert sum(report["parts"].values()) == counts["tokens"] and "test_input" in report["parts"]
    assert report["dead_letters"]["by_stage"] == {"validate": 1} == counts["rejected_by_stage"]
    assert report["hosts"]["h000"]["run"]["state"] == manifest["state"]
    assert report["hosts"]["h000"]["tokens"] == counts["tokens"] and report["uncommitted_files"] == []

    text = run_inspect(output).stdout
    assert "state: finished" in text and "resid_post" in text and "validate 1" in text and "test_input" in text


def test_running_stopped_and_empty_outputs(output, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / "manifest.json").unlink()
    stray = copy / "activations" / "hook=resid_post" / f"layer={LAYER}" / ".tmp-0123-h001-00ff.parquet"
    stray.write_bytes(b"partial")
    report = inspect_output(str(copy), parts=False)
    assert report["state"] == "incomplete" and "no manifest.json" in report["state_reason"]
    assert report["uncommitted_files"] == [f"activations/hook=resid_post/layer={LAYER}/{stray.name}"]
    assert report["parts"] is None

    leases = copy / "_leases"
    leases.mkdir(exist_ok=True)
    now = time.time()
    (leases / "h000.json").write_text(json.dumps({"hostname": "vm-0", "pid": 4242, "renewed_unix": now - 5,
                                                  "timeout_s": 120}))
    (leases / "h001.json").write_text(json.dumps({"hostname": "vm-1", "pid": 7, "renewed_unix": now - 600,
                                                  "timeout_s": 120}))
    report = inspect_output(str(copy), parts=False, now=now)
    assert report["state"] == "running" and report["live_hosts"] == ["h000"]
    assert report["hosts"]["h000"]["lease"]["live"] and not report["hosts"]["h001"]["lease"]["live"]
    assert "live (vm-0 pid 4242" in run_inspect(copy, "--no_parts").stdout

    (leases / "h001.json").write_text("{broken")
    report = inspect_output(str(copy), parts=False, now=now)
    assert any("h001.json is not valid JSON" in p for p in report["problems"])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert inspect_output(str(empty))["state"] == "empty"
    done = run_inspect(tmp_path / "nowhere")
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_a_gcs_output_reads_like_the_local_one(output, gcs_emulator):
    from tests.pipeline_output import upload

    remote = inspect_output(upload(output, gcs_emulator, "inspect/out"))
    local = inspect_output(str(output))
    assert remote["output"].startswith("gs://") and remote["state"] == "finished"
    for key in ("activations", "samples", "tokens", "datasets", "parts", "bytes", "dead_letters", "hosts",
                "uncommitted_files", "problems"):
        assert remote[key] == local[key], key


def _add_predictions(output) -> list[dict]:
    """Predictions committed with every shard of `output`, written with the writer's own function and listed in
    the shard's commit marker as the writer lists them; returns the rows."""
    import pyarrow.parquet as pq

    from transforms.output_format import KEY_PREDICTIONS
    from transforms.predictions import predictions_file

    every = []
    for marker in sorted((output / "samples").glob("*.parquet")):
        table = pq.read_table(marker)
        shard = marker.stem
        rows = []
        for i, sample in enumerate(table.select(["sample_id", "dataset", "task_id", "test_index"]).to_pylist()):
            truth = None if i % 2 else [[1]]
            rows.append({**sample, "augmentation": "{}", "text": "1\n```", "token_ids": [16, 198], "stop_reason":
                         "fence", "grid": [[1]], "parse_error": None, "grid_original": [[1]], "ground_truth": truth,
                         "correct": None if truth is None else i % 4 == 0, "logprob_sum": -1.0})
        data, entry = predictions_file(shard, rows)
        (output / "predictions").mkdir(exist_ok=True)
        (output / entry["path"]).write_bytes(data)
        metadata = dict(table.schema.metadata)
        metadata[KEY_PREDICTIONS.encode()] = json.dumps(entry, sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(metadata), marker)
        every += rows
    return every


def test_predictions_of_a_generate_output_are_counted(output, tmp_path):
    assert inspect_output(str(output), parts=False)["predictions"] is None
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    rows = _add_predictions(copy)
    stray = copy / "predictions" / "h009-0000.parquet"
    stray.write_bytes(b"not committed")
    report = inspect_output(str(copy), parts=False)
    predictions = report["predictions"]
    assert predictions["files"] == report["shards"] and predictions["rows"] == len(rows) == report["samples"]
    assert predictions["scored"] == sum(row["correct"] is not None for row in rows) > 0
    assert predictions["correct"] == sum(row["correct"] is True for row in rows) > 0
    assert predictions["uncommitted_files"] == ["predictions/h009-0000.parquet"] and report["problems"] == []
    assert report["bytes"]["predictions"] == predictions["bytes"] > 0
    text = run_inspect(copy, "--no_parts").stdout
    assert (f"predictions: {len(rows)} in {report['shards']} files, {predictions['scored']} scored, "
            f"{predictions['correct']} correct") in text
