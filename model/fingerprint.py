"""Fingerprints of a model's weights and tokenizer: what a run identity records so that two checkpoints of one
geometry with different values can never be mixed in one output.

A checkpoint directory's fingerprint is the sha256 over its config.json and every *.safetensors file (names, sizes
and full contents). Hashing every byte is the only fingerprint that a same-shape checkpoint with other values
cannot share (safetensors headers and sizes are identical for a fine-tuned copy), so the digest of each file is
cached by (real path, size, mtime, ctime, inode) in a small JSON file and a checkpoint is hashed once per machine.
`random:` specs are fingerprinted by their geometry and seed. Knows nothing of Beam.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_CHUNK = 8 << 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json")
_cache_lock = threading.Lock()


def cache_path() -> Path:
    """Where file digests are remembered: $ARC_ACTIVATIONS_CACHE or ~/.cache/arc-activations."""
    root = os.environ.get("ARC_ACTIVATIONS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "arc-activations")
    return Path(root) / "file-digests.json"


def _read_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            cache = json.load(handle)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a rehash


def _write_cache(cache: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".digests-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(cache, handle)
        os.replace(temp, path)
    except OSError:
        pass  # a read-only home only costs a rehash next time


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered by (real path, size, mtime, ctime, inode) so unchanged files are read once."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    with _cache_lock:
        cached = _read_cache().get(key)
    if isinstance(cached, str):
        return cached
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _cache_lock:
        cache = _read_cache()
        cache[key] = value
        _write_cache(cache)
    return value


def _files_digest(directory: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        path = directory / name
        digest.update(f"{name}\0{path.stat().st_size}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def weights_fingerprint(spec: str) -> str:
    """`sha256:<hex>` over a checkpoint's config and safetensors files, or `random:<hex>` of geometry and seed."""
    from model.config import parse_random_spec
    from model.weights import resolve_checkpoint_dir

    spec = str(spec)
    if spec.startswith("random:"):
        random_spec = parse_random_spec(spec)
        text = json.dumps({"config": random_spec.config.to_dict(), "seed": random_spec.seed}, sort_keys=True)
        return "random:" + hashlib.sha256(text.encode()).hexdigest()
    directory, _ = resolve_checkpoint_dir(spec)
    names = [p.name for p in directory.iterdir() if p.name.endswith(".safetensors") or p.name == "config.json"]
    return "sha256:" + _files_digest(directory, names)


def tokenizer_fingerprint(spec: str) -> str:
    """`sha256:<hex>` over the tokenizer files the model spec loads its tokenizer from."""
    from model.tokenizer import offline_qwen25_tokenizer_dir
    from model.weights import resolve_checkpoint_dir

    spec = str(spec)
    directory = offline_qwen25_tokenizer_dir() if spec.startswith("random:") else resolve_checkpoint_dir(spec)[0]
    names = [name for name in _TOKENIZER_FILES if (directory / name).is_file()]
    return "sha256:" + _files_digest(directory, names)
