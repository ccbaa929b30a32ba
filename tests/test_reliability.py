"""Exactly-once under failure: a run killed with SIGKILL part-way and resumed, and a write that fails transiently
and is retried by the runner, both end with exactly the rows of an uninterrupted run."""
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
from transforms.write import activations_to_numpy

ROOT = Path(__file__).resolve().parents[1]

# Runs pipeline.run in this process after patching FileSystems.rename, through which every shard file lands.
# The commit marker of a shard is its samples file, renamed last; FAULT_AT counts those commits.
LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    from apache_beam.io.filesystems import FileSystems

    mode, fault_at = os.environ["FAULT_MODE"], int(os.environ["FAULT_AT"])
    original = FileSystems.rename
    commits = {"n": 0, "failed": False}

    def rename(sources, destinations):
        if any("/samples/" in d for d in destinations):
            commits["n"] += 1
            if commits["n"] == fault_at:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)  # activation files are in place, the marker is not
                if mode == "fail" and not commits["failed"]:
                    commits["failed"] = True
                    raise IOError("injected transient failure before a commit")
        return original(sources, destinations)

    FileSystems.rename = staticmethod(rename)
    from pipeline.run import main
    sys.exit(main(sys.argv[1:]))
""")


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
    done = launch(["--runner=DirectRunner", f"--output={reference}", *common])
    assert done.returncode == 0, done.stderr[-5000:]
    return work, common, read_rows(reference)


def assert_same_rows(output, reference_rows):
    keys, values, tokens = read_rows(output)
    ref_keys, ref_values, ref_tokens = reference_rows
    assert keys == ref_keys  # same rows: nothing missing, nothing twice
    assert len(set(keys)) == len(keys)
    assert np.array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_recomputes_only_what_is_missing(job):
    work, common, reference_rows = job
    output = work / "killed"
    killed = launch(["--runner=DirectRunner", f"--output={output}", *common], fault_mode="kill", fault_at=3)
    assert killed.returncode == -signal.SIGKILL
    committed = sorted(p for p in (output / "samples").glob("*.parquet") if not p.name.startswith(".tmp"))
    assert len(committed) == 2  # two shards committed before the kill
    committed_ids = set(ds.dataset(output / "samples").to_table().column("sample_id").to_pylist())

    resumed = launch(["--runner=DirectRunner", f"--output={output}", "--resume", *common])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "already committed" in resumed.stderr
    # the committed shards were kept as they were, not rewritten
    assert all(path.exists() for path in committed)
    assert committed_ids <= set(ds.dataset(output / "samples").to_table().column("sample_id").to_pylist())
    assert_same_rows(output, reference_rows)
    assert not list(output.rglob(".tmp*"))
    verify = subprocess.run([sys.executable, "-m", "pipeline.verify", str(output)], cwd=ROOT,
                            env=dict(os.environ, NO_GCE_CHECK="true", PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_transient_write_failure_is_retried_without_duplicates(job):
    work, common, reference_rows = job
    output = work / "retried"
    # The bundle-based direct runner retries a failed bundle, as Dataflow does.
    done = launch(["--runner=BundleBasedDirectRunner", f"--output={output}", *common], fault_mode="fail",
                  fault_at=2)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "injected transient failure" in done.stderr
    assert_same_rows(output, reference_rows)
    assert not list(output.rglob(".tmp*"))
