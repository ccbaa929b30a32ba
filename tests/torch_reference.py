"""transformers' PyTorch Qwen2 as the reference: every TransformerLens hook point of one sequence, float32, CPU."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def reference_model(checkpoint_dir: str):
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_activations(checkpoint_dir, token_ids) -> dict[str, np.ndarray]:
    """{"blocks.{l}.hook_{name}": [n, d_model], "ln_final.hook_normalized": [n, d_model]} for one unpadded sequence."""
    import torch

    model = reference_model(str(checkpoint_dir))
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    for index, layer in enumerate(model.model.layers):
        def pre(module, args, kwargs, index=index):
            captured[f"blocks.{index}.hook_resid_pre"] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, output, index=index):
            captured[f"blocks.{index}.hook_resid_post"] = first(output)

        def attn(module, args, output, index=index):
            captured[f"blocks.{index}.hook_attn_out"] = first(output)

        def mlp(module, args, output, index=index):
            captured[f"blocks.{index}.hook_mlp_out"] = first(output)

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post),
            layer.self_attn.register_forward_hook(attn),
            layer.mlp.register_forward_hook(mlp),
        ]
    handles.append(model.model.norm.register_forward_hook(
        lambda module, args, output: captured.__setitem__("ln_final.hook_normalized", first(output))))
    try:
        with torch.no_grad():
            model(torch.tensor([list(token_ids)], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    out = {name: value[0].detach().cpu().numpy().astype(np.float32) for name, value in captured.items()}
    for index in range(len(model.model.layers)):
        out[f"blocks.{index}.hook_resid_mid"] = (
            out[f"blocks.{index}.hook_resid_pre"] + out[f"blocks.{index}.hook_attn_out"])
    return out


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-30))
