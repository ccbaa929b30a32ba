"""What Beam's element-size sampling costs on one extracted batch, with Beam's default coder and with ours.

    python benchmarks/coder_bench.py [--tokens 65536] [--d_model 896] [--layers 1] [--repeats 3]

Beam's Python SDK sizes a sample of the elements each transform emits (every element at first, then fewer) through
the PCollection's coder: `get_estimated_size_and_observables` of the windowed value. Without a type hint the
coder is the fallback FastPrimitivesCoder, which pickles the numpy arrays to count their bytes; the hint on the
Extract output selects transforms.coders.ExtractedBatchCoder. Best of --repeats, one thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.coders import FastPrimitivesCoder  # noqa: E402
from apache_beam.coders.coders import GlobalWindowCoder, WindowedValueCoder  # noqa: E402
from apache_beam.transforms.window import GlobalWindow  # noqa: E402
from apache_beam.utils.windowed_value import WindowedValue  # noqa: E402

from transforms.coders import ExtractedBatchCoder  # noqa: E402
from transforms.elements import Placement  # noqa: E402


def extracted_batch(tokens: int, d_model: int, layers: int) -> dict:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((tokens, d_model), dtype=np.float32).astype(ml_dtypes.bfloat16)
    samples = [{"sample_id": f"s{i}", "token_ids": np.arange(2048, dtype=np.int32)} for i in range(tokens // 2048)]
    return {"batch_id": "0", "samples": samples, "placements": [Placement(i, i, 0, 2048) for i in range(len(samples))],
            "activations": {("resid_post", layer): values for layer in range(layers)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--d_model", type=int, default=896)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    element = WindowedValue(extracted_batch(args.tokens, args.d_model, args.layers), 0, [GlobalWindow()])
    for coder in (FastPrimitivesCoder(), ExtractedBatchCoder()):
        impl = WindowedValueCoder(coder, GlobalWindowCoder()).get_impl()
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            size, _ = impl.get_estimated_size_and_observables(element)
            best = min(best, time.perf_counter() - started)
        print(f"{type(coder).__name__}: {size:,} bytes estimated in {best * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
