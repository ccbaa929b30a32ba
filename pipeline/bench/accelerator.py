"""What the bench knows about the device: peak rates, FLOPs per token, memory, traces, and the description that
goes into the results."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
from pathlib import Path
from typing import Optional

from pipeline.bench.settings import HOOK

# Dense bf16 peak TFLOP/s by device kind (vendor data sheets, no sparsity). Matched in order on
# `jax.devices()[0].device_kind`, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def flops_per_token(config, length: int, layers_run: int) -> float:
    """Forward FLOPs per token through the first `layers_run` layers at sequence length `length`, LM head
    excluded, as model.qwen2.forward_flops counts them (matmuls at 2 per weight, plus causal attention scores
    and values: about 4 * length * heads * head_dim / 2 per layer)."""
    from model import CaptureSpec
    from model.qwen2 import forward_flops

    spec = CaptureSpec(hooks=(HOOK,), layers=(layers_run - 1,))
    return forward_flops(config, 1, length, spec) / length


def default_peak_tflops(device_kind: str, platform_name: str, dtype: str) -> Optional[float]:
    if platform_name == "cpu" or dtype != "bfloat16":
        return None
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def mfu(tokens_per_s, flops_token, peak_tflops):
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def device_memory() -> dict:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def free_jax_memory() -> None:
    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


def profiled(profile_dir: Optional[Path], name: str):
    """A JAX profiler trace of the block under profile_dir/name, or nothing."""
    if profile_dir is None:
        return contextlib.nullcontext()
    import jax

    return jax.profiler.trace(str(profile_dir / name))


def device_description(baseline_device: Optional[str]) -> dict:
    import jax

    devices = jax.devices()
    info = {"jax_platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "host": platform.node(), "cpu_count": os.cpu_count(),
            "baseline_device": baseline_device}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
    except OSError:
        info["cpu_model"] = platform.processor() or None
    if baseline_device == "cuda":
        import torch

        info["torch_device_name"] = torch.cuda.get_device_name(0)
    return info
