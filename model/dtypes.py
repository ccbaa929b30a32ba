"""Floating-point dtypes from the device to the disk and back: the names, their numpy types, and every
conversion an activation value goes through, with what each one keeps exact.

The path of one captured value:

1. Weights (host, model.weights): the checkpoint's tensors (BF16, F16, F32 or F64 in safetensors) are converted
   to the compute dtype on the host with numpy. A bfloat16 checkpoint loaded as float32 is exact; the reverse
   rounds to nearest even, as every bfloat16 model does.
2. Compute (device, model.qwen2.forward): the forward pass runs in the compute dtype (`--dtype`,
   COMPUTE_DTYPES). float32 also asks XLA for full-precision matmuls, so float32 means float32 on GPUs and TPUs.
3. Transfer (device -> host): each captured hook is cast on the device to `CaptureSpec.out_dtype`, chosen by
   `transfer_dtype(compute, storage)`: never more bytes than storage needs, never a lossy step storage would
   not take. float32 storage of bfloat16 compute therefore crosses as bfloat16 (widened on the host, below);
   float16 storage crosses as float16 (the device rounds, and a value beyond float16's range becomes inf).
4. Host (transforms.extract, then transforms.write): `to_storage` is the one host-side conversion. Widening
   bfloat16 or float16 to float32 is exact; a value arriving in its storage dtype is kept bit for bit; float16
   storage counts overflows (values arriving as float16 count every inf, since the device's conversion cannot
   be told apart from an inf of the model itself) and the writer records the count in the file's metadata and
   a counter; bfloat16 storage of wider values is refused if it would round any of them (the device should
   have converted). Called again on its own output it returns the same values, so the extractor (which
   converts) and the writer (which counts) call the same function.
5. Disk (transforms.output_format): the stored values are written as their little-endian bytes, bit for bit.
6. Read (pipeline.dataset, pipeline.loader): `read_dtype` allows the storage dtype (bit for bit) or float32
   (exact, through `widen`); a narrowing read is refused.

So with `--activation_dtype=auto` (storage = compute dtype) the file holds exactly what the device computed;
float32 storage of bfloat16 compute is exact too, only larger; float16 storage rounds once, on the device.

Imports numpy and ml_dtypes only, so the format module and readers can use it without JAX.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_NUMPY = {"bfloat16": BFLOAT16, "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}

# Every name the model loads, computes and casts in.
FLOAT_DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
# What the pipeline's --dtype offers; the model itself also loads float16 (FLOAT_DTYPES).
COMPUTE_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
# What may leave the device (CaptureSpec.out_dtype).
TRANSFER_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# What an activation file may hold.
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# --activation_dtype=auto: store in the compute dtype (resolve_storage_dtype).
AUTO = "auto"
STORAGE_CHOICES: tuple[str, ...] = (AUTO,) + STORAGE_DTYPES
# Reads that return other values than those stored are refused; these two return the same values.
_EXACT_WIDENING = {("bfloat16", "float32"), ("float16", "float32")}


def numpy_dtype(name: str, allowed: tuple[str, ...] = FLOAT_DTYPES) -> np.dtype:
    """The numpy dtype of a dtype name (bfloat16: ml_dtypes.bfloat16); `allowed` names the valid ones."""
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(allowed)}")
    return _NUMPY[name]


def storage_numpy_dtype(storage_dtype: str) -> np.dtype:
    """The numpy dtype of stored values."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {storage_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    return _NUMPY[storage_dtype]


def itemsize(name: str) -> int:
    """Bytes per value of a dtype name."""
    return numpy_dtype(name).itemsize


def resolve_storage_dtype(compute_dtype: str, activation_dtype: str) -> str:
    """The concrete storage dtype behind --activation_dtype (auto: the compute dtype, stored exactly)."""
    return compute_dtype if activation_dtype == AUTO else activation_dtype


def transfer_dtype(compute_dtype: str, storage_dtype: str) -> str:
    """What leaves the device: the storage dtype, except that float32 storage takes the compute dtype and is
    widened exactly on the host."""
    if storage_dtype == "float32":
        return compute_dtype
    return storage_dtype


def to_storage(values: np.ndarray, storage_dtype: str) -> tuple[np.ndarray, int]:
    """`values` in the storage dtype, and how many of them are inf after a float16 conversion (0 for other
    storage dtypes). Exact or refused, but for float16's own rounding; see the module docstring."""
    target = storage_numpy_dtype(storage_dtype)
    values = np.asarray(values)
    source = values.dtype
    if source not in _NUMPY.values():
        raise ValueError(
            f"activation dtype {source} is not a compute or storage dtype (float32, bfloat16, float16): "
            "convert on the device, not through float64")
    if storage_dtype == "float32":
        return values.astype(np.float32, copy=False), 0
    if storage_dtype == "float16":
        if source == np.float16:
            # Converted before it reached us (on the device): any inf there is an overflow or an inf of the
            # model itself; both are counted, not hidden.
            return values, int(np.isinf(values).sum())
        with np.errstate(over="ignore"):  # counted just below
            stored = values.astype(np.float16)
        return stored, int((np.isinf(stored) & np.isfinite(values)).sum())
    if source == target:
        return values, 0
    rounded = values.astype(target)
    if not np.array_equal(rounded.astype(np.float32), values.astype(np.float32), equal_nan=True):
        raise ValueError(
            f"bfloat16 storage would round these {source} activations: use --activation_dtype=float32 "
            "(exact) or float16")
    return rounded, 0


def read_dtype(dtype, storage_dtype: str) -> np.dtype:
    """The numpy dtype a reader returns for `dtype` (None: the storage dtype itself): the storage dtype (bit for
    bit) or float32 (exact); a narrowing dtype is refused."""
    storage = storage_numpy_dtype(storage_dtype)
    if dtype is None:
        return storage
    try:
        target = storage_numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}") from None
    if target not in {_NUMPY[d] for d in STORAGE_DTYPES}:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if target != storage and (storage_dtype, str(target)) not in _EXACT_WIDENING:
        raise ValueError(f"dtype={dtype!r} would round the stored {storage_dtype} values; use {storage_dtype} "
                         "(bit for bit) or float32 (exact)")
    return target


def widen(values: np.ndarray, dtype) -> np.ndarray:
    """`values` in `dtype`, exactly when it is at least as wide (bfloat16 or float16 -> float32 is exact).
    bfloat16 -> float32 shifts the bits into the high half of a float32 word: the same values (NaN payloads
    included), faster than a per-element conversion."""
    target = np.dtype(dtype)
    if values.dtype == target:
        return values
    if values.dtype == BFLOAT16 and target == np.float32:
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(target)
