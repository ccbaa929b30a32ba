"""The per-dimension and per-token reductions behind the activation statistics, computed on the device beside the
capture, on activations already in device memory and masked to the real tokens.

The writer (transforms/activation_stats.py, schema in docs/format.md "Statistics") needs, per (hook, layer) of a
batch: every dimension's float64 sum and sum of squares, min, max and count of non-finite values, and every
token's float64 sum of squares (its squared L2 norm). Those are the only parts that touch every value; the rest
(histogram, top-k, groups by prompt part and grid cell) works on one number per token and stays on the host.
Here they run as one jitted program on the arrays the forward left on the device, so the host never makes its
own pass over the values: on an accelerator they cost the device a read of what it has just written, where on the
host they cost a pass over every byte of the batch (docs/benchmarks.md, "Statistics cost").

Exactness, so that stored statistics equal those recomputed on the host (`python -m pipeline.stats`) from the
files:
- values are widened to float64 (exact from bfloat16, float16 and float32), and every square of one is exact in
  float64 (at most 48 significant bits), so a fused multiply-add cannot change a result;
- a token's sum of squares is added in numpy's pairwise order (`numpy.add.reduce` over a contiguous float64 row:
  blocks of at most 128 values summed with eight interleaved accumulators, halves added recursively), written
  out as explicit additions, which XLA does not reassociate; it is bit for bit the host's (tested);
- per-dimension sums may be added in any order (XLA's reduction order): they agree with the host's to float64
  rounding, as `pipeline.stats` compares them; min, max and counts are exact.
A non-finite value is left out of every sum and extremum and counted; a token holding one has a NaN sum of
squares (no norm), as on the host.

float64 needs the device to have it: CPU and GPU do; a TPU does not (`supported`), and there the writer computes
the statistics on the host as before. No Beam here.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

# What `reduce_outputs` returns per captured array, and what the writer's statistics take
# (transforms.activation_stats.compute's `reductions`): [D] float64 sums, [D] float64 extrema, [D] int64
# counts, and [B, L] float64 per-token sums of squares (the fetch keeps the real tokens' entries, in order).
REDUCTION_FIELDS = ("dim_sum", "dim_sumsq", "dim_min", "dim_max", "dim_non_finite", "row_sumsq")
_FLOAT64_PLATFORMS = frozenset({"cpu", "gpu", "cuda", "rocm"})
_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE
_PAIRWISE_LANES = 8    # numpy's unrolling


# Where the pipeline's --statistics_on puts these passes: auto (the device on a GPU, the host elsewhere: on a CPU
# the host's compiled pass is the faster of the two, docs/benchmarks.md; a TPU has no float64), device, host.
PLACES = ("auto", "device", "host")


def supported(platform: str) -> bool:
    """Whether devices of `platform` (jax's `Device.platform`) compute float64, which the reductions need."""
    return platform.lower() in _FLOAT64_PLATFORMS


def on_device(place: str, platform: str) -> bool:
    """Whether --statistics_on=`place` computes the reductions on devices of `platform`; a clear error for a
    device without float64."""
    if place not in PLACES:
        raise ValueError(f"--statistics_on={place!r}: expected one of {', '.join(PLACES)}")
    if place == "host":
        return False
    if place == "device":
        if not supported(platform):
            raise ValueError(f"--statistics_on=device: {platform} devices have no float64, which the statistics' "
                             "exact sums need; use --statistics_on=auto or host (the writer computes them)")
        return True
    return platform.lower() != "cpu" and supported(platform)


def pairwise_sum(x):
    """Sum over the last axis in numpy's pairwise order (numpy/_core/src/umath/loops_utils.h.src), as explicit
    float additions; `transforms.stats_kernel` copies the same order in C."""
    return _pairwise(x, 0, x.shape[-1])


def _pairwise(x, start: int, n: int):
    if n < _PAIRWISE_LANES:
        total = x[..., 0] * 0.0  # numpy starts from 0.0 too
        for i in range(start, start + n):
            total = total + x[..., i]
        return total
    if n <= _PAIRWISE_BLOCK:
        # The eight accumulators as one [..., 8] slice: r[j] += a[i + j] for each full group of eight.
        lanes = x[..., start:start + _PAIRWISE_LANES]
        end = start + n - n % _PAIRWISE_LANES
        for i in range(start + _PAIRWISE_LANES, end, _PAIRWISE_LANES):
            lanes = lanes + x[..., i:i + _PAIRWISE_LANES]
        r = [lanes[..., j] for j in range(_PAIRWISE_LANES)]
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(end, start + n):
            total = total + x[..., i]
        return total
    half = n // 2
    half -= half % _PAIRWISE_LANES
    return _pairwise(x, start, half) + _pairwise(x, start + half, n - half)


def _reduce(values, mask):
    import jax.numpy as jnp
    from jax import lax

    wide = values.astype(jnp.float64)
    finite = jnp.isfinite(wide)
    real = mask[..., None]
    counted = finite & real
    clean = jnp.where(counted, wide, 0.0)
    squares = clean * clean
    # One variadic reduction for the five per-dimension results, so the values are read once for all of them
    # (separate reductions of shared operands measured 2-4x slower on XLA's CPU backend).
    operands = (clean, squares, jnp.where(counted, wide, jnp.inf), jnp.where(counted, wide, -jnp.inf),
                (real & ~finite).astype(jnp.int64))
    initial = (jnp.float64(0), jnp.float64(0), jnp.float64(jnp.inf), jnp.float64(-jnp.inf), jnp.int64(0))

    def combine(a, b):
        return a[0] + b[0], a[1] + b[1], jnp.minimum(a[2], b[2]), jnp.maximum(a[3], b[3]), a[4] + b[4]

    dim_sum, dim_sumsq, dim_min, dim_max, dim_non_finite = lax.reduce(
        operands, initial, combine, tuple(range(values.ndim - 1)))
    return {"dim_sum": dim_sum, "dim_sumsq": dim_sumsq, "dim_min": dim_min, "dim_max": dim_max,
            "dim_non_finite": dim_non_finite,
            "row_sumsq": jnp.where(finite.all(-1), pairwise_sum(squares), jnp.nan)}


@functools.lru_cache(maxsize=1)
def _jitted():
    import jax

    return jax.jit(lambda outputs, mask: {name: _reduce(values, mask) for name, values in outputs.items()})


def reduce_outputs(outputs: Mapping[str, Any], mask) -> dict[str, dict[str, Any]]:
    """{output name: {field: device array}} (REDUCTION_FIELDS) for the [B, L, D] `outputs` of a capture, over the
    tokens where `mask` ([B, L] bool) is True; returns without waiting for the device."""
    import jax

    if not outputs:
        return {}
    shapes = {np.shape(values)[:2] for values in outputs.values()}
    if len(shapes) != 1 or tuple(np.shape(mask)) != shapes.pop():
        raise ValueError(f"statistics: the mask {np.shape(mask)} must be the [batch, length] of every output "
                         f"({sorted({str(np.shape(v)) for v in outputs.values()})})")
    with jax.enable_x64(True):
        return _jitted()(dict(outputs), np.asarray(mask, dtype=bool))


def to_host(reductions: Mapping[str, Any], rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """One output's reductions on the host, `row_sumsq` reduced to the [rows, cols] tokens (the fetch's order)."""
    host = {name: np.asarray(reductions[name]) for name in REDUCTION_FIELDS}
    per_token = host["row_sumsq"]
    # One flat take rather than 2-D fancy indexing: about 3x faster, and it runs per (hook, layer) and batch.
    host["row_sumsq"] = np.take(per_token.reshape(-1), np.asarray(rows, np.int64) * per_token.shape[1] + cols)
    return host
