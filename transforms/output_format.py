"""The output format in one place (public contract: docs/format.md): layout, names, metadata keys, encodings,
format versions, row groups, the storage encodings, and both directions of the activation encoding. The dtypes
themselves, and every conversion between them, live in model.dtypes.

The writer (transforms.write), verify, the manifest, the reader (pipeline.dataset) and the benchmarks import it.
It imports pyarrow, numpy, ml_dtypes and model.dtypes only (no Beam, JAX or torch), so a reader stays cheap to
import; paths here are relative to the output root with `/` separators, on local disk and gs:// alike.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import uuid
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.dtypes import STORAGE_DTYPES, storage_numpy_dtype

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

# ------------------------------------------------------------------------------------------- layout

ACTIVATIONS_DIR = "activations"
SAMPLES_DIR = "samples"
DEAD_LETTER_DIR = "dead_letter"
MANIFEST_NAME = "manifest.json"
# One record per host of its last run; the leading "_" keeps it out of pyarrow.dataset.
RUNS_DIR = "_runs"
# The run identity written once by the first run (pipeline.identity), and one lease per host share (pipeline.lease).
IDENTITY_FILE = "_identity.json"
LEASES_DIR = "_leases"
# Per-shard statistics (transforms.activation_stats), committed with their shard, and their merge over the output.
STATS_DIR = "stats"
STATS_NAME = "stats.json"
# Per-shard predictions of --generate runs (transforms.predictions), committed with their shard like stats files.
PREDICTIONS_DIR = "predictions"
# What pipeline.submission writes by default: the ARC Prize submission voted from every committed prediction.
SUBMISSION_NAME = "submission.json"
PARQUET_SUFFIX = ".parquet"
DEAD_LETTER_SUFFIX = ".jsonl"
# Temporary files are `.tmp-<uuid hex>-<final name>`: the leading "." hides them from pyarrow.dataset.
TEMP_PREFIX = ".tmp-"

WORKER_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=]*$")
SHARD_NAME_PATTERN = re.compile(r"^(?P<worker>[A-Za-z0-9][A-Za-z0-9_.=]*)-(?P<batch>[0-9a-f]+)$")
ACTIVATION_RELPATH_PATTERN = re.compile(
    r"^" + ACTIVATIONS_DIR + r"/hook=(?P<hook>[A-Za-z0-9_]+)/layer=(?P<layer>\d+)/(?P<shard>[^/]+)\.parquet$")

# --------------------------------------------------------------------------------- metadata keys

# Key-value metadata keys (bytes in the Parquet footer, str here).
KEY_FORMAT_VERSION = "format_version"
KEY_SHARD = "shard"
KEY_FILES = "files"
KEY_HOOK_NAME = "hook_name"
KEY_HOOK = "hook"
KEY_LAYER = "layer"
KEY_D_MODEL = "d_model"
KEY_DTYPE = "dtype"
KEY_STORAGE_DTYPE = "storage_dtype"
KEY_ENCODING = "activation_encoding"
KEY_OVERFLOW = "float16_overflow"
KEY_IDENTITY = "run_identity"
KEY_NUM_SAMPLES = "num_samples"
KEY_NUM_TOKENS = "num_tokens"
# The commit marker's entry for the shard's predictions file ({path, kind, rows, bytes, sha256}); its own key, as
# the stats file's: readers of `files` take every entry for an activation file.
KEY_PREDICTIONS = "predictions"
# The run identity (pipeline.identity, JSON) a commit marker records.
KEY_IDENTITY = "run_identity"

# ------------------------------------------------------------------------------------------ columns

ACTIVATION_COLUMN = "activation"
# Per-token columns of an activation file besides the vector, with the numpy dtype of their stored codes.
TOKEN_COLUMNS = ("sample_id", "position", "token_id", "part", "example_index", "row", "col", "color")
ANNOTATION_DTYPES = {"part": np.int8, "example_index": np.int16, "row": np.int16, "col": np.int16,
                     "color": np.int8}
# Sample fields a reader may join to tokens through sample_id.
SAMPLE_FIELDS = ("dataset", "task_id", "test_index", "augmentation", "num_tokens")
DEAD_LETTER_FIELDS = ("source", "stage", "reason", "record")

# ------------------------------------------------------------------------------- storage encoding

# Format 2: each token's vector is one fixed_size_binary[d_model x itemsize] value holding its values
# little-endian in the storage dtype, named by this encoding. One value per row instead of d_model list elements
# spares Parquet a repetition and definition level per number (docs/format.md has the measurements).
ENCODINGS = {"float32": "float32-le", "float16": "float16-le", "bfloat16": "bfloat16-le"}
# Format 1 stored a fixed_size_list of the values; bfloat16 bits went in a uint16 list.
V1_BFLOAT16_ENCODING = "bfloat16-bits-in-uint16"

# Row groups of about this many bytes of uncompressed activations: big enough for sequential throughput,
# small enough that a reader (e.g. an SAE data loader) does not hold gigabytes per group.
ROW_GROUP_BYTES = 64 * 1024 * 1024
MIN_ROW_GROUP_ROWS = 1024
ZSTD_LEVEL = 1
# Codec of the activation column (the other columns are small and always ZSTD). Parquet records the codec in every
# column chunk, so readers need no setting and one output may mix both. "none" writes about 2x and reads about 3x
# faster than ZSTD level 1 for 25% more bytes (docs/format.md, "Compression").
ACTIVATION_COMPRESSIONS = ("none", "zstd")
DEFAULT_ACTIVATION_COMPRESSION = "none"


# ------------------------------------------------------------------------------------------- naming

def check_worker_prefix(worker_prefix: str) -> str:
    # A leading '.' or '_' would hide the files from pyarrow.dataset; '-' would make shard names ambiguous.
    if not isinstance(worker_prefix, str) or not WORKER_PREFIX_PATTERN.match(worker_prefix):
        raise ValueError(
            f"worker prefix {worker_prefix!r} must start with a letter or digit and contain only letters, digits, "
            "'_', '.', '=' (no '-', no '/'); it must also stay the same across retries of a worker")
    return worker_prefix


def shard_name(worker_prefix: str, batch_id: str) -> str:
    return f"{check_worker_prefix(worker_prefix)}-{batch_id}"


def shard_worker(shard: str) -> str | None:
    match = SHARD_NAME_PATTERN.match(shard)
    return match.group("worker") if match else None


def activation_relpath(hook: str, layer: int, shard: str) -> str:
    return f"{ACTIVATIONS_DIR}/hook={hook}/layer={int(layer)}/{shard}{PARQUET_SUFFIX}"


def samples_relpath(shard: str) -> str:
    return f"{SAMPLES_DIR}/{shard}{PARQUET_SUFFIX}"


def predictions_relpath(shard: str) -> str:
    return f"{PREDICTIONS_DIR}/{shard}{PARQUET_SUFFIX}"


def dead_letter_relpath(worker_prefix: str, index: int) -> str:
    return f"{DEAD_LETTER_DIR}/{check_worker_prefix(worker_prefix)}-{int(index):05d}{DEAD_LETTER_SUFFIX}"


def basename(path: str) -> str:
    """The last component of a local or gs:// path."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def relative_to(root: str, path: str) -> str:
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path} is not under {root}")
    return path[len(root) + 1:]


def temp_name(name: str) -> str:
    """A fresh temporary name for a file headed for `name` (same directory)."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def temp_target_name(name: str) -> str | None:
    """The final file name a temporary file was headed for, or None if `name` is not a temporary file."""
    if not is_temp_name(name):
        return None
    rest = name[len(TEMP_PREFIX):]
    _, _, target = rest.partition("-")
    return target or None


# ----------------------------------------------------------------------------------------- metadata

def marker_paths(listed) -> list[str]:
    """The commit markers among the relpaths of a listing of SAMPLES_DIR: its own Parquet files, not temporary ones
    nor any in a folder below it, sorted."""
    return sorted(p for p in listed if p.endswith(PARQUET_SUFFIX) and not is_temp_name(basename(p))
                  and p.count("/") == SAMPLES_DIR.count("/") + 1)


_FILE_ENTRY_TYPES = {"path": str, "hook": str, "layer": int, "rows": int, "bytes": int}


def _is_file_entry(entry) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(key), kind) and not isinstance(entry.get(key), bool)
                                           for key, kind in _FILE_ENTRY_TYPES.items())


def decode_metadata(footer: pq.FileMetaData) -> dict[str, Any]:
    """A Parquet footer's key-value metadata as str -> str, with `files` (commit markers) decoded from JSON. A
    ValueError when it does not decode: not UTF-8, or `files` not a JSON list of objects each with a string path
    and hook and an integer layer, rows and bytes (the caller names the file)."""
    raw = footer.metadata or {}
    metadata = {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}
    if KEY_FILES in metadata:
        try:
            files = json.loads(metadata[KEY_FILES])
        except ValueError as err:
            raise ValueError(f"its {KEY_FILES!r} metadata is not JSON ({err})") from None
        if not isinstance(files, list) or not all(_is_file_entry(entry) for entry in files):
            raise ValueError(f"its {KEY_FILES!r} metadata is not a list of files, each with a string "
                             f"{' and '.join(k for k, t in _FILE_ENTRY_TYPES.items() if t is str)} and an integer "
                             f"{', '.join(k for k, t in _FILE_ENTRY_TYPES.items() if t is int)}")
        metadata[KEY_FILES] = files
    return metadata


def parse_manifest(data: bytes, where: str, output: str) -> dict[str, Any]:
    """OUTPUT/manifest.json's content from its bytes: an object whose `files` is a list of objects, each with a
    string `path` and `kind`. ValueError naming `where` (the file, for messages) and how to rebuild it otherwise."""
    fix = f"rebuild it with python -m pipeline.manifest {output}"
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); {fix}") from None
    problem = None
    if not isinstance(manifest, dict):
        problem = f"its top level is a JSON {type(manifest).__name__}, not an object"
    elif not isinstance(manifest.get("files", []), list):
        problem = f"its 'files' is {json.dumps(manifest['files'])[:80]}, not a list"
    else:
        for entry in manifest.get("files", []):
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("kind"), str)):
                problem = f"a 'files' entry {json.dumps(entry)[:120]} is not an object with a string path and kind"
                break
    if problem:
        raise ValueError(f"{where} is not a manifest of this format: {problem}; {fix}")
    return manifest


def manifest_disagreement(manifest: dict[str, Any], markers: list[dict]) -> tuple[list[str], list[str]]:
    """(activation files the commit markers list that `manifest` leaves out, activation files it lists that none of
    them does), where `markers` are the decoded metadata of the samples files the manifest lists: a manifest that
    leaves a file out would have its tokens skipped without a word."""
    listed = {entry["path"] for entry in manifest.get("files", []) if entry["kind"] == "activations"}
    marked = {str(entry.get("path")) for meta in markers for entry in meta.get(KEY_FILES, [])}
    return sorted(marked - listed), sorted(listed - marked)


def shown_paths(paths: Sequence[str], limit: int = 3) -> str:
    """The first `limit` paths, and how many more, for a message."""
    more = len(paths) - limit
    return ", ".join(paths[:limit]) + (f" and {more} more" if more > 0 else "")


# -------------------------------------------------------------------------------------- row groups

def row_group_rows(d_model: int, storage_dtype: str) -> int:
    """Rows per row group of an activation file: about ROW_GROUP_BYTES of uncompressed vectors."""
    row_bytes = int(d_model) * storage_numpy_dtype(storage_dtype).itemsize
    return max(MIN_ROW_GROUP_ROWS, ROW_GROUP_BYTES // max(1, row_bytes))


# ------------------------------------------------------------------------------ encoding, both ways

def vectors_to_column(stored: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[rows, d_model] numpy in a storage dtype -> the format-2 `activation` column (one little-endian
    fixed_size_binary vector per row)."""
    stored = np.asarray(stored)
    if stored.ndim != 2:
        raise ValueError(f"vectors must be [rows, d_model], got shape {stored.shape}")
    rows, d_model = stored.shape
    itemsize = stored.dtype.itemsize
    little_endian = np.ascontiguousarray(stored).view(f"u{itemsize}").astype(f"<u{itemsize}", copy=False)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(d_model * itemsize), rows, [None, pa.py_buffer(little_endian)])


def value_dtype(metadata: dict | None, column: str = ACTIVATION_COLUMN) -> np.dtype:
    """The numpy dtype of a format-2 vector column, from a table's or file's key-value metadata (bytes keys)."""
    metadata = metadata or {}
    encoding = metadata.get(KEY_ENCODING.encode(), b"").decode()
    for storage_dtype, name in ENCODINGS.items():
        if encoding == name:
            return storage_numpy_dtype(storage_dtype)
    storage = metadata.get(KEY_STORAGE_DTYPE.encode(), b"").decode()
    if storage in STORAGE_DTYPES:
        return storage_numpy_dtype(storage)
    raise ValueError(
        f"column {column!r} is fixed_size_binary but the table's metadata names no storage dtype "
        f"({KEY_ENCODING}={encoding!r}); pass dtype= (float32, float16 or bfloat16)")


def column_to_numpy(chunked: pa.ChunkedArray | pa.Array, value_dtype: np.dtype, column: str = ACTIVATION_COLUMN,
                    ) -> np.ndarray:
    """A format-2 fixed_size_binary column -> [rows, d_model] in `value_dtype`, zero-copy for one chunk."""
    chunks = chunked.chunks if isinstance(chunked, pa.ChunkedArray) else [chunked]
    width = chunked.type.byte_width
    if width % value_dtype.itemsize:
        raise ValueError(f"column {column!r}: {width} bytes per row is not a whole number of {value_dtype} values")
    d_model = width // value_dtype.itemsize
    pieces = []
    for chunk in chunks:
        if not len(chunk):
            continue
        if chunk.null_count:
            raise ValueError(f"column {column!r} holds {chunk.null_count} null vectors")
        data = chunk.buffers()[1]
        pieces.append(np.frombuffer(data, np.uint8, count=len(chunk) * width, offset=chunk.offset * width))
    raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    bits = raw.view(f"<u{value_dtype.itemsize}").astype(f"u{value_dtype.itemsize}", copy=False)
    return bits.view(value_dtype).reshape(-1, d_model)


def activations_to_numpy(table: pa.Table, column: str = ACTIVATION_COLUMN, dtype: str | None = None) -> np.ndarray:
    """The activation column as a [rows, d_model] array in its stored dtype (bfloat16 comes back as
    ml_dtypes.bfloat16), without copying more than once. Works on a file's table or a pyarrow.dataset table of
    one storage dtype (the dtype comes from the schema metadata, or from `dtype`), in format 2
    (fixed_size_binary vectors) and format 1 (fixed_size_list values)."""
    chunked = table.column(column)
    column_type = chunked.type
    metadata = table.schema.metadata or {}
    if pa.types.is_fixed_size_binary(column_type):
        dtype_ = storage_numpy_dtype(dtype) if dtype else value_dtype(metadata, column)
        return column_to_numpy(chunked, dtype_, column)
    if not pa.types.is_fixed_size_list(column_type):
        raise ValueError(f"column {column!r} is {column_type}, neither fixed_size_binary (format 2) nor "
                         "fixed_size_list (format 1)")
    d_model = column_type.list_size
    pieces = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunked.chunks]
    values = np.concatenate(pieces) if pieces else np.zeros(0, column_type.value_type.to_pandas_dtype())
    if metadata.get(KEY_ENCODING.encode()) == V1_BFLOAT16_ENCODING.encode() or dtype == "bfloat16":
        values = values.view(ml_dtypes.bfloat16)
    return values.reshape(-1, d_model)


def check_activation_compression(codec: str) -> str:
    """`codec` if it is one of ACTIVATION_COMPRESSIONS; ValueError naming the choices otherwise."""
    if codec not in ACTIVATION_COMPRESSIONS:
        raise ValueError(f"activation compression {codec!r}: expected one of {', '.join(ACTIVATION_COMPRESSIONS)}")
    return codec


def parquet_bytes(table: pa.Table, vector_columns: Sequence[str] = (), row_group_size: int | None = None,
                  compression_level: int = ZSTD_LEVEL,
                  vector_compression: str = DEFAULT_ACTIVATION_COMPRESSION) -> pa.Buffer:
    """A table encoded as the format writes it. `vector_columns` (the activation vectors) are written PLAIN with
    `vector_compression` (one of ACTIVATION_COMPRESSIONS): dictionary encoding and statistics only cost time on
    them; the small integer and id columns get both, and ZSTD. BYTE_STREAM_SPLIT on the vectors made no smaller
    files for 2-byte values and, for float32, decoded slower (benchmarks/storage_bench.py)."""
    check_activation_compression(vector_compression)
    sink = pa.BufferOutputStream()
    others = [name for name in table.column_names if name not in vector_columns]
    compression = {name: vector_compression if name in vector_columns else "zstd" for name in table.column_names}
    levels = {name: compression_level for name, codec in compression.items() if codec == "zstd"}
    pq.write_table(
        table, sink, compression=compression, compression_level=levels or None, use_dictionary=others,
        write_statistics=others, row_group_size=row_group_size, write_page_checksum=True)
    return sink.getvalue()


def marker_file_entry(metadata: dict, key: str, required: frozenset[str]) -> dict | None:
    """The entry a commit marker's (decoded) metadata keeps under `key` for a file committed with the shard
    (statistics, predictions): a dict with at least the `required` keys, or None for a shard without one."""
    raw = metadata.get(key)
    if raw is None:
        return None
    entry = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(entry, dict) or not required <= set(entry):
        raise ValueError(f"commit marker of shard {metadata.get('shard')!r}: metadata {key!r} is not a "
                         f"{{{', '.join(sorted(required))}}} object")
    return entry


# Listing, footers and digests of many small files are latency-bound (gs:// above all): a few threads hide it.
_IO_THREADS = 16


def parallel_map(function, items):
    """[function(item) for item in items], on threads when there is more than one item."""
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(_IO_THREADS, len(items))) as pool:
        return list(pool.map(function, items))
