"""What the per-shard statistics cost the shard writer.

    python benchmarks/stats_bench.py [--tokens 16384] [--d_model 896] [--repeats 3] [--json]

Times `ShardWriter.write_shard` (one (hook, layer) file, checkpoint-like bf16 values as in storage_bench.py,
local disk, in one thread) best of `--repeats`, and `transforms.activation_stats.compute` alone on the same
values. Run it from a checkout without transforms/activation_stats.py to time the writer before statistics
existed (only the write is timed then). Results feed docs/format.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.storage_bench import make_samples, make_values  # noqa: E402
from transforms.write import ShardWriter  # noqa: E402


def best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d_model", type=int, default=896)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    samples, placements = make_samples(args.tokens, rng)
    for sample in samples:
        sample.update(dataset="bench", task_id=sample["sample_id"], test_index=0, augmentation='{"index": 0}')
    values = make_values("checkpoint-like", args.tokens, args.d_model, rng)
    result = {"tokens": args.tokens, "d_model": args.d_model, "storage": "bfloat16"}
    with tempfile.TemporaryDirectory() as root:
        writer = ShardWriter(root, "h000", "bench", "bfloat16", "bfloat16")
        seconds = best(lambda: writer.write_shard("0123456789abcdef", samples, placements,
                                                  {("resid_post", 6): values}), args.repeats)
        result["write_shard_tokens_per_s"] = round(args.tokens / seconds)
        result["write_shard_ms"] = round(seconds * 1e3, 1)
    try:
        from transforms import activation_stats
    except ImportError:
        result["statistics"] = "not in this checkout"
    else:
        n = args.tokens
        columns = {name: rng.integers(-1, 10, n) for name in ("row", "col", "color")}
        seconds = best(lambda: activation_stats.compute(
            values, hook="resid_post", layer=6, part=rng.integers(0, 8, n), position=np.arange(n),
            token_id=np.arange(n), sample_index=np.zeros(n, int), sample_ids=["s"], storage_dtype="bfloat16",
            **columns), args.repeats)
        result["statistics_ms"] = round(seconds * 1e3, 1)
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
