"""Exactly-once under failure: a run killed with SIGKILL part-way and resumed, and a write that fails transiently
and is retried by the runner, both end with exactly the rows of an uninterrupted run. Only the killed run has a
process of its own."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.arc_fixtures import write_challenges
from tests.test_end_to_end import run_here, verify_here
from transforms.write import activations_to_numpy

ROOT = Path(__file__).resolve().parents[1]

# The fault, injected by patching FileSystems.rename, through which every shard file lands. The commit marker
# of a shard is its samples file, renamed last; fault_at counts those commits.
FAULT = textwrap.dedent("""
    import os, signal
    from apache_beam.io.filesystems import FileSystems

    def inject(mode, fault_at):
        original = FileSystems.rename
        commits = {"n": 0, "failed": False}

        def rename(sources, destinations):
            if any("/samples/" in d for d in destinations):
                commits["n"] += 1
                if mode == "die" and commits["n"] >= fault_at:  # no commit lands after it, as after a kill
                    raise RuntimeError("injected death at a commit")
                if commits["n"] == fault_at:
                    if mode == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)  # activation files are in place, the marker is not
                    if mode == "fail" and not commits["failed"]:
                        commits["failed"] = True
                        raise IOError("injected transient failure before a commit")
            return original(sources, destinations)

        return original, staticmethod(rename)
""")
# Runs pipeline.run in a process of its own (a SIGKILL must not end pytest) with the fault injected.
LAUNCHER = FAULT + textwrap.dedent("""
    import sys
    from pipeline.run import main

    FileSystems.rename = inject(os.environ["FAULT_MODE"], int(os.environ["FAULT_AT"]))[1]
    sys.exit(main(sys.argv[1:]))
""")


def inject_here(patch, mode, fault_at):
    """The same fault, patched into this process for the rest of the test."""
    from apache_beam.io.filesystems import FileSystems

    scope: dict = {}
    exec(FAULT, scope)
    patch.setattr(FileSystems, "rename", scope["inject"](mode, fault_at)[1])


def launch(args, fault_mode="none", fault_at=0):
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               FAULT_MODE=fault_mode, FAULT_AT=str(fault_at))
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def read_rows(output: Path):
    table = ds.dataset(output / "activations", format="parquet", partitioning="hive").to_table()
    keys = list(zip(table.column("hook").to_pylist(), table.column("layer").to_pylist(),
                    table.column("sample_id").to_pylist(), table.column("position").to_pylist()))
    values = activations_to_numpy(table)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [keys[i] for i in order], values[order], table.column("token_id").to_numpy()[order]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("reliability")
    dataset, _ = write_challenges(work / "challenges.json", count=6, bad=False)
    common = [f"--model={tiny_checkpoint}", f"--dataset={dataset}", "--layers=0,1", "--hooks=resid_post,mlp_out",
              "--dtype=float32", "--batch_size=1", "--max_seq_len=1024", "--progress_interval=0"]
    reference = work / "reference"
    run_here(f"--output={reference}", *common)
    return work, common, read_rows(reference)


def assert_same_rows(output, reference_rows):
    keys, values, tokens = read_rows(output)
    ref_keys, ref_values, ref_tokens = reference_rows
    assert keys == ref_keys  # same rows: nothing missing, nothing twice
    assert len(set(keys)) == len(keys)
    assert np.array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-6)


def assert_resume_completes(output, common, reference_rows) -> None:
    """Two shards were committed before the run stopped; --resume keeps them as they were (not rewritten) and
    computes exactly the rest."""
    committed = sorted(p for p in (output / "samples").glob("*.parquet") if not p.name.startswith(".tmp"))
    assert len(committed) == 2
    committed_ids = set(ds.dataset(output / "samples").to_table().column("sample_id").to_pylist())
    resumed = run_here(f"--output={output}", "--resume", *common)
    assert "already committed" in resumed.stderr
    assert all(path.exists() for path in committed)
    assert committed_ids <= set(ds.dataset(output / "samples").to_table().column("sample_id").to_pylist())
    assert_same_rows(output, reference_rows)
    assert not list(output.rglob(".tmp*"))
    verify = verify_here(output)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_run_that_dies_at_a_commit_then_resume_recomputes_only_what_is_missing(job, monkeypatch):
    """The fast twin of the SIGKILL case below: the run fails in this process where that one is killed, before
    its third commit marker lands, and --resume completes it."""
    work, common, reference_rows = job
    output = work / "died"
    with monkeypatch.context() as patch:
        inject_here(patch, "die", 3)
        died = run_here(f"--output={output}", *common, check=False)
    assert died.returncode == 1 and "injected death at a commit" in died.stderr
    assert_resume_completes(output, common, reference_rows)


@pytest.mark.slow
def test_sigkill_then_resume_recomputes_only_what_is_missing(job):
    work, common, reference_rows = job
    output = work / "killed"
    killed = launch(["--runner=DirectRunner", f"--output={output}", *common], fault_mode="kill", fault_at=3)
    assert killed.returncode == -signal.SIGKILL
    assert_resume_completes(output, common, reference_rows)


def test_transient_write_failure_is_retried_without_duplicates(job, monkeypatch):
    work, common, reference_rows = job
    output = work / "retried"
    inject_here(monkeypatch, "fail", 2)
    # The bundle-based direct runner retries a failed bundle, as Dataflow does.
    done = run_here("--runner=BundleBasedDirectRunner", f"--output={output}", *common)
    assert "injected transient failure" in done.stderr
    assert_same_rows(output, reference_rows)
    assert not list(output.rglob(".tmp*"))
