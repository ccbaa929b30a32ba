"""Bytes on disk per stored activation value, and encode/decode speed, for each storage option.

    python benchmarks/storage_bench.py [--tokens 16384] [--d_model 896] [--repeats 3] [--json]

Encodes activation files exactly as the shard writer does (transforms.write.activation_table + the writer's
Parquet options) on one core, for two value distributions, rounded to bfloat16 as bf16 compute produces them:
* normal: standard normal values;
* checkpoint-like: what residual streams of trained LLMs look like: heavy-tailed (Student t, 4 degrees of
  freedom) with a per-dimension log-normal scale, a few "massive" dimensions 100x larger, and attention-sink
  tokens (the first of each sample) 30x larger.
Bytes per value count the whole file (token ids, annotations, footer included) divided by rows x d_model; the
activation column alone is also shown. Results feed docs/format.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from transforms.write import ROW_GROUP_BYTES, _parquet_bytes, activation_table, activations_to_numpy  # noqa: E402

SAMPLE_TOKENS = 2048


def make_samples(tokens: int, rng) -> tuple[list[dict], list[tuple]]:
    samples, placements, left = [], [], tokens
    while left:
        n = min(SAMPLE_TOKENS, left)
        index = len(samples)
        samples.append({
            "sample_id": f"arc-agi-1/train:{index:08x}/t0/a0", "token_ids": rng.integers(0, 151_000, n).astype(np.int32),
            "annotations": {"part": rng.integers(0, 8, n).astype(np.int8),
                            "example_index": rng.integers(-1, 4, n).astype(np.int16),
                            "row": rng.integers(-1, 30, n).astype(np.int16),
                            "col": rng.integers(-1, 30, n).astype(np.int16),
                            "color": rng.integers(-1, 10, n).astype(np.int8)}})
        placements.append((index, index, 0, n))
        left -= n
    return samples, placements


def make_values(kind: str, tokens: int, d_model: int, rng) -> np.ndarray:
    if kind == "normal":
        values = rng.standard_normal((tokens, d_model), dtype=np.float32)
    elif kind == "checkpoint-like":
        scale = rng.lognormal(0.0, 0.5, d_model).astype(np.float32)
        scale[rng.choice(d_model, 4, replace=False)] *= 100.0
        values = rng.standard_t(4, (tokens, d_model)).astype(np.float32) * scale
        values[::SAMPLE_TOKENS] *= 30.0
    else:
        raise ValueError(kind)
    return values.astype(ml_dtypes.bfloat16)


def encode(table, storage_dtype, level, byte_stream_split=True):
    d_model = table.schema.field("activation").type.list_size
    itemsize = 4 if storage_dtype == "float32" else 2
    return _parquet_bytes(table, byte_stream_split=("activation",) if byte_stream_split else (),
                          row_group_size=max(1024, ROW_GROUP_BYTES // (d_model * itemsize)), compression_level=level)


def activation_column_bytes(data) -> int:
    footer = pq.ParquetFile(pa.BufferReader(data)).metadata
    total = 0
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in range(group.num_columns):
            if group.column(c).path_in_schema.startswith("activation."):
                total += group.column(c).total_compressed_size
    return total


def run(tokens: int, d_model: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    samples, placements = make_samples(tokens, rng)
    configs = [("float32", 1, True), ("float32", 3, True), ("float32", 1, False), ("float16", 1, True),
               ("bfloat16", 1, True)]
    results = []
    for kind in ("normal", "checkpoint-like"):
        bf16 = make_values(kind, tokens, d_model, rng)
        for storage, level, bss in configs:
            table = activation_table(samples, placements, bf16, "resid_post", 12, storage)
            encode(table, storage, level, bss)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                data = encode(table, storage, level, bss)
            encode_s = (time.perf_counter() - start) / repeats
            start = time.perf_counter()
            for _ in range(repeats):
                back = activations_to_numpy(pq.read_table(pa.BufferReader(data)))
            decode_s = (time.perf_counter() - start) / repeats
            if storage != "float16":
                assert np.array_equal(back.astype(np.float32).view(np.uint32),
                                      bf16.astype(np.float32).view(np.uint32)), "storage is not exact"
            values = tokens * d_model
            build_start = time.perf_counter()
            activation_table(samples, placements, bf16, "resid_post", 12, storage)
            build_s = time.perf_counter() - build_start
            results.append({
                "distribution": kind, "storage": storage, "zstd_level": level,
                "encoding": "BYTE_STREAM_SPLIT" if bss else "PLAIN",
                "bytes_per_value": round(data.size / values, 3),
                "activation_column_bytes_per_value": round(activation_column_bytes(data) / values, 3),
                "encode_tokens_per_s": round(tokens / (encode_s + build_s)),
                "encode_MB_per_s_of_bf16": round(values * 2 / (encode_s + build_s) / 1e6),
                "decode_tokens_per_s": round(tokens / decode_s),
                "exact": storage != "float16",
            })
    return results


def shard_writer_rate(tokens: int, d_model: int, repeats: int) -> dict:
    """Whole ShardWriter.write_shard (tables, encoding, sha256, temp file, rename, samples file) to local disk."""
    import tempfile

    from transforms.write import ShardWriter

    rng = np.random.default_rng(1)
    samples, placements = make_samples(tokens, rng)
    for sample in samples:
        sample.update(dataset="bench", task_id=sample["sample_id"], test_index=0, augmentation="{}", prompt="")
    values = make_values("checkpoint-like", tokens, d_model, rng)
    with tempfile.TemporaryDirectory() as root:
        writer = ShardWriter(root, "bench", "random", "bfloat16", "float32")
        writer.write_shard("0" * 16, samples, placements, {("resid_post", 12): values})
        start = time.perf_counter()
        for _ in range(repeats):
            stats = writer.write_shard("0" * 16, samples, placements, {("resid_post", 12): values})
        seconds = (time.perf_counter() - start) / repeats
    return {"tokens_per_s": round(tokens / seconds), "MB_per_s_written": round(stats["bytes"] / seconds / 1e6, 1),
            "bytes_per_value": round(stats["bytes"] / (tokens * d_model), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d_model", type=int, default=896)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.tokens, args.d_model, args.repeats)
    writer = shard_writer_rate(args.tokens, args.d_model, args.repeats)
    if args.json:
        print(json.dumps({"encodings": results, "shard_writer": writer}, indent=1))
        return 0
    print(f"{args.tokens} tokens x d_model {args.d_model}, bf16 values, pyarrow {pa.__version__}, one core\n")
    print("| distribution | storage | encoding | zstd | bytes/value (file) | bytes/value (activation column) "
          "| encode tok/s | encode MB/s (bf16) | decode tok/s | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['distribution']} | {r['storage']} | {r['encoding']} | {r['zstd_level']} | "
              f"{r['bytes_per_value']} | {r['activation_column_bytes_per_value']} | {r['encode_tokens_per_s']:,} | "
              f"{r['encode_MB_per_s_of_bf16']} | {r['decode_tokens_per_s']:,} | {r['exact']} |")
    print(f"\nShardWriter.write_shard, one hook and layer, float32 storage, checkpoint-like values, local disk: "
          f"{writer['tokens_per_s']:,} tokens/s, {writer['MB_per_s_written']} MB/s written, "
          f"{writer['bytes_per_value']} bytes/value including the samples file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
