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

    done = run_inspect(tmp_path / "nowhere")
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_a_folder_that_is_not_an_output_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, os.path.join(ROOT, "docs")):
        done = run_inspect(folder)
        assert done.returncode == 2 and done.stdout == "", done
        assert f"{folder} is not an output of pipeline.run" in done.stderr and "manifest.json" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_that_committed_nothing_yet_is_empty_or_running(tmp_path):
    """What a run writes before its first commit makes a folder an output: its lease, its identity file, a
    temporary file, or only the folders."""
    now = time.time()
    cases = {
        "lease": ("_leases/h000.json", json.dumps({"hostname": "vm-0", "pid": 1, "renewed_unix": now - 1,
                                                   "timeout_s": 120})),
        "identity": ("_identity.json", "{}"),
        "temporary": ("activations/hook=resid_post/layer=0/.tmp-0123-h000-00ff.parquet", "partial"),
        "run record": ("_runs/h000.json", json.dumps({"state": "done"})),
        "folder only": ("samples/", None),
    }
    for case, (relpath, text) in cases.items():
        root = tmp_path / case.replace(" ", "_")
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            (root / relpath).mkdir()
        else:
            (root / relpath).write_text(text)
        done = run_inspect(root, "--json")
        assert done.returncode == 0, (case, done.stderr)
        report = json.loads(done.stdout)
        assert report["state"] == ("running" if case == "lease" else "empty"), case
        assert report["shards"] == 0 and report["problems"] == [], case


@pytest.mark.parametrize("manifest, problem", [
    ([], "its top level is a JSON list, not an object"),
    ({"files": None}, "its 'files' is null, not a list"),
    ({"files": [3]}, "a 'files' entry 3 is not an object with a string path and kind"),
    ("{not json", "is not valid JSON"),
])
def test_a_manifest_of_the_wrong_shape_exits_2_naming_it(output, tmp_path, manifest, problem):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    done = run_inspect(copy)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{copy / 'manifest.json'} " in done.stderr and problem in done.stderr
    assert f"rebuild it with python -m pipeline.manifest {copy}" in done.stderr


def test_a_manifest_that_disagrees_with_the_commit_markers_is_a_problem(output, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    dropped = next(f for f in manifest["files"] if f["kind"] == "activations")
    manifest["files"] = [f for f in manifest["files"] if f is not dropped]
    manifest["files"].append({**dropped, "path": dropped["path"].replace(".parquet", "0.parquet")})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = inspect_output(str(copy), parts=False)["problems"]
    assert len(problems) == 2, problems
    assert f"leaves out 1 activation file the commit markers list ({dropped['path']})" in problems[0]
    assert "lists 1 activation file no commit marker lists" in problems[1]
    assert all(f"python -m pipeline.manifest {copy}" in p for p in problems)


def test_storage_failures_exit_2_naming_the_output(monkeypatch, tmp_path):
    """No credentials fails at once, for real; an unreachable endpoint (about 2 minutes of google-cloud-storage's
    retries, then a RetryError) and google's errors that escape the store are made to happen."""
    import google.api_core.exceptions
    import google.auth.exceptions

    from pipeline import inspect as inspect_module

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    done = run_inspect("gs://arc-activations-nowhere/out")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "gs://arc-activations-nowhere/out/" in done.stderr and "credentials" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    for error in (google.api_core.exceptions.RetryError("Timeout of 120.0s exceeded, last exception: refused\n"
                                                        "  at port 9", None),
                  google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found"),
                  google.api_core.exceptions.Forbidden("no access to the bucket"),
                  PermissionError(13, "Permission denied")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(inspect_module, "inspect_output", fail)
        done = run_inspect("gs://bucket/out")
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.startswith("pipeline.inspect: gs://bucket/out could not be read (")
        assert type(error).__name__ in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_files_that_vanish_after_the_listing_are_passed_over(tmp_path):
    """A lease deleted by its run, a dead-letter file deleted by verify --repair, between listing and reading."""
    from pipeline.dataset import _store
    from pipeline.inspect import _dead_letters, _json_files

    (tmp_path / "_leases").mkdir()
    (tmp_path / "dead_letter").mkdir()
    for relpath in ("_leases/h000.json", "_leases/h001.json", "dead_letter/h000-0.jsonl", "dead_letter/h001-0.jsonl"):
        (tmp_path / relpath).write_text('{"stage": "validate"}\n')
    store = _store(str(tmp_path))
    read_bytes = store.read_bytes

    def vanishing(relpath):
        if "h001" in relpath:
            raise FileNotFoundError(store.path(relpath))
        return read_bytes(relpath)

    store.read_bytes = vanishing
    assert list(_json_files(store, "_leases")) == ["h000"]
    assert _dead_letters(store)["by_stage"] == {"validate": 1}


def test_a_gcs_output_reads_like_the_local_one(output, gcs_emulator):
    from tests.pipeline_output import upload

    remote = inspect_output(upload(output, gcs_emulator, "inspect/out"))
    local = inspect_output(str(output))
    assert remote["output"].startswith("gs://") and remote["state"] == "finished"
    for key in ("activations", "samples", "tokens", "datasets", "parts", "bytes", "dead_letters", "hosts",
                "uncommitted_files", "problems"):
        assert remote[key] == local[key], key
    with pytest.raises(ValueError, match=f"{gcs_emulator.root}/inspect/nothing is not an output of pipeline.run"):
        inspect_output(f"{gcs_emulator.root}/inspect/nothing")


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


def test_a_damaged_file_is_a_problem_and_a_refused_one_is_not(output, tmp_path, monkeypatch):
    """A predictions file or an activation file whose bytes do not read is a problem naming it (the rest is still
    counted); the system refusing a file (an OSError with an errno: permissions) is not damage and is raised, so
    inspect exits 2 without advising verify, which could uncommit a healthy shard."""
    import pyarrow as pa

    from pipeline import inspect as inspect_module
    from pipeline.dataset import _store

    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    _add_predictions(copy)
    damaged = min((copy / "predictions").glob("*.parquet"))
    damaged.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    report = inspect_output(str(copy))
    assert report["predictions"]["files"] == report["shards"] and report["predictions"]["scored"] > 0
    named = [p for p in report["problems"] if damaged.name in p]
    assert len(named) == 1 and "does not read" in named[0] and f"python -m pipeline.verify {copy}" in named[0]
    assert all("\n" not in problem for problem in report["problems"])  # Parquet's thrift errors span lines

    import pyarrow.parquet as pq

    mistyped = max((copy / "predictions").glob("*.parquet"))
    table = pq.read_table(mistyped)
    pq.write_table(table.set_column(table.schema.get_field_index("correct"), "correct",
                                    pa.array(["yes"] * len(table))), mistyped)
    report = inspect_output(str(copy))
    named = [p for p in report["problems"] if mistyped.name in p]
    assert len(named) == 1 and "`correct` column is string, not bool" in named[0], report["problems"]

    marker = min((copy / "samples").glob("*.parquet"))
    marker.unlink()
    marker.mkdir()
    (copy / "samples" / "broken.parquet").symlink_to(tmp_path / "nowhere.parquet")
    report = inspect_output(str(copy))
    for name in (marker.name, "broken.parquet"):
        named = [p for p in report["problems"] if name in p and "is not a file (a directory or a broken link)" in p]
        assert len(named) == 1, report["problems"]

    activation = min((copy / "activations").rglob("*.parquet"))
    relpath = activation.relative_to(copy).as_posix()
    store, problems = _store(str(copy)), []
    activation.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    assert inspect_module._part_counts(store, [relpath], str(copy), problems) == {}
    assert len(problems) == 1 and activation.name in problems[0] and "pipeline.verify" in problems[0]

    real_memory_map = pa.memory_map

    def refused(path, *args, **kwargs):
        if path.endswith(".parquet"):
            raise PermissionError(13, "Permission denied", path)
        return real_memory_map(path, *args, **kwargs)

    monkeypatch.setattr(pa, "memory_map", refused)
    with pytest.raises(PermissionError):
        inspect_module._part_counts(store, [relpath], str(copy), [])
    with pytest.raises(PermissionError):
        inspect_module._prediction_counts(store, damaged.relative_to(copy).as_posix(), str(copy))
    with pytest.raises(PermissionError):
        inspect_module._marker(store, min(copy.glob("samples/*.parquet")).relative_to(copy).as_posix())


@pytest.mark.parametrize("command", ["pipeline.inspect", "pipeline.verify"])
def test_a_reader_that_stops_early_ends_the_report_quietly(output, command):
    """`python -m pipeline.inspect OUTPUT | head -1`: the reader goes away before the report is written; the
    command ends as a shell's SIGPIPE would (141) without a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", command, str(output)], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done
