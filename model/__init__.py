"""Hooked JAX Qwen2 / Qwen2.5: load a checkpoint (or random weights of a real geometry) and capture activations
at TransformerLens hook points. Knows nothing of Beam.

Names are imported lazily so that `model.tokenizer` and `model.hooks` stay cheap to import (no JAX) for the data
transforms and for processes that must set XLA flags before JAX starts."""
import importlib

_EXPORTS = {
    "QwenConfig": "model.config", "QWEN25_GEOMETRIES": "model.config", "ConfigError": "model.config",
    "HOOKS": "model.hooks", "CaptureSpec": "model.hooks", "hook_name": "model.hooks", "parse_hooks": "model.hooks",
    "parse_layers": "model.hooks", "split_hook_name": "model.hooks",
    "HookedQwen": "model.qwen2", "load_model": "model.qwen2", "load_config": "model.qwen2", "describe_spec": "model.qwen2",
    "forward_flops": "model.qwen2",
    "make_mesh": "model.sharding",
    "CheckpointError": "model.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
