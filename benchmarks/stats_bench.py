"""What the per-shard statistics cost the shard writer.

    python benchmarks/stats_bench.py [--tokens 16384] [--d_model 896] [--layers 1] [--threads 0] [--repeats 7]
                                     [--values normal,checkpoint-like]

For each kind of values (bf16, as bf16 compute produces them: `normal` is what the host-ceiling bench writes,
`checkpoint-like` what trained models look like; benchmarks/storage_bench.py), times the whole
`ShardWriter.write_shard` (tables, Parquet encoding, sha256, temporary file, rename, statistics file, samples file,
to local disk) of one shard of `--layers` (hook, layer) files, with statistics on and off, alternately in one
process so that both see the same load, and reports the medians of wall and process CPU seconds and their ratio.
`--threads N` writes a shard's files on a pool of N threads, as the pipeline does. Also times
`transforms.activation_stats.compute` alone on one (hook, layer). Prints one JSON line; results feed
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.storage_bench import make_samples, make_values  # noqa: E402


def _timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _medians(samples: list[tuple[float, float]], tokens: int) -> dict:
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    return {"wall_s": round(wall, 5), "cpu_s": round(cpu, 5), "tok_per_s": round(tokens / wall),
            "tok_per_cpu_s": round(tokens / cpu)}


def writer_on_off(kind: str, tokens: int, d_model: int, layers: int, threads: int, repeats: int) -> dict:
    """write_shard with statistics on and off, alternating (on, off, off, on, ...), after one warm-up of each."""
    from transforms.write import ShardWriter

    rng = np.random.default_rng(1)
    samples, placements = make_samples(tokens, rng)
    for sample in samples:
        sample.update(dataset="bench", task_id=sample["sample_id"], test_index=0, augmentation="{}", prompt="")
    base = make_values(kind, tokens + layers, d_model, rng)
    activations = {("resid_post", layer): base[layer:layer + tokens] for layer in range(layers)}
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        writers = {on: ShardWriter(root, "bench", "random", "bfloat16", "bfloat16", statistics=on) for on in times}
        for round_ in range(repeats + 1):
            for on in ((True, False) if round_ % 2 else (False, True)):
                sample = _timed(lambda: writers[on].write_shard("0" * 16, samples, placements, activations, pool))
                if round_:
                    times[on].append(sample)
    if pool:
        pool.shutdown()
    on, off = _medians(times[True], tokens * layers), _medians(times[False], tokens * layers)
    return {"values": kind, "with_stats": on, "without_stats": off,
            "rate_ratio": round(off["wall_s"] / on["wall_s"], 4), "cpu_ratio": round(on["cpu_s"] / off["cpu_s"], 4)}


def compute_alone(kind: str, tokens: int, d_model: int, repeats: int) -> dict:
    from transforms import activation_stats

    rng = np.random.default_rng(1)
    values = make_values(kind, tokens, d_model, rng)
    cells = {name: rng.integers(-1, 10, tokens) for name in ("row", "col", "color")}
    columns = dict(part=rng.integers(0, 8, tokens), position=np.arange(tokens), token_id=np.arange(tokens),
                   sample_index=np.zeros(tokens, int), sample_ids=["s"], storage_dtype="bfloat16", **cells)
    run = lambda: activation_stats.compute(values, hook="resid_post", layer=12, **columns)  # noqa: E731
    run()
    return {"values": kind, **_medians([_timed(run) for _ in range(repeats)], tokens)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--tokens", 16384), ("--d_model", 896), ("--layers", 1), ("--threads", 0),
                          ("--repeats", 7)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--values", default="normal,checkpoint-like")
    args = parser.parse_args(argv)
    result = {"tokens": args.tokens, "d_model": args.d_model, "layers": args.layers, "threads": args.threads,
              "repeats": args.repeats, "load_before": os.getloadavg(), "compute": [], "write_shard": []}
    for kind in args.values.split(","):
        result["compute"].append(compute_alone(kind, args.tokens, args.d_model, args.repeats))
        result["write_shard"].append(
            writer_on_off(kind, args.tokens, args.d_model, args.layers, args.threads, args.repeats))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
