"""--model=gs://...: the checkpoint is copied once into a local cache, checked, and loads exactly as the local
directory does; a truncated object is refused by name and no partial copy is ever used. Against the GCS emulator."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from model import checkpoint_cache
from model.checkpoint_cache import RemoteCheckpointError, local_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]


def upload(directory: Path, uri: str, truncate: str | None = None) -> str:
    from apache_beam.io.filesystems import FileSystems

    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        if path.name == truncate:
            data = data[:len(data) - 1000]
        with FileSystems.create(f"{uri}{path.name}") as handle:
            handle.write(data)
    return uri


@pytest.fixture(scope="module")
def remote_checkpoint(gcs_emulator, tiny_checkpoint):
    return upload(Path(tiny_checkpoint), f"{gcs_emulator.root}/checkpoints/tiny/")


def cached_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.exists() else []


def test_gs_checkpoint_loads_like_the_local_directory(remote_checkpoint, tiny_checkpoint, tmp_path, monkeypatch):
    from model import describe_spec, load_config, load_model
    from transforms.tokenize import cached_tokenizer

    cache = tmp_path / "cache"
    monkeypatch.setenv(checkpoint_cache.CACHE_ENV, str(cache))
    assert load_config(remote_checkpoint) == load_config(str(tiny_checkpoint))
    remote = load_model(remote_checkpoint, dtype="float32")
    local = load_model(str(tiny_checkpoint), dtype="float32")
    flat_remote = __import__("jax").tree_util.tree_leaves_with_path(remote.params)
    flat_local = __import__("jax").tree_util.tree_leaves_with_path(local.params)
    assert [p for p, _ in flat_remote] == [p for p, _ in flat_local]
    for (_, a), (_, b) in zip(flat_remote, flat_local):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    text = "<|im_start|>user\n0 1 2<|im_end|>"
    assert remote.tokenizer(text)["input_ids"] == local.tokenizer(text)["input_ids"]
    assert cached_tokenizer(remote_checkpoint)(text)["input_ids"] == local.tokenizer(text)["input_ids"]

    (copy,) = cached_dirs(cache)
    assert describe_spec(remote_checkpoint)["path"] == str(copy.resolve())
    recorded = json.loads((copy / checkpoint_cache.CACHE_MANIFEST).read_text())
    assert recorded["uri"] == remote_checkpoint
    for name, entry in recorded["files"].items():
        local_file = Path(tiny_checkpoint) / name
        assert entry["size"] == local_file.stat().st_size
        assert entry["sha256"] == __import__("hashlib").sha256(local_file.read_bytes()).hexdigest()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_second_load_uses_the_cache(remote_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = local_checkpoint_dir(remote_checkpoint, cache)

    def no_download(*args):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(checkpoint_cache, "_download", no_download)
    assert local_checkpoint_dir(remote_checkpoint, cache) == first
    # A copy with a file of the wrong size is not trusted: it is copied again.
    monkeypatch.undo()
    config = first / "config.json"
    config.write_bytes(config.read_bytes() + b" ")
    assert local_checkpoint_dir(remote_checkpoint, cache) == first
    assert (first / "config.json").stat().st_size == json.loads(
        (first / checkpoint_cache.CACHE_MANIFEST).read_text())["files"]["config.json"]["size"]


def test_truncated_remote_safetensors_is_refused_by_name(gcs_emulator, tiny_checkpoint, tmp_path, monkeypatch):
    from model import load_config

    uri = upload(Path(tiny_checkpoint), f"{gcs_emulator.root}/checkpoints/truncated/", truncate="model.safetensors")
    cache = tmp_path / "cache"
    monkeypatch.setenv(checkpoint_cache.CACHE_ENV, str(cache))
    with pytest.raises(RemoteCheckpointError, match=f"{uri}model.safetensors: truncated safetensors file"):
        load_config(uri)
    # Nothing usable and nothing half-written is left behind.
    assert cached_dirs(cache) == []


def test_a_copy_cut_short_is_refused_and_discarded(remote_checkpoint, tmp_path, monkeypatch):
    listing = checkpoint_cache.remote_listing(remote_checkpoint)
    lying = {name: dict(entry) for name, entry in listing.items()}
    lying["config.json"]["size"] += 10
    monkeypatch.setattr(checkpoint_cache, "remote_listing", lambda uri: lying)
    with pytest.raises(RemoteCheckpointError, match=f"{remote_checkpoint}config.json: copied .* bytes but the "
                                                    "bucket lists"):
        local_checkpoint_dir(remote_checkpoint, tmp_path / "cache")
    assert cached_dirs(tmp_path / "cache") == []
    lying = {name: dict(entry) for name, entry in listing.items()}
    lying["config.json"]["crc32c"] = "AAAAAA=="
    with pytest.raises(RemoteCheckpointError, match="config.json: crc32c of the copied bytes"):
        local_checkpoint_dir(remote_checkpoint, tmp_path / "cache")
    # An object that vanished between the listing and the copy.
    lying = {**listing, "vanished.json": {"size": 5, "crc32c": None}}
    with pytest.raises(RemoteCheckpointError, match=f"{remote_checkpoint}vanished.json: the copy to .* failed"):
        local_checkpoint_dir(remote_checkpoint, tmp_path / "cache")
    assert cached_dirs(tmp_path / "cache") == []
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_loads_copy_once(remote_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real, copied = checkpoint_cache._download, []

    def counting(source, target, expected):
        copied.append(source)
        return real(source, target, expected)

    monkeypatch.setattr(checkpoint_cache, "_download", counting)
    results, errors = [], []

    def load():
        try:
            results.append(local_checkpoint_dir(remote_checkpoint, cache))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert sorted(copied) == sorted(set(copied))  # every file copied once
    assert len(cached_dirs(cache)) == 1


def test_missing_config_is_named(gcs_emulator, tmp_path):
    uri = f"{gcs_emulator.root}/checkpoints/empty/"
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(f"{uri}pytorch_model.bin") as handle:
        handle.write(b"not read")
    with pytest.raises(RemoteCheckpointError, match=f"--model={uri}: no config.json"):
        local_checkpoint_dir(uri, tmp_path / "cache")


def test_pipeline_runs_from_a_gs_checkpoint(gcs_emulator, remote_checkpoint, tmp_path):
    from tests.arc_fixtures import write_challenges

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=2, bad=False)
    output = tmp_path / "out"
    from tests.test_end_to_end import run_here

    run_here(f"--model={remote_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=1",
             "--hooks=resid_post", "--batch_size=2", "--max_seq_len=1024", "--progress_interval=0",
             env_extra={"STORAGE_EMULATOR_HOST": gcs_emulator.host,
                        checkpoint_cache.CACHE_ENV: str(tmp_path / "cache")})
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["model"]["model"] == remote_checkpoint and manifest["counts"]["samples"] == 2
    assert manifest["model"]["path"] == str(cached_dirs(tmp_path / "cache")[0].resolve())
