"""Output tables and the exactly-once Parquet shard writer (public format: docs/format.md).

One extracted batch becomes one *shard*: a Parquet file per (hook, layer) under
`activations/hook=<hook>/layer=<layer>/` plus `samples/<shard>.parquet`. Every file is encoded in memory, written
to a hidden temporary name in its final directory and renamed into place through Beam's `FileSystems` (local
paths and gs:// alike). The samples file goes last: it is the shard's commit marker, and its key-value metadata
lists the shard's activation files with row counts, sizes and sha256. Shard names are `<worker_prefix>-<batch_id>`
and batch ids are a function of the batch's sample ids, so a retried write overwrites the same names instead of
adding a second copy, and `--resume` can tell committed from half-written shards.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import time
from typing import Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from model.dtypes import STORAGE_DTYPES, to_storage
from model.hooks import BLOCK_HOOKS, FINAL_NORM_HOOK, transformer_lens_name  # noqa: F401 - re-exported
from transforms import activation_stats, stats_kernel
from transforms.annotations import PART_NAMES
from transforms.batching import stable_group
from transforms.elements import ExtractedBatch, HookLayer, Placement, TokenizedSample
from transforms.metrics import NAMESPACE, STATISTICS_CPU_COUNTER
from transforms.output_format import (  # noqa: F401 - the format's names, re-exported for the writer's callers
    DEFAULT_ACTIVATION_COMPRESSION,
    ACTIVATIONS_DIR,
    ANNOTATION_DTYPES,
    DEAD_LETTER_DIR,
    DEAD_LETTER_FIELDS,
    ENCODINGS,
    FORMAT_VERSION,
    PREDICTIONS_DIR,
    KEY_ENCODING,
    KEY_FILES,
    KEY_FORMAT_VERSION,
    KEY_HOOK_NAME,
    KEY_IDENTITY,
    KEY_OVERFLOW,
    KEY_PREDICTIONS,
    KEY_SHARD,
    KEY_STORAGE_DTYPE,
    ROW_GROUP_BYTES,
    SAMPLES_DIR,
    TEMP_PREFIX,
    V1_BFLOAT16_ENCODING,
    ZSTD_LEVEL,
    activation_relpath,
    activations_to_numpy,
    basename,
    check_activation_compression,
    check_worker_prefix,
    dead_letter_relpath,
    decode_metadata,
    parallel_map,
    parquet_bytes,
    relative_to,
    row_group_rows,
    samples_relpath,
    shard_name,
    shard_worker,
    temp_name,
    temp_target_name,
    vectors_to_column,
)



# ----------------------------------------------------------------------------------------------- naming

def join(root: str, relpath: str) -> str:
    return FileSystems.join(root, *relpath.split("/"))


def _temp_path(final_path: str) -> str:
    directory, name = FileSystems.split(final_path)
    return FileSystems.join(directory, temp_name(name))


# ------------------------------------------------------------------------------------------- tables

def _annotation(sample: dict, key: str, dtype, n: int) -> np.ndarray:
    annotations = sample.get("annotations")
    if not isinstance(annotations, dict) or key not in annotations:
        raise ValueError(f"sample {sample.get('sample_id')!r} lacks annotations[{key!r}] (see TokenizedSample "
                         "in docs/design.md)")
    values = np.asarray(annotations[key])
    if values.shape != (n,):
        raise ValueError(f"sample {sample['sample_id']!r}: annotations[{key!r}] has shape {values.shape}, "
                         f"expected ({n},) like its token_ids")
    return values.astype(dtype, copy=False)


def _check_placements(samples: Sequence[TokenizedSample], placements: Sequence[Placement]) -> list[int]:
    if len(samples) != len(placements):
        raise ValueError(f"{len(samples)} samples but {len(placements)} placements")
    lengths = []
    for index, (sample, placement) in enumerate(zip(samples, placements)):
        sample_index, _, _, length = (int(v) for v in placement)
        n = int(np.asarray(sample["token_ids"]).shape[0])
        if sample_index != index or length != n:
            raise ValueError(
                f"placement {tuple(placement)} does not describe sample {index} ({sample['sample_id']!r}, "
                f"{n} tokens): placements[i] must be (i, row, start, len(token_ids))")
        lengths.append(n)
    return lengths


def token_table(samples: Sequence[TokenizedSample], placements: Sequence[Placement]) -> pa.Table:
    """The columns of an activation file other than `activation`, one row per real token: sample_id, position,
    token_id, part, example_index, row, col, color. The same for every (hook, layer) of a shard, so the writer
    builds it once per shard."""
    lengths = _check_placements(samples, placements)
    total = sum(lengths)
    sample_index = np.repeat(np.arange(len(samples), dtype=np.int32), lengths)
    if total:
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        token_ids = np.concatenate([np.asarray(s["token_ids"], np.int32) for s in samples])
        columns = {key: np.concatenate([_annotation(s, key, dtype, n) for s, n in zip(samples, lengths)])
                   for key, dtype in ANNOTATION_DTYPES.items()}
    else:
        positions = token_ids = np.zeros(0, np.int32)
        columns = {key: np.zeros(0, dtype) for key, dtype in ANNOTATION_DTYPES.items()}
    part = columns["part"]
    if part.size and (part.min() < 0 or part.max() >= len(PART_NAMES)):
        bad = int(part[(part < 0) | (part >= len(PART_NAMES))][0])
        raise ValueError(f"annotation part code {bad} is not one of transforms.annotations.PART_CODES")
    return pa.table({
        "sample_id": pa.DictionaryArray.from_arrays(
            pa.array(sample_index, pa.int32()), pa.array([s["sample_id"] for s in samples], pa.string())),
        "position": pa.array(positions, pa.int32()),
        "token_id": pa.array(token_ids, pa.int32()),
        "part": pa.DictionaryArray.from_arrays(pa.array(part, pa.int8()), pa.array(PART_NAMES, pa.string())),
        "example_index": pa.array(columns["example_index"], pa.int16()),
        "row": pa.array(columns["row"], pa.int16()),
        "col": pa.array(columns["col"], pa.int16()),
        "color": pa.array(columns["color"], pa.int8()),
    })


def activation_table(samples: Sequence[TokenizedSample], placements: Sequence[Placement], activation: np.ndarray,
                     hook: str, layer: int, storage_dtype: str = "float32", tokens: pa.Table | None = None
                     ) -> pa.Table:
    """One row per real token: sample_id, position, token_id, activation, part, example_index, row, col, color.

    `activation` is [n_real_tokens, d_model] with rows in sample order then position order. hook and layer are
    not columns (they are the Hive partition directories) but are recorded in the schema metadata, with the
    storage encoding and the float16 overflow count. `tokens`: the shard's `token_table`, when the caller has
    it already."""
    if tokens is None:
        tokens = token_table(samples, placements)
    total = tokens.num_rows
    activation = np.asarray(activation)
    if activation.ndim != 2 or activation.shape[0] != total:
        raise ValueError(
            f"{transformer_lens_name(hook, layer)}: activation has shape {activation.shape}, expected "
            f"({total}, d_model) for the {len(samples)} samples' {total} real tokens")
    stored, overflow = to_storage(activation, storage_dtype)
    d_model = int(stored.shape[1])
    table = tokens.add_column(3, "activation", vectors_to_column(stored))
    return table.replace_schema_metadata({
        KEY_HOOK_NAME: transformer_lens_name(hook, layer),
        "hook": hook,
        "layer": str(int(layer)),
        "d_model": str(d_model),
        KEY_STORAGE_DTYPE: storage_dtype,
        KEY_ENCODING: ENCODINGS[storage_dtype],
        KEY_OVERFLOW: str(overflow),
        KEY_FORMAT_VERSION: str(FORMAT_VERSION),
    })


def samples_table(samples: Sequence[TokenizedSample]) -> pa.Table:
    """One row per sample: sample_id, dataset, task_id, test_index, augmentation, num_tokens, token_ids, prompt."""
    token_ids = [np.asarray(s["token_ids"], np.int32) for s in samples]
    offsets = np.zeros(len(samples) + 1, np.int32)
    np.cumsum([t.shape[0] for t in token_ids], out=offsets[1:])
    flat = np.concatenate(token_ids) if token_ids else np.zeros(0, np.int32)
    return pa.table({
        "sample_id": pa.array([s["sample_id"] for s in samples], pa.string()),
        "dataset": pa.array([s["dataset"] for s in samples], pa.string()),
        "task_id": pa.array([s["task_id"] for s in samples], pa.string()),
        "test_index": pa.array([int(s["test_index"]) for s in samples], pa.int32()),
        "augmentation": pa.array([s["augmentation"] for s in samples], pa.string()),
        "num_tokens": pa.array(np.diff(offsets), pa.int32()),
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32())),
        "prompt": pa.array([s.get("prompt", "") for s in samples], pa.string()),
    })


# -------------------------------------------------------------------------------------- file writing

def _upload(data: pa.Buffer | bytes, path: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(memoryview(data))


def put_atomic(data: pa.Buffer | bytes, final_path: str) -> None:
    """Writes `data` to a temporary name next to `final_path` and renames it into place."""
    temp = _temp_path(final_path)
    try:
        _upload(data, temp)
        FileSystems.rename([temp], [final_path])
    except BaseException:
        _delete_quietly([temp])
        raise


def _delete_quietly(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            if FileSystems.exists(path):
                FileSystems.delete([path])
        except Exception:  # cleanup of a failed attempt must not mask the original error
            pass


def _outcome(function, *args):
    """(result, None) or (None, the exception): lets a caller wait for every task before cleaning up."""
    try:
        return function(*args), None
    except BaseException as error:  # noqa: BLE001 - re-raised by the caller after cleanup
        return None, error


# Set to "off" by the benchmarks (benchmarks/stats_bench.py, python -m pipeline.bench --host_statistics=off) to
# measure the writer without statistics; a run with them off commits shards without statistics files, which
# the manifest reports and `python -m pipeline.stats OUTPUT --write` can fill in.
STATISTICS_ENV = "ARC_ACTIVATIONS_STATISTICS"


def statistics_enabled() -> bool:
    value = os.environ.get(STATISTICS_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{STATISTICS_ENV}={value!r}: expected on or off")
    return value == "on"


class ShardWriter:
    """Writes one shard per extracted batch, exactly once per shard name (see module docstring)."""

    def __init__(self, output_root: str, worker_prefix: str, model_name: str, compute_dtype: str,
                 storage_dtype: str = "float32", compression_level: int = ZSTD_LEVEL, skip_committed: bool = False,
                 identity: str | None = None, activation_compression: str = DEFAULT_ACTIVATION_COMPRESSION,
                 statistics: bool | None = None):
        """identity: the run identity (pipeline.identity, JSON) recorded in every commit marker.
        statistics: compute and commit each shard's statistics (transforms.activation_stats); None reads
        STATISTICS_ENV, which only the benchmarks set, to measure what the statistics cost.
        skip_committed: a shard whose commit marker exists is not written again (a Beam retry of a bundle
        that had already committed it). Recomputed activations need not be bit-identical on every
        accelerator; skipping keeps the committed files and their checksums as they are."""
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        self.output_root = output_root.rstrip("/") if output_root not in ("/",) else output_root
        self.worker_prefix = check_worker_prefix(worker_prefix)
        self.model_name = model_name
        self.compute_dtype = compute_dtype
        self.storage_dtype = storage_dtype
        self.compression_level = compression_level
        self.activation_compression = check_activation_compression(activation_compression)
        self.skip_committed = skip_committed
        self.identity = identity
        self.statistics = statistics_enabled() if statistics is None else bool(statistics)

    def _committed_summary(self, shard: str, batch_id: str) -> dict | None:
        path = join(self.output_root, samples_relpath(shard))
        matches = match_files(path)
        if not matches:
            return None
        metadata = decode_metadata(_read_footer(path))
        files = metadata[KEY_FILES]
        return {
            "shard": shard, "batch_id": batch_id, "samples": int(metadata["num_samples"]),
            "tokens": int(metadata["num_tokens"]), "rows": sum(int(f["rows"]) for f in files),
            "bytes": sum(int(f["bytes"]) for f in files) + int(matches[0].size_in_bytes),
            KEY_OVERFLOW: int(metadata.get(KEY_OVERFLOW, 0)), "files": len(files) + 1, "already_committed": True,
            "stats_bytes": int((activation_stats.marker_entry(metadata) or {}).get("bytes", 0)), "stats_cpu_s": 0.0,
        }

    def _common_metadata(self, shard: str) -> dict[str, str]:
        return {
            "model": str(self.model_name), "dtype": str(self.compute_dtype), KEY_STORAGE_DTYPE: self.storage_dtype,
            KEY_SHARD: shard, KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        }

    def _write_activation_file(self, shard: str, samples, placements, hook: str, layer: int,
                               activation: np.ndarray, reductions: dict | None = None, tokens=None,
                               columns=None) -> dict:
        """Encodes one (hook, layer) file and uploads it under a temporary name (renamed by the caller).
        `reductions`: the device's part of the file's statistics (model.statistics), if it made them; `tokens`
        and `columns`: the shard's token table and its statistics columns, made once per shard."""
        table = activation_table(samples, placements, activation, hook, layer, self.storage_dtype, tokens)
        metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        metadata.update(self._common_metadata(shard))
        table = table.replace_schema_metadata(metadata)
        d_model = int(metadata["d_model"])
        data = parquet_bytes(table, vector_columns=("activation",),
                             row_group_size=row_group_rows(d_model, self.storage_dtype),
                             compression_level=self.compression_level,
                             vector_compression=self.activation_compression)
        stats, stats_cpu = None, 0.0
        if self.statistics:
            started = time.thread_time()
            stats = activation_stats.from_arrow(table, hook, layer, self.storage_dtype, int(metadata[KEY_OVERFLOW]),
                                                reductions=reductions, columns=columns)
            stats_cpu = time.thread_time() - started
        relpath = activation_relpath(hook, layer, shard)
        final = join(self.output_root, relpath)
        temp = _temp_path(final)
        try:
            _upload(data, temp)
        except BaseException:
            _delete_quietly([temp])
            raise
        entry = {"path": relpath, "hook": hook, "layer": int(layer), "rows": table.num_rows, "bytes": data.size,
                 "sha256": hashlib.sha256(memoryview(data)).hexdigest(), KEY_OVERFLOW: int(metadata[KEY_OVERFLOW])}
        return {"file": entry, "temp": temp, "final": final, "d_model": d_model, "stats": stats,
                "stats_cpu_s": stats_cpu}

    def _write_predictions(self, shard: str, samples: Sequence[dict], predictions: Sequence[dict] | None
                           ) -> dict | None:
        """Writes predictions/<shard>.parquet (before the commit marker, which lists it); returns its entry."""
        if predictions is None:
            return None
        from transforms.predictions import predictions_file

        if sorted(row["sample_id"] for row in predictions) != sorted(s["sample_id"] for s in samples):
            raise ValueError(f"shard {shard}: the predictions do not cover exactly the shard's samples")
        data, entry = predictions_file(shard, predictions)
        put_atomic(data, join(self.output_root, entry["path"]))
        return entry

    def _put_stats(self, shard: str, stats) -> dict:
        """Writes stats/<shard>.json; returns its entry for the commit marker. Before the marker, which lists it:
        a shard's statistics commit with it or not at all."""
        data, entry = activation_stats.shard_file(shard, stats)
        put_atomic(data, join(self.output_root, entry["path"]))
        return entry

    def _marker_metadata(self, shard, batch_id, d_model, table, files, overflow, stats_entry,
                         predictions_entry) -> dict:
        """The commit marker's key-value metadata: the shard, its files, and its statistics and predictions files
        when it has them."""
        metadata = self._common_metadata(shard)
        metadata.update({
            "batch_id": batch_id, "worker": self.worker_prefix, "d_model": str(d_model),
            "num_samples": str(table.num_rows), "num_tokens": str(int(np.sum(table["num_tokens"].to_numpy()))),
            KEY_OVERFLOW: str(overflow), KEY_FILES: json.dumps(files, sort_keys=True),
        })
        if stats_entry is not None:
            metadata[activation_stats.MARKER_KEY] = json.dumps(stats_entry, sort_keys=True)
        if predictions_entry is not None:
            metadata[KEY_PREDICTIONS] = json.dumps(predictions_entry, sort_keys=True)
        if self.identity is not None:
            metadata[KEY_IDENTITY] = self.identity
        return metadata

    def write_shard(self, batch_id: str, samples: Sequence[TokenizedSample], placements: Sequence[Placement],
                    activations: dict[HookLayer, np.ndarray],
                    executor: concurrent.futures.Executor | None = None,
                    predictions: Sequence[dict] | None = None,
                    reductions: dict[HookLayer, dict] | None = None) -> dict:
        """Writes every activation file of the batch, then the samples file (the commit marker). With an
        `executor`, the activation files are encoded and uploaded on it in parallel (a shard of all 24 layers is
        24 files); the commit stays in the calling thread. `predictions` (--generate: one row per sample,
        transforms.predictions) become predictions/<shard>.parquet, committed with the shard like its statistics.
        `reductions` ((hook, layer) -> model.statistics' fields for those tokens) are the statistics' passes over
        the values, made on the device; a (hook, layer) without them is computed here.

        Returns {"shard", "batch_id", "samples", "tokens", "rows", "bytes", "float16_overflow", "files",
        "already_committed", "stats_bytes", "stats_cpu_s"}; `bytes` and `files` count the activation and samples
        files, the shard's statistics file (transforms.activation_stats) is `stats_bytes`, and `stats_cpu_s` the
        CPU seconds its statistics took on the writer's threads."""
        if not activations:
            raise ValueError(f"batch {batch_id}: no activations to write (no hook and layer requested?)")
        shard = shard_name(self.worker_prefix, batch_id)
        if self.skip_committed:
            summary = self._committed_summary(shard, batch_id)
            if summary is not None:
                return summary
        keys = sorted(activations, key=lambda key: (key[0], int(key[1])))
        tokens = token_table(samples, placements)
        started = time.thread_time()
        columns = activation_stats.TokenColumns.from_arrow(tokens, f"shard {shard}") if self.statistics else None
        columns_cpu = time.thread_time() - started

        def write_one(key):
            return self._write_activation_file(shard, samples, placements, key[0], key[1], activations[key],
                                               (reductions or {}).get(key), tokens, columns)

        # Every file is attempted and waited for before any cleanup, so no temporary file appears after it.
        if executor is None:
            outcomes = [_outcome(write_one, key) for key in keys]
        else:
            outcomes = [future.result() for future in [executor.submit(_outcome, write_one, key) for key in keys]]
        written = [result for result, _ in outcomes if result is not None]
        failures = [error for _, error in outcomes if error is not None]
        try:
            if failures:
                raise failures[0]
            d_models = {entry["d_model"] for entry in written}
            if len(d_models) > 1:
                raise ValueError(f"batch {batch_id}: activations disagree on d_model: {sorted(d_models)}")
            # One rename call for all of them: on GCS that is one batched copy and one batched delete.
            FileSystems.rename([entry["temp"] for entry in written], [entry["final"] for entry in written])
        except BaseException:
            _delete_quietly(entry["temp"] for entry in written)
            raise
        summary = self._commit(shard, batch_id, samples, written, d_models.pop(), predictions)
        summary["stats_cpu_s"] += columns_cpu + sum(entry["stats_cpu_s"] for entry in written)
        return summary

    def _commit(self, shard: str, batch_id: str, samples: Sequence[dict], written: list[dict], d_model: int,
                predictions: Sequence[dict] | None) -> dict:
        """After the activation files are in place: the statistics and predictions files, then the commit marker
        that lists them all. Returns write_shard's summary."""
        files = [entry["file"] for entry in written]
        overflow = sum(f[KEY_OVERFLOW] for f in files)
        started = time.thread_time()
        stats_entry = self._put_stats(shard, [entry["stats"] for entry in written]) if self.statistics else None
        stats_cpu = time.thread_time() - started
        predictions_entry = self._write_predictions(shard, samples, predictions)
        table = samples_table(samples)
        metadata = self._marker_metadata(shard, batch_id, d_model, table, files, overflow, stats_entry,
                                         predictions_entry)
        data = parquet_bytes(table.replace_schema_metadata(metadata))
        put_atomic(data, join(self.output_root, samples_relpath(shard)))
        return {
            "shard": shard, "batch_id": batch_id, "samples": table.num_rows,
            "tokens": int(metadata["num_tokens"]), "rows": sum(f["rows"] for f in files),
            "bytes": sum(f["bytes"] for f in files) + data.size, KEY_OVERFLOW: overflow, "files": len(files) + 1,
            "stats_bytes": stats_entry["bytes"] if stats_entry else 0, "stats_cpu_s": stats_cpu,
            "already_committed": False,
        }


def default_writer_memory_bytes() -> int:
    """How many bytes of extracted activations may wait for their writers: a quarter of the host's memory, at
    most 16 GiB (a batch of all 24 layers of Qwen2.5-0.5B at 32 x 2048 in bf16 is 2.8 GB)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return int(min(16 << 30, physical // 4))


def _activation_bytes(extracted: ExtractedBatch) -> int:
    return int(sum(np.asarray(values).nbytes for values in extracted["activations"].values()))


class _WriteShardFn(beam.DoFn):
    """Encodes and writes shards on threads (Parquet encoding, ZSTD and sha256 release the GIL), so the extractor
    goes on to the next batch while earlier ones are written. Every (hook, layer) file is its own task on a pool
    of `threads`, so one shard of many layers uses every thread; shards commit in their own threads. Batches
    waiting for their writers are bounded by count (2 x threads) and by bytes (`memory_bytes`, at least one
    batch): past either, the bundle waits for the oldest, which holds the extractor back instead of filling the
    host's memory. A bundle finishes only once all of its shards are committed, so a failed write fails the
    bundle and Beam's retry rewrites it."""

    def __init__(self, output_root, worker_prefix, model_name, compute_dtype, storage_dtype, threads=4,
                 memory_bytes=None, identity=None, activation_compression=DEFAULT_ACTIVATION_COMPRESSION):
        self._args = (output_root, worker_prefix, model_name, compute_dtype, storage_dtype)
        self._identity = identity
        self._compression = activation_compression
        self._threads = threads
        self._memory_bytes = memory_bytes
        self._shards = beam.metrics.Metrics.counter(NAMESPACE, "shards_written")
        self._samples = beam.metrics.Metrics.counter(NAMESPACE, "samples_written")
        self._rows = beam.metrics.Metrics.counter(NAMESPACE, "activation_rows_written")
        self._bytes = beam.metrics.Metrics.counter(NAMESPACE, "bytes_written")
        self._overflow = beam.metrics.Metrics.counter(NAMESPACE, "float16_overflow")
        self._skipped = beam.metrics.Metrics.counter(NAMESPACE, "shards_already_committed")
        self._waits = beam.metrics.Metrics.counter(NAMESPACE, "writer_backpressure_waits")
        self._stats_cpu = beam.metrics.Metrics.counter(NAMESPACE, STATISTICS_CPU_COUNTER)

    def setup(self):
        self._writer = ShardWriter(*self._args, skip_committed=True, identity=self._identity,
                                   activation_compression=self._compression)
        if self._writer.statistics:
            stats_kernel.load()  # compiles the statistics pass now rather than in the first shard's write
        self._files = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="shard-file")
        # Shard threads mostly wait for their files, then commit; a separate pool, so they never wait on
        # themselves.
        self._commits = concurrent.futures.ThreadPoolExecutor(2 * self._threads, thread_name_prefix="shard-commit")
        self._budget = self._memory_bytes if self._memory_bytes is not None else default_writer_memory_bytes()

    def teardown(self):
        self._commits.shutdown(wait=True)
        self._files.shutdown(wait=True)

    def start_bundle(self):
        self._pending = collections.deque()  # (future, activation bytes)
        self._pending_bytes = 0

    def _count(self, summary):
        # Beam's metric containers are per thread: count here, in the bundle's thread, not in the pool.
        if summary["already_committed"]:
            self._skipped.inc()
            return summary
        self._shards.inc()
        self._samples.inc(summary["samples"])
        self._rows.inc(summary["rows"])
        self._bytes.inc(summary["bytes"])
        self._stats_cpu.inc(int(summary["stats_cpu_s"] * 1e6))
        if summary[KEY_OVERFLOW]:
            self._overflow.inc(summary[KEY_OVERFLOW])
        return summary

    def _pop(self):
        future, size = self._pending.popleft()
        if not future.done():
            self._waits.inc()
        summary = future.result()
        self._pending_bytes -= size
        return self._count(summary)

    def process(self, extracted):
        size = _activation_bytes(extracted)
        # Room first: the new batch waits (and so does the extractor) until it fits beside the others.
        while self._pending and (len(self._pending) >= 2 * self._threads
                                 or self._pending_bytes + size > self._budget):
            yield self._pop()
        future = self._commits.submit(
            self._writer.write_shard, extracted["batch_id"], extracted["samples"], extracted["placements"],
            extracted["activations"], self._files, extracted.get("predictions"), extracted.get("statistics"))
        self._pending.append((future, size))
        self._pending_bytes += size
        while self._pending and self._pending[0][0].done():
            yield self._pop()

    def finish_bundle(self):
        while self._pending:
            yield beam.transforms.window.GlobalWindows.windowed_value(self._pop())


class WriteShards(beam.PTransform):
    """ExtractedBatch dicts -> one committed shard each; emits the per-shard summary dicts of write_shard.
    A retried element whose shard is already committed is not rewritten (skip_committed). `memory_bytes`:
    activation bytes that may wait for the writers (default: default_writer_memory_bytes()). `identity`: the run
    identity (JSON) recorded in every commit marker."""

    def __init__(self, output_root: str, worker_prefix: str, model_name: str, compute_dtype: str,
                 storage_dtype: str = "float32", threads: int = 4, memory_bytes: int | None = None,
                 identity: str | None = None, activation_compression: str = DEFAULT_ACTIVATION_COMPRESSION):
        super().__init__()
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        if threads < 1:
            raise ValueError(f"writer threads must be at least 1, got {threads}")
        if memory_bytes is not None and memory_bytes < 1:
            raise ValueError(f"writer memory must be at least 1 byte, got {memory_bytes}")
        check_worker_prefix(worker_prefix)
        check_activation_compression(activation_compression)
        self._args = (output_root, worker_prefix, model_name, compute_dtype, storage_dtype, threads, memory_bytes,
                      identity, activation_compression)

    def expand(self, extracted):
        return extracted | "WriteShard" >> beam.ParDo(_WriteShardFn(*self._args))


# ------------------------------------------------------------------------------------ reading back

def match_files(pattern: str) -> list:
    return FileSystems.match([pattern])[0].metadata_list


def _read_footer(path: str) -> pq.FileMetaData:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.ParquetFile(handle, page_checksum_verification=True).metadata


def samples_files(output_root: str) -> list[str]:
    """Committed samples files (one per shard), sorted; temporary files excluded."""
    paths = [m.path for m in match_files(join(output_root, f"{SAMPLES_DIR}/*.parquet"))]
    return sorted(p for p in paths if not basename(p).startswith(TEMP_PREFIX))


def committed_shards(output_root: str) -> dict[str, dict]:
    """shard name -> the key-value metadata of its commit marker (with `files` decoded from JSON)."""
    paths = samples_files(output_root)

    def read(path):
        return path, decode_metadata(_read_footer(path))

    shards = {}
    for path, metadata in parallel_map(read, paths):
        shard = basename(path)[:-len(".parquet")]
        if metadata.get(KEY_SHARD) != shard or KEY_FILES not in metadata:
            raise ValueError(f"{path} is not a commit marker of this format (shard metadata "
                             f"{metadata.get(KEY_SHARD)!r}, files listed: {KEY_FILES in metadata})")
        metadata["path"] = samples_relpath(shard)
        shards[shard] = metadata
    return shards


def committed_sample_ids(output_root: str) -> set[str]:
    """Every sample id in a committed shard (reads only the samples files' sample_id column)."""

    def read(path):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return pq.read_table(handle, columns=["sample_id"],
                                 page_checksum_verification=True).column("sample_id").to_pylist()

    ids: set[str] = set()
    for chunk in parallel_map(read, samples_files(output_root)):
        ids.update(chunk)
    return ids


def clean_uncommitted(output_root: str, worker_prefix: str) -> list[str]:
    """Deletes this worker's activation files that no commit marker covers and its temporary files
    (run before --resume; other workers' files are left alone). Returns the deleted paths."""
    check_worker_prefix(worker_prefix)
    committed = set(committed_shards(output_root))
    doomed = []
    for directory in (ACTIVATIONS_DIR, SAMPLES_DIR, DEAD_LETTER_DIR, activation_stats.STATS_DIR, PREDICTIONS_DIR):
        for meta in match_files(join(output_root, f"{directory}/**")):
            name = basename(meta.path)
            target = temp_target_name(name)
            if target is not None:
                if shard_worker(target.rsplit(".", 1)[0]) == worker_prefix:
                    doomed.append(meta.path)
            elif (directory, name.rsplit(".", 1)[-1]) in ((ACTIVATIONS_DIR, "parquet"),
                                                          (activation_stats.STATS_DIR, "json"),
                                                          (PREDICTIONS_DIR, "parquet")):
                shard = name.rsplit(".", 1)[0]
                if shard_worker(shard) == worker_prefix and shard not in committed:
                    doomed.append(meta.path)
    if doomed:
        FileSystems.delete(sorted(doomed))
    return sorted(doomed)


def stray_temp_files(output_root: str) -> list[str]:
    """Temporary files left by killed writers (every worker); safe to delete only when no writer is running."""
    found = []
    for directory in (ACTIVATIONS_DIR, SAMPLES_DIR, DEAD_LETTER_DIR, activation_stats.STATS_DIR, PREDICTIONS_DIR):
        found += [m.path for m in match_files(join(output_root, f"{directory}/**"))
                  if basename(m.path).startswith(TEMP_PREFIX)]
    return sorted(found)


def remove_stray_temp_files(output_root: str) -> list[str]:
    found = stray_temp_files(output_root)
    if found:
        FileSystems.delete(found)
    return found


# ------------------------------------------------------------------------------------- dead letters

DEFAULT_DEAD_LETTER_SHARDS = 4


def dead_letter_line(letter: dict) -> str:
    missing = [field for field in DEAD_LETTER_FIELDS if field not in letter]
    if missing:
        raise ValueError(f"dead letter lacks {', '.join(missing)}: {str(letter)[:200]}")
    ordered = {field: letter[field] for field in DEAD_LETTER_FIELDS}
    ordered.update({k: v for k, v in letter.items() if k not in ordered})
    return json.dumps(ordered, ensure_ascii=False, default=repr)


def write_dead_letters(output_root: str, worker_prefix: str, index: int, letters: Iterable[dict]) -> dict:
    """Writes dead_letter/<worker_prefix>-<index>.jsonl atomically, lines sorted so a rewrite is identical.
    Returns {"path", "rows", "bytes", "sha256"}."""
    lines = sorted(dead_letter_line(letter) for letter in letters)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    relpath = dead_letter_relpath(worker_prefix, index)
    put_atomic(data, join(output_root, relpath))
    return {"path": relpath, "rows": len(lines), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def remove_dead_letters(output_root: str, worker_prefix: str) -> list[str]:
    """Deletes this worker's dead-letter files: a run rewrites all of them, and a stale file from an earlier
    attempt with more shards must not survive."""
    check_worker_prefix(worker_prefix)
    doomed = []
    for meta in match_files(join(output_root, f"{DEAD_LETTER_DIR}/*")):
        name = basename(meta.path)
        target = temp_target_name(name) or name
        if target.endswith(".jsonl") and shard_worker(target[:-len(".jsonl")]) == worker_prefix:
            doomed.append(meta.path)
    if doomed:
        FileSystems.delete(sorted(doomed))
    return sorted(doomed)


class _WriteDeadLetterShard(beam.DoFn):
    def __init__(self, output_root, worker_prefix):
        self._output_root, self._worker_prefix = output_root, worker_prefix
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "dead_letters_written")

    def process(self, keyed):
        index, letters = keyed
        stats = write_dead_letters(self._output_root, self._worker_prefix, index, letters)
        self._written.inc(stats["rows"])
        yield stats


class WriteDeadLetters(beam.PTransform):
    """Dead-letter dicts -> dead_letter/<worker_prefix>-<n>.jsonl, n < num_shards.

    A letter's file is a stable hash of its content, so a retried or repeated run writes the same files."""

    def __init__(self, output_root: str, worker_prefix: str, num_shards: int = DEFAULT_DEAD_LETTER_SHARDS):
        super().__init__()
        check_worker_prefix(worker_prefix)
        self._output_root, self._worker_prefix, self._num_shards = output_root, worker_prefix, num_shards

    def expand(self, letters):
        num_shards = self._num_shards
        return (
            letters
            | "KeyByContent" >> beam.Map(lambda letter: (stable_group(dead_letter_line(letter), num_shards), letter))
            | "GroupLetters" >> beam.GroupByKey()
            | "WriteFiles" >> beam.ParDo(_WriteDeadLetterShard(self._output_root, self._worker_prefix))
        )
