"""The model as the extractor drives it, shaped like Beam's `ModelHandler` (apache_beam.ml.inference.base): load
once per process for this host's devices, then for each batch prepare, dispatch and fetch.

- `load_model`: the mesh over the local devices (`local_mesh`, the one place it is built) and the weights on it.
- `prepare`: checks a [B, L] batch, detects right padding (cuDNN then skips the mask), picks the mask kind and
  places the arrays on the devices (rows over the mesh's data axis) — HookedQwen.prepare.
- `dispatch`: starts the jitted forward and the copy of its outputs to the host, without waiting for either
  (JAX dispatch is asynchronous), so the caller can work on the previous batch meanwhile.
- `fetch`: waits for the outputs and keeps the real tokens' rows, per (hook, layer).
- `dispatch_statistics` / `fetch_statistics`: the same for the statistics' reductions of those outputs over the
  real tokens, made on the device (model.statistics) when the extractor asks for them.

No Beam here: transforms/extract.py pipelines these calls (dispatch n, then fetch n-1) and counts.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, NamedTuple

import numpy as np

from model.hooks import CaptureSpec, hook_name


def local_mesh(model_parallelism: int = 1):
    """The (data, model) mesh over this host's devices, or None with one device. Local devices only: on a
    multi-host TPU slice each host works alone on its own share of the input."""
    import jax

    from model.sharding import make_mesh

    devices = jax.local_devices()
    if len(devices) <= 1:
        return None
    if len(devices) % model_parallelism:
        raise ValueError(f"--model_parallelism={model_parallelism} does not divide the {len(devices)} local devices")
    return make_mesh(data=len(devices) // model_parallelism, model=model_parallelism, devices=devices)


class Prepared(NamedTuple):
    """A batch ready for the device: the forward's arguments and its static (compile-time) arguments."""
    args: tuple
    statics: dict


class CaptureHandler:
    """Loads a model for this host and runs captures on it (see the module docstring)."""

    def __init__(self, model: str, dtype: str, attention: str = "auto", model_parallelism: int = 1):
        self.model_spec, self.dtype, self.attention = model, dtype, attention
        self.model_parallelism = model_parallelism
        self.mesh = None
        self.load_seconds = None

    def load_model(self):
        """The HookedQwen on this host's devices (sharded over their mesh when there are several)."""
        from model.qwen2 import load_model

        self.mesh = local_mesh(self.model_parallelism)
        started = time.perf_counter()
        model = load_model(self.model_spec, dtype=self.dtype, mesh=self.mesh, attention=self.attention)
        self.load_seconds = time.perf_counter() - started
        return model

    @staticmethod
    def prepare(model, tokens, segment_ids, positions, spec: CaptureSpec,
                right_padded: bool | None = None) -> Prepared:
        """tokens, segment_ids, positions: int [B, L]; numpy inputs are checked and their right padding detected
        (device arrays: see HookedQwen.capture)."""
        return Prepared(*model.prepare(tokens, segment_ids, positions, spec, right_padded))

    @staticmethod
    def dispatch(model, prepared: Prepared) -> dict[str, Any]:
        """Starts the capture and the copy of its outputs to the host; returns at once."""
        outputs = model.run(prepared.args, prepared.statics)
        for value in outputs.values():
            value.copy_to_host_async()
        return outputs

    @staticmethod
    def dispatch_statistics(model, outputs: dict[str, Any], keys: Iterable[tuple[str, int]], mask: np.ndarray
                            ) -> dict[str, Any]:
        """Starts the statistics' reductions (model.statistics) of the outputs of `keys` over the real tokens
        (`mask`, [B, L] bool) and their copy to the host; returns at once."""
        names = {hook_name(layer, hook) for hook, layer in keys}
        reductions = model.reduce_statistics({name: outputs[name] for name in sorted(names)}, mask)
        for fields in reductions.values():
            for value in fields.values():
                if hasattr(value, "copy_to_host_async"):
                    value.copy_to_host_async()
        return reductions

    @staticmethod
    def fetch_statistics(reductions: dict[str, Any], keys: Iterable[tuple[str, int]], rows: np.ndarray,
                         cols: np.ndarray) -> dict[tuple[str, int], dict[str, np.ndarray]]:
        """The reductions of `keys` on the host, per-token fields reduced to the [rows, cols] tokens."""
        from model.statistics import to_host

        return {(hook, layer): to_host(reductions[hook_name(layer, hook)], rows, cols) for hook, layer in keys}

    @staticmethod
    def fetch(outputs: dict[str, Any], keys: Iterable[tuple[str, int]], rows: np.ndarray,
              cols: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """The outputs of `keys` ((hook, layer) pairs) on the host, each reduced to the [rows, cols] tokens."""
        return {(hook, layer): np.asarray(outputs[hook_name(layer, hook)])[rows, cols] for hook, layer in keys}
