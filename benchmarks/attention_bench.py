"""Attention alone on this host: the blockwise (flash) path at several tile sizes against the dense path, one row
of one sequence of the Qwen2.5-0.5B attention geometry (14 query heads, 2 KV heads, head_dim 64).

    python -m benchmarks.attention_bench --length=4096 --blocks=64,128,256,512

Prints one JSON line per kernel: the best of --repeats timed calls after one compiling call.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--blocks", default="64,128,256,512")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.flash_attention import flash_attention

    rng = np.random.default_rng(0)
    length, dtype = args.length, jnp.dtype(args.dtype)
    q = jnp.asarray(rng.normal(size=(1, length, 14, 64)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(1, length, 2, 64)), dtype) for _ in range(2))
    segment_ids = jnp.ones((1, length), jnp.int32)

    def dense(q, k, v, segment_ids):
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=(same & causal)[:, None], implementation="xla")

    kernels = {f"xla block={b}": (lambda b: lambda *a: flash_attention(*a, block=b))(int(b))
               for b in args.blocks.split(",")}
    if args.dense:
        kernels["xla_dense"] = dense
    for name, fn in kernels.items():
        compiled = jax.jit(fn)
        compiled(q, k, v, segment_ids).block_until_ready()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(q, k, v, segment_ids).block_until_ready()
            times.append(time.perf_counter() - start)
        print(json.dumps({"kernel": name, "length": length, "dtype": args.dtype, "seconds": round(min(times), 3)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
