"""`python -m pipeline.run` as a user runs it: a tiny random checkpoint, real ARC-AGI tasks, every hook at every
layer read back with pyarrow.dataset and compared with transformers' PyTorch Qwen2 on the same token ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.arc_fixtures import write_challenges
from transforms.write import activations_to_numpy
from model.torch_reference import load_torch_model, relative_error, torch_hooks

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def run_pipeline(*args: str, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "--runner=DirectRunner", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"pipeline.run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def run_here(*args: str, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """What run_pipeline returns, from `pipeline.run` run in this process (through run_main, as the CLI does):
    a process start costs most of a tiny run, and JAX's compiled functions and the tokenizer are kept between
    runs here. Log records land in stderr, as the CLI prints them."""
    import contextlib
    import io
    import logging
    import signal

    from pipeline.errors import run_main
    from pipeline.run import main

    argv = [*args] if any(a.startswith("--runner=") for a in args) else ["--runner=DirectRunner", *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, sigint = root.level, signal.getsignal(signal.SIGINT)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            for key, value in (env_extra or {}).items():
                patch.setenv(key, value)
            code = run_main(main, argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        signal.signal(signal.SIGINT, sigint)  # run_main leaves SIGINT at its default action after a failure
    done = subprocess.CompletedProcess(["pipeline.run", *argv], code, stdout.getvalue(), stderr.getvalue())
    if check and done.returncode != 0:
        raise AssertionError(f"pipeline.run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def verify_here(*args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.verify ARGS`, in this process."""
    import contextlib
    import io

    from pipeline.verify import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["pipeline.verify", *args], code, stdout.getvalue(), stderr.getvalue())


def pipeline_process(*args: str) -> subprocess.Popen:
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", "--runner=DirectRunner", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_checkpoint):
    """The two `python -m pipeline.run` processes of this module, started together (each spends most of its
    time importing): the float32 run every read-back test uses, and one refused for an impossible layer."""
    work = tmp_path_factory.mktemp("e2e")
    dataset, tasks = write_challenges(work / "challenges.json", count=4, bad=True)
    output = work / "out"
    run = pipeline_process(
        f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=all",
        f"--hooks={','.join(HOOKS)}", "--dtype=float32", "--batch_size=2", "--max_seq_len=2048",
        "--progress_interval=0")
    refused = pipeline_process(f"--model={tiny_checkpoint}", f"--output={work / 'refused'}", "--layers=7")
    done = finished(run)
    if done.returncode != 0:
        raise AssertionError(f"pipeline.run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return {"float32": (output, tasks, done), "refused": finished(refused)}


@pytest.fixture(scope="module")
def float32_run(cli_runs):
    return cli_runs["float32"]


def test_every_activation_matches_transformers(float32_run, tiny_checkpoint):
    output, tasks, _ = float32_run
    samples = ds.dataset(output / "samples", format="parquet").to_table().to_pylist()
    assert len(samples) == 4  # one test input each; the bad task went to the dead letter
    acts = ds.dataset(output / "activations", format="parquet", partitioning="hive").to_table()
    assert set(acts.column("hook").to_pylist()) == set(HOOKS)
    assert set(acts.column("layer").to_pylist()) == {0, 1}
    frame = {name: acts.column(name).to_numpy(zero_copy_only=False) for name in ("sample_id", "hook", "layer",
                                                                                  "position", "token_id")}
    values = activations_to_numpy(acts)
    worst = 0.0
    torch_model = load_torch_model(tiny_checkpoint)
    for sample in samples:
        reference = torch_hooks(torch_model, [np.asarray(sample["token_ids"])], logits=False)[0]
        mine = frame["sample_id"] == sample["sample_id"]
        for hook in HOOKS:
            for layer in (0, 1):
                rows = np.flatnonzero(mine & (frame["hook"] == hook) & (frame["layer"] == layer))
                order = rows[np.argsort(frame["position"][rows])]
                # every real token exactly once, in order, padding never
                assert frame["position"][order].tolist() == list(range(sample["num_tokens"]))
                assert frame["token_id"][order].tolist() == list(sample["token_ids"])
                error = relative_error(values[order], reference[f"blocks.{layer}.hook_{hook}"])
                worst = max(worst, error)
                assert error <= 1e-5, (sample["sample_id"], hook, layer, error)
    assert worst > 0.0  # compared real numbers, not two copies of one array


def test_counts_add_up_and_bad_record_is_dead_lettered(float32_run):
    output, tasks, done = float32_run
    manifest = json.loads((output / "manifest.json").read_text())
    counts = manifest["counts"]
    run = manifest["run_counters"] if "run_counters" in manifest else manifest.get("run", {}).get("run_counters", {})
    assert counts["samples"] == 4
    letters = [json.loads(line) for path in sorted((output / "dead_letter").glob("*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    assert len(letters) == 1 and "badbool0" in letters[0]["source"] + letters[0]["record"]
    assert "bool" in letters[0]["reason"]
    if run:
        assert run["records_read"] == len(tasks) == run.get("records_valid", 4) + run["records_rejected"]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["samples_written"] == 4


def test_verify_accepts_the_output(float32_run):
    output, _, _ = float32_run
    done = verify_here(output)
    assert done.returncode == 0, done.stdout + done.stderr


def test_second_run_into_same_output_needs_resume(float32_run, tiny_checkpoint):
    output, _, _ = float32_run
    done = run_here(f"--model={tiny_checkpoint}", "--dataset=arc-agi-1:eval", f"--output={output}",
                    "--max_samples=1", "--layers=0", check=False)
    assert done.returncode == 2
    assert "--resume" in done.stderr
    # --resume with other capture settings than the committed shards: refused before anything runs.
    common = [f"--model={tiny_checkpoint}", "--dataset=arc-agi-1:eval", f"--output={output}", "--resume",
              f"--hooks={','.join(HOOKS)}"]
    done = run_here(*common, "--layers=0", "--dtype=float32", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "samples/h000-" in done.stderr and "layers: recorded '0,1', this run '0' (pass --layers)" in done.stderr
    done = run_here(*common, "--layers=all", "--dtype=bfloat16", check=False)  # auto storage: bfloat16
    assert done.returncode == 2 and "storage_dtype: recorded 'float32', this run 'bfloat16'" in done.stderr
    assert "--activation_dtype" in done.stderr and "dtype: recorded 'float32'" in done.stderr


def test_impossible_options_are_named(tiny_checkpoint, tmp_path, cli_runs):
    # One through the CLI for its exit status; the rest fail the same way in this process.
    done = cli_runs["refused"]
    assert done.returncode == 2 and "7" in done.stderr and "layer" in done.stderr.lower()
    done = run_here(f"--model={tiny_checkpoint}", f"--output={tmp_path}", "--hooks=resid_middle", check=False)
    assert done.returncode == 2 and "resid_middle" in done.stderr
    done = run_here(f"--model={tmp_path / 'nowhere'}", f"--output={tmp_path}", check=False)
    assert done.returncode == 2 and "nowhere" in done.stderr
    common = [f"--model={tiny_checkpoint}", f"--output={tmp_path}", "--layers=0"]
    done = run_here(*common, f"--dataset={tmp_path / 'missing.jsonl'}", check=False)
    assert done.returncode == 2 and "missing.jsonl" in done.stderr and "Traceback" not in done.stderr
    done = run_here(*common, "--dataset=arc-agi-1", "--grid_encoder=shape(foo)", check=False)
    assert done.returncode == 2 and "foo" in done.stderr and "Traceback" not in done.stderr
    # the default hub dataset, offline: a clear line in seconds that says how to pass a local copy
    done = run_here(*common, check=False)
    assert done.returncode == 2 and "--dataset=" in done.stderr and "Traceback" not in done.stderr


def check_every_sample_once(done, output):
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["samples_written"] == 4 and summary["records_read"] == 4
    samples = ds.dataset(output / "samples", format="parquet").to_table()
    assert sorted(samples.column("sample_id").to_pylist()) == sorted(set(samples.column("sample_id").to_pylist()))
    acts = ds.dataset(output / "activations", format="parquet", partitioning="hive").to_table()
    assert acts.num_rows == sum(samples.column("num_tokens").to_pylist())
    verify = verify_here(output)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def workers_args(checkpoint, tmp_path, mode):
    dataset, _ = write_challenges(tmp_path / "challenges.json", count=4, bad=False)
    return [f"--model={checkpoint}", f"--dataset={dataset}", f"--output={tmp_path / 'out'}", "--layers=1",
            "--hooks=resid_post", "--batch_size=1", "--max_seq_len=1024", "--progress_interval=0",
            "--direct_num_workers=2", f"--direct_running_mode={mode}"]


def test_two_worker_threads_write_every_sample_once(tiny_checkpoint, tmp_path):
    """The fast twin of the multi-process run below: two workers share the bundles, in this process."""
    done = run_here(*workers_args(tiny_checkpoint, tmp_path, "multi_threading"))
    check_every_sample_once(done, tmp_path / "out")


@pytest.mark.slow
def test_multi_process_local_run_writes_every_sample_once(tiny_checkpoint, tmp_path):
    """--direct_num_workers with multi_processing: separate SDK worker processes, each loading its own model."""
    done = run_pipeline(*workers_args(tiny_checkpoint, tmp_path, "multi_processing"))
    check_every_sample_once(done, tmp_path / "out")


def test_pipeline_dataset_reads_the_output(float32_run):
    from collections import Counter

    from pipeline.dataset import open_activations

    output, _, _ = float32_run
    reader = open_activations(str(output))
    assert reader.source == "manifest" and reader.storage_dtype == "float32" and reader.skipped == ()
    assert set(reader.hooks) == set(HOOKS) and reader.layers == (0, 1)
    acts = ds.dataset(output / "activations", format="parquet", partitioning="hive").to_table()
    for hook in ("resid_pre", "mlp_out"):
        for layer in (0, 1):
            table = acts.filter((ds.field("hook") == hook) & (ds.field("layer") == layer))
            expected = dict(zip(zip(table.column("sample_id").to_pylist(), table.column("position").to_pylist()),
                                activations_to_numpy(table)))
            values, columns = reader.to_numpy(hook, layer, with_metadata=True)
            keys = list(zip(columns["sample_id"].tolist(), columns["position"].tolist()))
            assert Counter(keys) == Counter(list(expected)) and reader.num_tokens(hook, layer) == len(keys)
            np.testing.assert_array_equal(values, np.stack([expected[k] for k in keys]))
    seen = [k for _, cols in reader.batches("resid_post", 1, 64, drop_last=False, with_metadata=True)
            for k in zip(cols["sample_id"].tolist(), cols["position"].tolist())]
    assert len(seen) == len(set(seen)) == reader.num_tokens("resid_post", 1)
