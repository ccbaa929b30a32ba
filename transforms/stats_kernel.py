"""One fused pass over a shard's activations for transforms.activation_stats, in C through ctypes.

numpy needs about eight passes over the values for what the statistics want from them (widen, min, max, widen to
float64, sum, square, two sums of the squares); each pass costs about as much as the whole fused loop below, which
reads every value once and keeps the per-dimension accumulators in L1 cache. The loop widens each value exactly
(bfloat16 and float16 bits shifted into float32, then float64), updates the per-dimension min, max, float64 sum
and sum of squares, and sums each row's squares in numpy's own pairwise order (numpy's `pairwise_sum`, copied), so
that a token's squared norm is bit for bit what `numpy.add.reduce` of the float64 squares gives. `load()`
compiles it once per process (transforms.native) and checks it against numpy on fixed random data before use:
rows bit for bit, extrema equal, sums to 1e-12. Without a compiler, or if the check fails (a numpy whose pairwise
order differs, say), `load()` returns None and the caller keeps its numpy path, whose results agree.

ctypes releases the GIL during the call, so writer threads compute statistics in parallel.
"""
from __future__ import annotations

import ctypes

import numpy as np

from transforms import native

# Set to "numpy" to skip the compiled loop (tests compare both paths).
KERNEL_ENV = "ARC_ACTIVATIONS_STATS_KERNEL"

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* numpy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src, PW_BLOCKSIZE 128, unrolled by 8). */
static double pairwise(const double *a, int64_t n)
{
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise(a, n2) + pairwise(a + n2, n - n2);
}

/* A NaN never wins a comparison, so it stays out of min and max; it reaches the sums, where the caller looks. */
#define ACCUMULATE(v)                                  \
    do {                                               \
        mn[j] = (v) < mn[j] ? (v) : mn[j];             \
        mx[j] = (v) > mx[j] ? (v) : mx[j];             \
        double w = (v), q = w * w;                     \
        sum[j] += w;                                   \
        sumsq[j] += q;                                 \
        work[j] = q;                                   \
    } while (0)

/* restrict: the arrays never overlap, which lets the compiler vectorise the loop over dimensions. */
void stats_bf16(const uint16_t *restrict x, int64_t n, int64_t d, float *restrict mn, float *restrict mx,
                double *restrict sum, double *restrict sumsq, double *restrict rowsq, double *restrict work)
{
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = x + i * d;
        for (int64_t j = 0; j < d; j++) {
            uint32_t bits = (uint32_t)row[j] << 16;
            float v;
            memcpy(&v, &bits, 4);
            ACCUMULATE(v);
        }
        rowsq[i] = 0.0 + pairwise(work, d);
    }
}

void stats_f32(const float *restrict x, int64_t n, int64_t d, float *restrict mn, float *restrict mx,
               double *restrict sum, double *restrict sumsq, double *restrict rowsq, double *restrict work)
{
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * d;
        for (int64_t j = 0; j < d; j++) {
            float v = row[j];
            ACCUMULATE(v);
        }
        rowsq[i] = 0.0 + pairwise(work, d);
    }
}
"""

# -ffp-contract=off: no fused multiply-adds, so the squares and the pairwise sums round as numpy's do.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]


class Kernel:
    def __init__(self, library: ctypes.CDLL):
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._functions = {}
        for name in ("stats_bf16", "stats_f32"):
            function = getattr(library, name)
            function.argtypes = [pointer, size, size] + [pointer] * 6
            function.restype = None
            self._functions[name] = function

    def __call__(self, values: np.ndarray, kind: str) -> tuple[np.ndarray, ...]:
        """(min, max as float32; sum, sum of squares per dimension; sum of squares per row) of a C-contiguous
        [n, d] array of uint16 bfloat16 bits (kind "bf16") or float32 (kind "f32")."""
        n, d = values.shape
        mn, mx = np.full(d, np.inf, np.float32), np.full(d, -np.inf, np.float32)
        total, squares, rows, work = np.zeros(d), np.zeros(d), np.empty(n), np.empty(d)
        self._functions[f"stats_{kind}"](values.ctypes.data, n, d, *(a.ctypes.data for a in
                                                                      (mn, mx, total, squares, rows, work)))
        return mn, mx, total, squares, rows


def _self_check(kernel: Kernel) -> None:
    """The kernel against numpy on fixed random data of a few widths (both sides of numpy's 8 and 128)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    for d in (5, 24, 130, 896):
        values = (rng.standard_t(4, (67, d)) * rng.lognormal(0, 2, d)).astype(np.float32)
        for kind, stored in (("bf16", values.astype(ml_dtypes.bfloat16)), ("f32", values)):
            x = stored.astype(np.float64)
            raw = stored.view(np.uint16) if kind == "bf16" else stored
            mn, mx, total, squares, rows = kernel(np.ascontiguousarray(raw), kind)
            if not (np.array_equal(rows, (x * x).sum(1)) and np.array_equal(mn, x.min(0))
                    and np.array_equal(mx, x.max(0)) and np.allclose(total, x.sum(0), rtol=1e-12, atol=0)
                    and np.allclose(squares, (x * x).sum(0), rtol=1e-12, atol=0)):
                raise ValueError(f"compiled statistics disagree with numpy ({kind}, d_model {d})")


def _build() -> Kernel:
    kernel = Kernel(native.compile_library("stats_kernel", _SOURCE, _FLAGS))
    _self_check(kernel)
    return kernel


def load() -> Kernel | None:
    """The checked kernel, or None (no compiler, a failed check, or KERNEL_ENV=numpy): use numpy then."""
    return native.load_kernel("stats_kernel", KERNEL_ENV, _build,
                              "statistics use numpy (about 3x slower, same results)")
