"""``--dataset=text:hf:OWNER/NAME[@REVISION][:CONFIG]``: a text corpus on the Hugging Face hub, read in place.

Nothing is downloaded whole. The dataset's Parquet files are listed through fsspec's ``hf`` filesystem
(huggingface_hub's ``HfFileSystem``): the files of ``CONFIG`` as the dataset card's ``configs:`` declares them
(its ``train`` split when it names splits), else the folder ``CONFIG/``, else, without a config, the card's
default config or every ``*.parquet`` file of the repository. Files are sorted by path, so the input order (and
with it what ``--max_tokens`` selects and what ``--resume`` skips) is the same on every run of one revision; pin
``@REVISION`` when the dataset may change between a run and its resume. Each file is then read one row group at
a time through ranged reads (its footer first), by the local runner's waves (pipeline/waves.py), which stop
reading once ``--max_tokens`` is spent.

Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, resolving fails within seconds with the same
message as the BARC hub path (transforms/datasets.py). Tests register a local stand-in for the ``hf``
protocol (the same ``glob``/``open``/``isdir`` calls), see tests/test_read_hub_text.py.
"""
from __future__ import annotations

import posixpath
from typing import Any, Iterator, Optional

from transforms import datasets
from transforms.datasets import DatasetSource, DatasetUnavailableError

PREFIX = "text:hf:"
PROTOCOL = "hf"
HUB_PARQUET = "hub_parquet"  # DatasetSource.file_format of a hub text dataset
CARD = "README.md"
PREFERRED_SPLIT = "train"


def is_hub_text(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """(repo_id, revision, config) of ``text:hf:OWNER/NAME[@REVISION][:CONFIG]``; ValueError naming the flag."""
    body = spec.strip()[len(PREFIX):]
    repo, _, config = body.partition(":")
    repo, _, revision = repo.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--dataset={spec}: expected text:hf:OWNER/NAME[@REVISION][:CONFIG], e.g. "
                         "text:hf:HuggingFaceFW/fineweb:sample-10BT")
    return repo, revision or None, config or None


def hub_filesystem():
    """The filesystem registered for ``hf://`` (huggingface_hub's, or a test's stand-in)."""
    import fsspec

    return fsspec.filesystem(PROTOCOL)


def _is_real_hub(fs) -> bool:
    from huggingface_hub import HfFileSystem

    return isinstance(fs, HfFileSystem)


def check_reachable(fs, repo_id: str, revision: Optional[str], spec: str, timeout_s: float) -> None:
    """Fails in seconds, with the BARC hub path's wording, when the real hub is offline or unreachable (a
    stand-in filesystem is local and always reachable)."""
    if not _is_real_hub(fs):
        return
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    if datasets._offline_env() or hub_constants.HF_HUB_OFFLINE:
        raise DatasetUnavailableError(
            f"--dataset={spec}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and a hub text dataset is read "
            f"in place, never from the local cache; {_local_copy_hint(repo_id)}")
    try:
        huggingface_hub.HfApi(endpoint=getattr(fs, "endpoint", None)).dataset_info(
            repo_id, revision=revision, timeout=timeout_s)
    except hub_errors.RepositoryNotFoundError:
        raise DatasetUnavailableError(
            f"--dataset={spec}: no such dataset on the Hugging Face hub (or it is private: set HF_TOKEN); "
            f"{_local_copy_hint(repo_id)}") from None
    except Exception as error:
        raise DatasetUnavailableError(
            f"--dataset={spec}: cannot reach the Hugging Face hub within {timeout_s:g} s "
            f"({type(error).__name__}: {str(error)[:200]}); {_local_copy_hint(repo_id)}") from None


def _local_copy_hint(repo_id: str) -> str:
    name = repo_id.split("/")[-1]
    return (f"pass a local or GCS copy of its Parquet files instead, e.g. --dataset='text:/path/to/{name}/*.parquet' "
            f"or --dataset='text:gs://bucket/{name}/*.parquet' (download them on a machine with network: "
            f"hf download {repo_id} --repo-type dataset --local-dir DIR)")


def card_configs(fs, root: str) -> list[dict]:
    """The ``configs:`` list of the dataset card's YAML header ([] without a card or header)."""
    import yaml

    path = f"{root}/{CARD}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    header = text[3:].split("\n---", 1)[0]
    try:
        configs = (yaml.safe_load(header) or {}).get("configs") or []
    except yaml.YAMLError:
        return []
    return [c for c in configs if isinstance(c, dict) and c.get("config_name")]


def _config_patterns(config: dict) -> list[str]:
    """The data file patterns of one card config, its train split only when it names splits."""
    files = config.get("data_files")
    if isinstance(files, str):
        return [files]
    entries = files or []
    if any(isinstance(e, dict) and e.get("split") == PREFERRED_SPLIT for e in entries):
        entries = [e for e in entries if isinstance(e, dict) and e.get("split") == PREFERRED_SPLIT]
    patterns = []
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else entry
        patterns += [path] if isinstance(path, str) else list(path or [])
    return patterns


def file_patterns(fs, root: str, config: Optional[str], spec: str) -> list[str]:
    """Glob patterns (relative to the repository root) of the files to read; ValueError for an unknown config."""
    configs = card_configs(fs, root)
    by_name = {c["config_name"]: c for c in configs}
    if config is None:
        default = next((c for c in configs if c.get("default")), by_name.get("default"))
        return _config_patterns(default) if default else ["**/*.parquet"]
    if config in by_name:
        return _config_patterns(by_name[config])
    if fs.isdir(f"{root}/{config}"):
        return [f"{config}/**/*.parquet"]
    known = ", ".join(sorted(by_name)) or "none declared in its card"
    raise ValueError(f"--dataset={spec}: the dataset has no config {config!r} (configs: {known}) and no folder "
                     f"{config}/; pass one of its configs, or none for the default")


def list_files(fs, repo_id: str, revision: Optional[str], config: Optional[str], spec: str) -> list[str]:
    """Sorted ``hf://datasets/...`` paths of the Parquet files to read."""
    root = f"datasets/{repo_id}" + (f"@{revision}" if revision else "")
    found = set()
    for pattern in file_patterns(fs, root, config, spec):
        found.update(fs.glob(posixpath.join(root, pattern.lstrip("/"))))
    files = sorted(f"{PROTOCOL}://{path.split('://', 1)[-1]}" for path in found if path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"--dataset={spec}: no Parquet file found in {root} for "
                                f"{'config ' + repr(config) if config else 'its default config'}; "
                                "a hub text dataset is read from Parquet files (its text column)")
    return files


def resolve_hub_text(spec: str, text_field: str = "text",
                     timeout_s: float = datasets.HUB_TIMEOUT_S) -> DatasetSource:
    """The :class:`DatasetSource` of a ``text:hf:`` spec: its files listed, nothing downloaded."""
    repo_id, revision, config = parse_spec(spec)
    fs = hub_filesystem()
    check_reachable(fs, repo_id, revision, spec, timeout_s)
    files = list_files(fs, repo_id, revision, config, spec)
    name = f"hf:{repo_id}" + (f"@{revision}" if revision else "") + (f":{config}" if config else "")
    return DatasetSource(spec=spec, kind=datasets.TEXT, dataset=name, files=tuple(files), file_format=HUB_PARQUET,
                         text_field=text_field)


def open_hub_file(path: str):
    return hub_filesystem().open(path, "rb")


def row_group_sizes(path: str) -> list[int]:
    """Uncompressed bytes of each row group of a hub Parquet file (one ranged read of its footer)."""
    import pyarrow.parquet as pq

    with open_hub_file(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
        return [metadata.row_group(group).total_byte_size for group in range(metadata.num_row_groups)]


def iter_hub_rows(path: str, columns: list[str], group: int, max_row_bytes: int) -> Iterator[tuple[int, Any]]:
    """``(row_index_in_file, row)`` of one row group, read through fsspec (ranged reads, nothing cached)."""
    from transforms.read_records import iter_parquet_rows

    yield from iter_parquet_rows(path, columns, [group], max_row_bytes, open_file=open_hub_file)
