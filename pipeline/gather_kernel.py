"""Rows of a bfloat16 buffer gathered and widened to float32 in one pass, for the loader's batches.

numpy needs a gather into a scratch tile and then a widening cast (`left_shift` of the bits into a uint32), and
the cast runs far below memory speed; the loop below reads each picked row once and writes its float32 row once.
Widening bfloat16 to float32 is exact: the same 16 bits in the high half of the word (NaN payloads included), so
the compiled loop and the numpy path give identical bits, which `load()` checks before the kernel is used.
"""
from __future__ import annotations

import ctypes

import numpy as np

from transforms import native

# Set to "numpy" to use the numpy path (tests compare both).
KERNEL_ENV = "ARC_ACTIVATIONS_LOADER_KERNEL"

_SOURCE = r"""
#include <stdint.h>

void gather_widen_bf16(const uint16_t *restrict src, const int64_t *restrict rows, int64_t n, int64_t d,
                       uint32_t *restrict out)
{
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = src + rows[i] * d;
        uint32_t *target = out + i * d;
        for (int64_t j = 0; j < d; j++)
            target[j] = (uint32_t)row[j] << 16;
    }
}
"""


class Kernel:
    def __init__(self, library: ctypes.CDLL):
        self._function = library.gather_widen_bf16
        self._function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_void_p]
        self._function.restype = None

    def __call__(self, source: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), d] from the C-contiguous uint16 [N, d] bfloat16 bits `source`; `rows` must lie in
        0..N-1 (not checked here: the loader's own indices)."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = np.empty((len(rows), source.shape[1]), np.float32)
        if len(rows):
            self._function(source.ctypes.data, rows.ctypes.data, len(rows), source.shape[1], out.ctypes.data)
        return out


def gather_widen_numpy(source: np.ndarray, rows: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """The numpy twin of the kernel: `tile` is uint16 scratch of shape [t, d], filled and widened t rows at a
    time so each tile is still in cache when it is widened."""
    out = np.empty((len(rows), source.shape[1]), np.float32)
    wide = out.view(np.uint32)
    for start in range(0, len(rows), len(tile)):
        chunk = rows[start:start + len(tile)]
        part = tile[:len(chunk)]
        np.take(source, chunk, axis=0, out=part)
        np.left_shift(part, 16, out=wide[start:start + len(chunk)], dtype=np.uint32)
    return out


def _self_check(kernel: Kernel) -> None:
    rng = np.random.default_rng(0)
    for d in (1, 7, 896):
        source = rng.integers(0, 1 << 16, (300, d), dtype=np.uint16)  # every bit pattern, NaNs included
        rows = rng.integers(0, len(source), 257)
        if not np.array_equal(kernel(source, rows).view(np.uint32),
                              gather_widen_numpy(source, rows, np.empty((64, d), np.uint16)).view(np.uint32)):
            raise ValueError(f"the compiled gather disagrees with numpy (d_model {d})")


def _build() -> Kernel:
    kernel = Kernel(native.compile_library("gather_kernel", _SOURCE, ["-O3"]))
    _self_check(kernel)
    return kernel


def load() -> Kernel | None:
    """The checked kernel, or None (no compiler, a failed check, or KERNEL_ENV=numpy): use gather_widen_numpy."""
    return native.load_kernel("gather_kernel", KERNEL_ENV, _build,
                              "the loader widens bfloat16 with numpy (slower, same bits)")
