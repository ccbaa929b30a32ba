"""The loader's row moves, compiled: rows of a bfloat16 buffer gathered and widened to float32 in one pass for the
batches, rows gathered as they are, and a decoded row group's rows copied into the loader's store.

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
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

/* Streaming (non-temporal) stores write whole cache lines without first reading them into the cache: the batch
   and the store are far larger than the cache and are not read again by this loop, so a plain store would read
   every destination line from memory only to overwrite it. Each row: plain stores up to the first 64-byte
   boundary, streaming stores for whole lines, plain stores for the tail. */

static void copy_row(char *dst, const char *src, int64_t bytes, int stream)
{
#if defined(__SSE2__)
    if (stream) {
        int64_t head = (int64_t)((64 - ((uintptr_t)dst & 63)) & 63);
        if (head > bytes)
            head = bytes;
        memcpy(dst, src, head);
        int64_t j = head;
        for (; j + 64 <= bytes; j += 64) {
#if defined(__AVX512F__)
            _mm512_stream_si512((void *)(dst + j), _mm512_loadu_si512((const void *)(src + j)));
#else
            for (int k = 0; k < 64; k += 16)
                _mm_stream_si128((__m128i *)(dst + j + k), _mm_loadu_si128((const __m128i *)(src + j + k)));
#endif
        }
        memcpy(dst + j, src + j, bytes - j);
        return;
    }
#endif
    (void)stream;
    memcpy(dst, src, bytes);
}

static void widen_row(uint32_t *dst, const uint16_t *src, int64_t d, int stream)
{
    int64_t j = 0;
#if defined(__SSE2__)
    if (stream) {
        for (; j < d && ((uintptr_t)(dst + j) & 63); j++)
            dst[j] = (uint32_t)src[j] << 16;
        for (; j + 16 <= d; j += 16) {
#if defined(__AVX512F__)
            __m256i v = _mm256_loadu_si256((const __m256i *)(src + j));
            _mm512_stream_si512((void *)(dst + j), _mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
#else
            const __m128i zero = _mm_setzero_si128();
            for (int k = 0; k < 16; k += 8) {
                __m128i v = _mm_loadu_si128((const __m128i *)(src + j + k));
                _mm_stream_si128((__m128i *)(dst + j + k), _mm_unpacklo_epi16(zero, v));
                _mm_stream_si128((__m128i *)(dst + j + k + 4), _mm_unpackhi_epi16(zero, v));
            }
#endif
        }
    }
#endif
    (void)stream;
    for (; j < d; j++)
        dst[j] = (uint32_t)src[j] << 16;
}

/* The rows a gather reads lie at random in a store far larger than the cache, and the hardware prefetcher only
   starts on a row after its first misses: asking for the next row's lines while this one is copied hides them. */
static void prefetch_row(const void *row, int64_t bytes)
{
#if defined(__GNUC__)
    /* every 64-byte line the row touches, from the one its first byte lies in */
    const char *line = (const char *)((uintptr_t)row & ~(uintptr_t)63), *end = (const char *)row + bytes;
    for (; line < end; line += 64)
        __builtin_prefetch(line, 0, 0);
#else
    (void)row;
    (void)bytes;
#endif
}

static void fence(int stream)
{
#if defined(__SSE2__)
    if (stream)
        _mm_sfence();
#endif
    (void)stream;
}

/* out[i] = float32 bits of bfloat16 row src[rows[i]] */
void gather_widen_bf16(const uint16_t *restrict src, const int64_t *restrict rows, int64_t n, int64_t d,
                       uint32_t *restrict out, int stream)
{
    for (int64_t i = 0; i < n; i++) {
        if (i + 1 < n)
            prefetch_row(src + rows[i + 1] * d, d * 2);
        widen_row(out + i * d, src + rows[i] * d, d, stream);
    }
    fence(stream);
}

/* out row i = src row rows[i], rows of `row_bytes` bytes */
void gather_rows(char *restrict out, const int64_t *restrict rows, int64_t n, int64_t row_bytes,
                 const char *restrict src, int stream)
{
    for (int64_t i = 0; i < n; i++) {
        if (i + 1 < n)
            prefetch_row(src + rows[i + 1] * row_bytes, row_bytes);
        copy_row(out + i * row_bytes, src + rows[i] * row_bytes, row_bytes, stream);
    }
    fence(stream);
}

/* dst row rows[i] = src row i, rows of `row_bytes` bytes */
void scatter_rows(char *restrict dst, const int64_t *restrict rows, int64_t n, int64_t row_bytes,
                  const char *restrict src, int stream)
{
    for (int64_t i = 0; i < n; i++)
        copy_row(dst + rows[i] * row_bytes, src + i * row_bytes, row_bytes, stream);
    fence(stream);
}
"""


# Streaming stores pay off once a call writes more than a core's cache holds; below this many bytes plain stores
# leave the rows in cache for whoever reads them next.
STREAM_BYTES = 1 << 20
# The store and the batches start on a cache line, so that whole rows can be streamed.
_ALIGN = 64


def empty_aligned(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype) whose first byte lies on a 64-byte boundary (a view of a slightly larger buffer)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset:offset + size].view(dtype).reshape(shape)


class Kernel:
    """The compiled row moves of the loader. Every method takes C-contiguous 2-D arrays and the loader's own row
    indices, which must lie inside the source or destination (not checked here)."""

    def __init__(self, library: ctypes.CDLL):
        argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        self._widen = library.gather_widen_bf16
        self._gather = library.gather_rows
        self._scatter = library.scatter_rows
        for function in (self._widen, self._gather, self._scatter):
            function.argtypes, function.restype = argtypes, None

    @staticmethod
    def _stream(nbytes: int, stream: bool | None) -> int:
        return int(nbytes >= STREAM_BYTES if stream is None else stream)

    def gather_widen(self, source: np.ndarray, rows: np.ndarray, stream: bool | None = None) -> np.ndarray:
        """float32 [len(rows), d] from the uint16 [N, d] bfloat16 bits `source`."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = empty_aligned((len(rows), source.shape[1]), np.float32)
        if len(rows):
            self._widen(source.ctypes.data, rows.ctypes.data, len(rows), source.shape[1], out.ctypes.data,
                        self._stream(out.nbytes, stream))
        return out

    def gather(self, source: np.ndarray, rows: np.ndarray, stream: bool | None = None) -> np.ndarray:
        """source[rows] (same dtype)."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = empty_aligned((len(rows), source.shape[1]), source.dtype)
        if len(rows):
            self._gather(out.ctypes.data, rows.ctypes.data, len(rows), source[0].nbytes, source.ctypes.data,
                         self._stream(out.nbytes, stream))
        return out

    def scatter(self, target: np.ndarray, rows: np.ndarray, values: np.ndarray, stream: bool | None = None) -> None:
        """target[rows] = values, where values has len(rows) rows of target's row size in bytes."""
        rows = np.ascontiguousarray(rows, np.int64)
        values = np.ascontiguousarray(values)
        if len(rows) != len(values) or (len(rows) and values[0].nbytes != target[0].nbytes):
            raise ValueError(f"scatter: {len(values)} rows of {values[0].nbytes if len(values) else 0} bytes "
                             f"into {len(rows)} rows of {target[0].nbytes}")
        if len(rows):
            self._scatter(target.ctypes.data, rows.ctypes.data, len(rows), target[0].nbytes, values.ctypes.data,
                          self._stream(values.nbytes, stream))


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
        distinct = rng.permutation(len(source))[:257]
        for stream in (False, True):
            widened = gather_widen_numpy(source, rows, np.empty((64, d), np.uint16)).view(np.uint32)
            if not np.array_equal(kernel.gather_widen(source, rows, stream).view(np.uint32), widened):
                raise ValueError(f"the compiled gather disagrees with numpy (d_model {d}, streaming {stream})")
            if not np.array_equal(kernel.gather(source, rows, stream), source[rows]):
                raise ValueError(f"the compiled row gather disagrees with numpy (d_model {d}, streaming {stream})")
            # into rows of a view that starts 2 bytes past the buffer's start, so rows start off a cache line too
            target, expected = np.zeros_like(source), np.zeros_like(source)
            into = distinct[distinct < len(source) - 1]
            kernel.scatter(target[1:], into, source[:len(into)], stream)
            expected[1:][into] = source[:len(into)]
            if not np.array_equal(target, expected):
                raise ValueError(f"the compiled row scatter disagrees with numpy (d_model {d}, streaming {stream})")


def _build() -> Kernel:
    kernel = Kernel(native.compile_library("gather_kernel", _SOURCE, ["-O3"]))
    _self_check(kernel)
    return kernel


def load() -> Kernel | None:
    """The checked kernel, or None (no compiler, a failed check, or KERNEL_ENV=numpy): use gather_widen_numpy."""
    return native.load_kernel("gather_kernel", KERNEL_ENV, _build,
                              "the loader widens bfloat16 with numpy (slower, same bits)")
