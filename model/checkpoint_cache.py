"""Checkpoints on gs://: copied once per machine into a local cache, checked, then loaded as a local directory.

`--model=gs://bucket/path/` names a folder holding a Hugging Face checkpoint (config.json, *.safetensors, the
tokenizer files). The first process on a machine that needs it copies the files that loading reads (never pickles,
optimizer state or subfolders) into `<cache>/<key>/`, where `<cache>` is $ARC_ACTIVATIONS_MODEL_CACHE or
~/.cache/arc-activations/models and `<key>` is the sha256 of the uri and of the remote listing (names, sizes,
crc32c), so a checkpoint rewritten in the bucket gets a fresh copy and an old copy is never changed under a
reader. Every file is checked while it is copied: its byte count against the bucket's listing, its crc32c against
the object's metadata, and every safetensors file against the sizes its own header declares (a truncated upload is
refused, naming it). The copy lands in a temporary directory and is renamed into place only once complete, under
an exclusive lock file, so a partial copy is never used and concurrent workers on one machine copy it once. The
copy records each file's size and sha256 in `.arc-cache.json`; a later load checks the sizes against it.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from model.weights import CheckpointError

CACHE_ENV = "ARC_ACTIVATIONS_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/arc-activations/models")
CACHE_MANIFEST = ".arc-cache.json"
REMOTE_PREFIX = "gs://"
# What loading reads, as the hub download fetches it: configs and indexes, weights, tokenizer files.
_WANTED = re.compile(r"^(?:[^/]+\.json|[^/]+\.safetensors|merges\.txt|vocab\.json|tokenizer[^/]*)$")
_CHUNK = 16 * 1024 * 1024


class RemoteCheckpointError(CheckpointError):
    """A gs:// checkpoint that cannot be copied or is incomplete; the message names the object."""


def is_remote(spec) -> bool:
    return str(spec).startswith(REMOTE_PREFIX)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _crc32c(data: bytes | None = None):
    import google_crc32c

    return google_crc32c.Checksum(data or b"")


def remote_listing(uri: str) -> dict[str, dict]:
    """name -> {"size", "crc32c"} of the checkpoint files directly under `uri` (crc32c as GCS reports it,
    base64; None where the store has none)."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    try:
        found = FileSystems.match([uri + "*"])[0].metadata_list
    except Exception as error:  # Beam wraps every storage failure; the uri and the cause are what matter
        raise RemoteCheckpointError(f"--model={uri}: cannot list the checkpoint ({type(error).__name__}: "
                                    f"{error}); check the path and your credentials for the bucket") from error
    listing = {}
    for meta in found:
        name = meta.path[len(uri):]
        if not _WANTED.match(name):
            continue
        try:
            crc = FileSystems.checksum(meta.path)
        except Exception:  # a store without checksums: size and sha256 still guard the copy
            crc = None
        listing[name] = {"size": int(meta.size_in_bytes), "crc32c": crc if isinstance(crc, str) else None}
    if "config.json" not in listing:
        raise RemoteCheckpointError(
            f"--model={uri}: no config.json under it (found {', '.join(sorted(listing)) or 'no checkpoint files'}); "
            "pass the folder that holds the checkpoint's config.json and *.safetensors")
    if not any(name.endswith(".safetensors") for name in listing):
        raise RemoteCheckpointError(f"--model={uri}: no *.safetensors weights under it; upload the checkpoint "
                                    "with save_pretrained(..., safe_serialization=True)")
    return dict(sorted(listing.items()))


def _download(source: str, target: Path, expected: dict) -> dict:
    """Streams one object to `target`, checking its size and crc32c; returns {"size", "sha256"}."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    sha, crc, size = hashlib.sha256(), _crc32c(), 0
    try:
        with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as remote, \
                open(target, "wb") as local:
            while chunk := remote.read(_CHUNK):
                local.write(chunk)
                sha.update(chunk)
                crc.update(chunk)
                size += len(chunk)
    except Exception as error:  # storage clients raise their own types; the object and the cause are what matter
        raise RemoteCheckpointError(
            f"{source}: the copy to {target} failed after {size:,} bytes ({type(error).__name__}: {error}); "
            "nothing of it is used: check the bucket and the local disk's free space, then load it again") from error
    if size != expected["size"]:
        raise RemoteCheckpointError(
            f"{source}: copied {size:,} bytes but the bucket lists {expected['size']:,} (the object changed or "
            "the transfer was cut); the partial copy was discarded: load it again")
    got = base64.b64encode(crc.digest()).decode()
    if expected.get("crc32c") and got != expected["crc32c"]:
        raise RemoteCheckpointError(
            f"{source}: crc32c of the copied bytes is {got}, the bucket says {expected['crc32c']} (corrupted in "
            "transfer or changed meanwhile); the copy was discarded: load it again")
    return {"size": size, "sha256": sha.hexdigest()}


def check_safetensors_size(path: Path, name: str) -> None:
    """A safetensors file must be exactly as long as its header says: 8 bytes of header length, the JSON header,
    then every tensor's bytes (the largest end offset). A truncated upload fails here, named by `name`."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_length < 0 or 8 + header_length > size:
            raise RemoteCheckpointError(
                f"{name}: truncated or not a safetensors file ({size:,} bytes cannot hold its header); upload the "
                "complete file")
        try:
            header = json.loads(handle.read(header_length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise RemoteCheckpointError(f"{name}: not a safetensors file (its header does not parse: "
                                        f"{error}); upload the checkpoint's safetensors files") from error
    expected = 8 + header_length + end
    if size != expected:
        raise RemoteCheckpointError(
            f"{name}: truncated safetensors file: its header describes {expected:,} bytes, the object holds "
            f"{size:,}; upload the complete file")


def _check_copy(directory: Path, uri: str, listing: dict) -> None:
    for name in listing:
        if name.endswith(".safetensors"):
            check_safetensors_size(directory / name, uri + name)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RemoteCheckpointError(f"{uri}model.safetensors.index.json: not a safetensors index ({error})") \
                from error
        missing = sorted(shards - set(listing))
        if missing:
            raise RemoteCheckpointError(
                f"{uri}model.safetensors.index.json lists {len(missing)} shard(s) missing from the bucket: "
                f"{', '.join(missing[:5])}; upload every shard")


def _complete(directory: Path, listing: dict) -> bool:
    """A finished copy of this listing whose files still have their sizes."""
    try:
        recorded = json.loads((directory / CACHE_MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if set(recorded) != set(listing):
        return False
    for name, entry in recorded.items():
        path = directory / name
        if entry.get("size") != listing[name]["size"] or not path.is_file() or path.stat().st_size != entry["size"]:
            return False
    return True


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_checkpoint_dir(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory holding a complete, checked copy of the gs:// checkpoint `spec` (copied on first use)."""
    uri = str(spec).rstrip("/") + "/"
    listing = remote_listing(uri)
    key = hashlib.sha256(json.dumps({"uri": uri, "files": listing}, sort_keys=True).encode()).hexdigest()[:32]
    root = cache_root(cache_dir)
    final = root / key
    if _complete(final, listing):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if _complete(final, listing):  # another worker finished the copy while this one waited
            return final
        if final.exists():  # a copy some files of which were changed or removed since: never trusted
            shutil.rmtree(final)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            files = {name: _download(uri + name, temp / name, expected) for name, expected in listing.items()}
            _check_copy(temp, uri, listing)
            (temp / CACHE_MANIFEST).write_text(json.dumps({"uri": uri, "files": files}, indent=1), encoding="utf-8")
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return final
