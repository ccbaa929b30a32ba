"""The run identity (what a row holds) and the per-share lease (one writer at a time), through real runs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pipeline import identity as identity_lib
from pipeline.lease import Lease, LeaseHeld, lease_path
from tests.arc_fixtures import write_challenges
from tests.test_end_to_end import ROOT, run_here, run_pipeline, verify_here

CAPTURE = ["--layers=0", "--hooks=resid_post", "--batch_size=1", "--max_seq_len=2048", "--progress_interval=0"]


def scaled_copy(checkpoint, target, factor=1.5):
    """The same geometry and tokenizer with the MLP weights scaled: what a fine-tuned copy looks like."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(checkpoint, target)
    for path in target.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: (v * factor).astype(v.dtype) if ".mlp." in k else v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, tiny_checkpoint):
    """A finished run of 2 of 4 samples: --resume then has samples left to compute."""
    work = tmp_path_factory.mktemp("identity")
    dataset, _ = write_challenges(work / "challenges.json", count=4, bad=False)
    output = work / "out"
    run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--max_samples=2", *CAPTURE)
    return work, dataset, output


def test_identity_is_in_every_marker_and_the_manifest(half_run, tiny_checkpoint):
    _, dataset, output = half_run
    from transforms.write import KEY_IDENTITY, committed_shards

    shards = committed_shards(str(output))
    identities = {meta[KEY_IDENTITY] for meta in shards.values()}
    assert len(shards) == 2 and len(identities) == 1
    identity = identity_lib.decode(identities.pop())
    assert identity["model_weights"].startswith("sha256:") and identity["tokenizer"].startswith("sha256:")
    assert identity["dataset"] == str(dataset) and identity["layers"] == "0" and identity["hooks"] == "resid_post"
    assert set(identity_lib.FLAGS) <= set(identity)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["identity"] == identity
    assert identity_lib.decode((output / identity_lib.IDENTITY_FILE).read_text()) == identity


def test_resume_refuses_another_checkpoint_of_the_same_geometry(half_run, tiny_checkpoint):
    work, dataset, output = half_run
    other = scaled_copy(tiny_checkpoint, work / "finetuned")
    done = run_here(f"--model={other}", f"--dataset={dataset}", f"--output={output}", "--resume", *CAPTURE,
                    check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model_weights: recorded 'sha256:" in done.stderr and "(pass --model (the same checkpoint))" in done.stderr
    assert "samples/h000-" in done.stderr


@pytest.mark.parametrize("flags, key", [
    (["--prompt_mode=inference"], "prompt_mode"),
    (["--grid_encoder=shape(minimal)"], "grid_encoder"),
    (["--augmentations=1"], "augmentations"),
    (["--max_train_examples=2"], "max_train_examples"),
])
def test_resume_refuses_other_prompt_settings(half_run, tiny_checkpoint, flags, key):
    _, dataset, output = half_run
    done = run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--resume",
                    *CAPTURE, *flags, check=False)
    assert done.returncode == 2 and f"{key}: recorded" in done.stderr and "Traceback" not in done.stderr


def test_resume_with_rows_options_changed_completes_the_run(half_run, tiny_checkpoint):
    """Batch size, packing and writer threads do not change a row: they may differ between attempts."""
    _, dataset, output = half_run
    capture = [flag for flag in CAPTURE if not flag.startswith("--batch_size")]
    run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--resume",
             *capture, "--batch_size=2", "--packing=rows", "--writer_threads=1")
    verify = verify_here(output)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads((output / "manifest.json").read_text())["counts"]["samples"] == 4


def test_verify_fails_when_shards_disagree_on_identity(tmp_path):
    from pipeline.manifest import rebuild_manifest
    from pipeline.verify import repair_output, verify_output
    from tests.test_write import extracted, make_batch
    from transforms.write import ShardWriter

    root = str(tmp_path / "out")
    base = {key: "x" for key in identity_lib.FLAGS}
    for index, weights in enumerate(("sha256:aaa", "sha256:aaa", "sha256:bbb")):
        batch = make_batch(prefix=f"task{index}-")
        writer = ShardWriter(root, "h000", "m", "bfloat16", "bfloat16",
                             identity=identity_lib.encode({**base, "model_weights": weights}))
        writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    manifest = rebuild_manifest(root)
    assert any("run identity" in warning for warning in manifest["warnings"])
    report = verify_output(root)
    assert not report.ok
    assert any("model_weights: recorded 'sha256:aaa', this run 'sha256:bbb'" in e for e in report.errors)
    actions, _ = repair_output(root)  # the odd shard is uncommitted; --resume would recompute its samples
    assert any("uncommitted shard" in action for action in actions)
    assert verify_output(root).ok


# --------------------------------------------------------------------------------------------- lease

def test_second_holder_is_refused_and_named(tmp_path):
    with Lease(str(tmp_path), "h000", timeout_s=60):
        with pytest.raises(LeaseHeld, match=rf"held by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
            Lease(str(tmp_path), "h000", timeout_s=60).acquire()
        with Lease(str(tmp_path), "h001", timeout_s=60):  # another host share runs side by side
            pass
    assert not os.path.exists(lease_path(str(tmp_path), "h000"))  # released


def test_stale_and_orphaned_leases_are_taken_over(tmp_path, caplog):
    path = lease_path(str(tmp_path), "h000")
    os.makedirs(os.path.dirname(path))
    stale = {"hostname": "elsewhere", "pid": 1, "renewed_unix": time.time() - 500, "timeout_s": 60,
             "run_id": "old"}
    with open(path, "w") as handle:
        json.dump(stale, handle)
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        with Lease(str(tmp_path), "h000", timeout_s=60) as lease:
            assert json.load(open(path))["run_id"] == lease.run_id
    assert "took over the lease" in caplog.text and "past its 60 s timeout" in caplog.text
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = {"hostname": socket.gethostname(), "pid": int(dead.stdout), "renewed_unix": time.time(),
              "timeout_s": 600, "run_id": "killed"}
    with open(path, "w") as handle:
        json.dump(orphan, handle)
    with Lease(str(tmp_path), "h000", timeout_s=600) as lease:  # its process is gone: no need to wait
        assert json.load(open(path))["run_id"] == lease.run_id


def test_renewal_notices_a_takeover(tmp_path):
    lease = Lease(str(tmp_path), "h000", timeout_s=60).acquire()
    try:
        with open(lease.path, "w") as handle:
            json.dump({"run_id": "thief", "hostname": "h", "pid": 2, "renewed_unix": time.time()}, handle)
        lease.renew()
        assert lease.lost and "taken over" in lease.lost
        assert json.load(open(lease.path))["run_id"] == "thief"  # never overwritten by the loser
    finally:
        lease.release()
    assert json.load(open(lease.path))["run_id"] == "thief"


def test_gcs_lease_uses_generation_preconditions(gcs_emulator):
    root = f"{gcs_emulator.root}/lease-test"
    with Lease(root, "h000", timeout_s=60) as lease:
        with pytest.raises(LeaseHeld, match="held by another run"):
            Lease(root, "h000", timeout_s=60).acquire()
        lease.renew()
        assert lease.lost is None
    with Lease(root, "h000", timeout_s=60):
        pass


def test_a_run_on_a_held_share_exits_2_and_names_the_holder(tmp_path, tiny_checkpoint):
    """The fast twin of the two concurrent runs below: the share is held by a lease taken here, as a run takes it."""
    dataset, _ = write_challenges(tmp_path / "challenges.json", count=1, bad=False)
    output = tmp_path / "out"
    with Lease(str(output), "h000", timeout_s=60) as held:
        second = run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", *CAPTURE,
                          check=False)
        assert second.returncode == 2 and "held by another run" in second.stderr
        assert f"pid {os.getpid()}" in second.stderr
        assert json.load(open(lease_path(str(output), "h000")))["run_id"] == held.run_id
    assert not (output / "samples").exists()


@pytest.mark.slow
def test_two_runs_at_once_on_one_share(tmp_path, tiny_checkpoint):
    """A second run started while the first holds the share exits 2 at once and names the holder; the first
    finishes and its output verifies."""
    dataset, _ = write_challenges(tmp_path / "challenges.json", count=4, bad=False)
    output = tmp_path / "out"
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "--runner=DirectRunner", f"--model={tiny_checkpoint}",
         f"--dataset={dataset}", f"--output={output}", *CAPTURE], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(lease_path(str(output), "h000")):
            assert first.poll() is None and time.time() < deadline, "the first run never took its lease"
            time.sleep(0.1)
        second = run_pipeline(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}",
                              "--layers=1", "--dtype=float32", "--progress_interval=0", check=False)
        assert second.returncode == 2 and "held by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["layers"] == [0] and manifest["compute_dtype"] == "bfloat16"
    assert not os.path.exists(lease_path(str(output), "h000"))


def test_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    done = run_here("--model=random:qwen2.5-0.5b", "--dataset=arc-agi-1:eval", f"--output={target}", check=False)
    assert done.returncode == 2 and f"{target} is a file" in done.stderr and "Traceback" not in done.stderr


def test_repair_refuses_while_a_run_holds_a_lease(tmp_path):
    from pipeline.verify import RepairRefused, repair_output

    with Lease(str(tmp_path), "h001", timeout_s=60):
        with pytest.raises(RepairRefused, match=r"h001: host .*wait for it or stop it first"):
            repair_output(str(tmp_path))
