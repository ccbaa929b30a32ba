"""What the per-shard statistics cost the shard writer.

    python benchmarks/stats_bench.py [--tokens 16384] [--d_model 896] [--layers 1] [--threads 0] [--repeats 7]
                                     [--values normal,checkpoint-like]

For each kind of values (bf16, as bf16 compute produces them: `normal` is what the host-ceiling bench writes,
`checkpoint-like` what trained models look like; benchmarks/storage_bench.py), times the whole
`ShardWriter.write_shard` (tables, Parquet encoding, sha256, temporary file, rename, statistics file, samples file,
to local disk) of one shard of `--layers` (hook, layer) files in four modes: statistics off, on with the passes
over the values made on the device (the writer then gets their reductions: --statistics_on=device), on through
the writer's compiled pass (transforms.stats_kernel) and on through its numpy pass, alternately in one process so that all see
the same load; reports the medians of wall and process CPU seconds and their ratios to "off". `--threads N` writes
a shard's files on a pool of N threads, as the pipeline does. Also times `transforms.activation_stats.compute`
alone on one (hook, layer), both passes. Prints one JSON line; results feed
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


# Writer modes timed alternately: statistics off; on, with the passes over the values made on the device
# (--statistics_on=device: the writer gets their reductions, made here before the clock starts); on through the
# writer's compiled pass; on through its numpy pass.
MODES = ("off", "device", "compiled", "numpy")


def _set_mode(mode: str) -> bool:
    from transforms.stats_kernel import KERNEL_ENV

    os.environ[KERNEL_ENV] = "numpy" if mode == "numpy" else ""
    return mode != "off"


def device_reductions(activations: dict) -> dict:
    """What model.statistics hands the writer for these [n, d] arrays (all tokens real), computed here on the host
    with the writer's own pass, which gives the same numbers (tests/test_device_statistics.py)."""
    from transforms.activation_stats import host_reductions

    return {key: host_reductions(values) for key, values in activations.items()}


def writer_modes(kind: str, tokens: int, d_model: int, layers: int, threads: int, repeats: int) -> dict:
    """write_shard in every mode, the order rotating each round, after one warm-up round."""
    from transforms.write import ShardWriter

    rng = np.random.default_rng(1)
    samples, placements = make_samples(tokens, rng)
    for sample in samples:
        sample.update(dataset="bench", task_id=sample["sample_id"], test_index=0, augmentation="{}", prompt="")
    base = make_values(kind, tokens + layers, d_model, rng)
    activations = {("resid_post", layer): base[layer:layer + tokens] for layer in range(layers)}
    reductions = device_reductions(activations)
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    times = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(repeats + 1):
            for mode in MODES[round_ % len(MODES):] + MODES[:round_ % len(MODES)]:
                writer = ShardWriter(root, "bench", "random", "bfloat16", "bfloat16", statistics=_set_mode(mode))
                given = reductions if mode == "device" else None
                sample = _timed(lambda: writer.write_shard("0" * 16, samples, placements, activations, pool,
                                                           reductions=given))
                if round_:
                    times[mode].append(sample)
    _set_mode("compiled")
    if pool:
        pool.shutdown()
    result = {"values": kind, **{mode: _medians(times[mode], tokens * layers) for mode in MODES}}
    for mode in MODES[1:]:
        result[f"{mode}_rate_vs_off"] = round(result["off"]["wall_s"] / result[mode]["wall_s"], 4)
        result[f"{mode}_cpu_vs_off"] = round(result[mode]["cpu_s"] / result["off"]["cpu_s"], 4)
    return result


def compute_alone(kind: str, tokens: int, d_model: int, repeats: int) -> dict:
    """activation_stats.compute on one (hook, layer), compiled and numpy passes alternately."""
    from transforms import activation_stats

    rng = np.random.default_rng(1)
    values = make_values(kind, tokens, d_model, rng)
    cells = {name: rng.integers(-1, 10, tokens) for name in ("row", "col", "color")}
    columns = dict(part=rng.integers(0, 8, tokens), position=np.arange(tokens), token_id=np.arange(tokens),
                   sample_index=np.zeros(tokens, int), sample_ids=["s"], storage_dtype="bfloat16", **cells)
    run = lambda: activation_stats.compute(values, hook="resid_post", layer=12, **columns)  # noqa: E731
    passes = ("compiled", "numpy")
    times = {mode: [] for mode in passes}
    for round_ in range(repeats + 1):
        for mode in (passes if round_ % 2 else passes[::-1]):
            _set_mode(mode)
            sample = _timed(run)
            if round_:
                times[mode].append(sample)
    _set_mode("compiled")
    return {"values": kind, **{mode: _medians(samples, tokens) for mode, samples in times.items()}}


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
            writer_modes(kind, args.tokens, args.d_model, args.layers, args.threads, args.repeats))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
