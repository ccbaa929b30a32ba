"""Path (a), ours: the jitted `HookedQwen.capture` on fixed-shape token batches, batch n+1 dispatched before
batch n is fetched, as transforms/extract.py does."""
from __future__ import annotations

from typing import Optional

from model.hooks import hook_name
from pipeline.bench.settings import HOOK
from pipeline.bench.timing import time_steps

# Largest |ours - transformers| / max|transformers| on the same weights and tokens before the run is flagged.
AGREEMENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


def ours_forward(model, batches, warmup: int) -> dict:
    """Every layer, output left on the device: the accelerator's own speed."""
    import jax

    from model import CaptureSpec

    spec = CaptureSpec(hooks=(HOOK,), layers=(model.config.num_hidden_layers - 1,))
    timing = time_steps(batches, warmup, lambda batch: model.capture(*batch, spec), jax.block_until_ready)
    return {"forward_tok_s": timing.tok_s, "forward_s": timing.seconds, "forward_compile_s": timing.first_s,
            "steps": timing.steps}


def ours_copy(model, batches, warmup: int, layers, dtype: str, profile=None) -> dict:
    """The requested hooks copied to host in the dtype the extractor moves (model.dtypes.transfer_dtype),
    batch n+1 dispatched and its copy started before batch n is fetched, as ExtractActivations does."""
    import numpy as np

    from model import CaptureSpec
    from model.dtypes import transfer_dtype
    from model.handler import CaptureHandler

    spec = CaptureSpec(hooks=(HOOK,), layers=tuple(layers), out_dtype=transfer_dtype(dtype, dtype))
    first: dict = {}

    def dispatch(batch):
        return CaptureHandler.dispatch(model, CaptureHandler.prepare(model, *batch, spec))

    def collect(out):
        host = {name: np.asarray(value) for name, value in out.items()}
        if not first:
            first["bytes"] = sum(v.nbytes for v in host.values())
            first["rows"] = {layer: host[hook_name(layer, HOOK)][0].copy() for layer in layers}

    timing = time_steps(batches, warmup, dispatch, collect, profile=profile)
    return {"copy_tok_s": timing.tok_s, "copy_s": timing.seconds, "compile_s": timing.first_s,
            "host_bytes_per_token": first["bytes"] / timing.tokens_per_batch, "steps": timing.steps,
            "_first_rows": first["rows"]}


def agreement(ours_rows: dict, baseline_rows: dict, num_layers: int, dtype: str) -> Optional[dict]:
    """Ours against transformers on the first row of the first batch: proof that both ran the same weights on
    the same tokens. The last layer is left out: transformers' last hidden state is the final-normed value.
    The error is relative to the largest magnitude of the reference (bf16 keeps ~3 significant digits, and
    random-weight residual streams accumulate it over layers)."""
    import numpy as np

    layers = [layer for layer in baseline_rows if layer in ours_rows and layer < num_layers - 1]
    if not layers:
        return None
    worst = 0.0
    for layer in layers:
        ours = np.asarray(ours_rows[layer], np.float32)
        ref = np.asarray(baseline_rows[layer], np.float32)
        worst = max(worst, float(np.abs(ours - ref).max() / max(float(np.abs(ref).max()), 1e-30)))
    tolerance = AGREEMENT_TOLERANCE[dtype]
    return {"layers": layers, "max_relative_error": worst, "tolerance": tolerance, "ok": worst <= tolerance}
