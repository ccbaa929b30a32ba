"""What the per-shard statistics cost the shard writer.

    python benchmarks/stats_bench.py [--tokens 16384] [--d_model 896] [--repeats 3]

Prints, as one JSON line, the whole `ShardWriter.write_shard` rate of storage_bench.py (one (hook, layer) file of
checkpoint-like bf16 values, local disk, one thread, best of `--repeats`) and the time of
`transforms.activation_stats.compute` alone on such values. Run it from a checkout without
transforms/activation_stats.py to time the writer before statistics existed (only the write is timed then).
Results feed docs/format.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.storage_bench import _best, make_values, shard_writer_rate  # noqa: E402


def statistics_seconds(tokens: int, d_model: int, repeats: int) -> float:
    from transforms import activation_stats

    rng = np.random.default_rng(1)
    values = make_values("checkpoint-like", tokens, d_model, rng)
    cells = {name: rng.integers(-1, 10, tokens) for name in ("row", "col", "color")}
    seconds, _ = _best(lambda: activation_stats.compute(
        values, hook="resid_post", layer=12, part=rng.integers(0, 8, tokens), position=np.arange(tokens),
        token_id=np.arange(tokens), sample_index=np.zeros(tokens, int), sample_ids=["s"], storage_dtype="bfloat16",
        **cells), repeats)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--tokens", 16384), ("--d_model", 896), ("--repeats", 3)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    result = {"tokens": args.tokens, "d_model": args.d_model,
              "write_shard": shard_writer_rate(args.tokens, args.d_model, args.repeats, "bfloat16")}
    try:
        seconds = statistics_seconds(args.tokens, args.d_model, args.repeats)
    except ImportError:
        result["statistics"] = "not in this checkout"
    else:
        result["statistics_ms"] = round(seconds * 1e3, 1)
        result["statistics_tokens_per_s"] = round(args.tokens / seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
