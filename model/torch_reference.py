"""transformers' PyTorch Qwen2 as the reference for our activations (tests and error measurements only).

Needs torch (the `test` extra). Every sequence runs alone, unpadded, so the reference is by construction what a
packed or padded batch must reproduce. Hook points come from forward hooks on the torch modules, named as
TransformerLens names them:

    blocks.{l}.hook_resid_pre   input of decoder layer l
    blocks.{l}.hook_attn_out    output of self_attn (after o_proj)
    blocks.{l}.hook_resid_mid   input of post_attention_layernorm
    blocks.{l}.hook_mlp_out     output of mlp
    blocks.{l}.hook_resid_post  output of decoder layer l (not output_hidden_states[-1], which is after the
                                final norm)
    ln_final.hook_normalized    the final RMSNorm's input normalised, before its gain
    logits

Usage: python -m model.torch_reference CHECKPOINT_DIR [--seqs 4] [--length 64] measures our bfloat16 (and
transformers' own bfloat16) error against transformers' float32 and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from model.hooks import FINAL_NORM_NAME, HOOKS, LOGITS_NAME, hook_name


def load_torch_model(directory, dtype: str = "float32"):
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(
        str(directory), dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True,
    )
    return model.eval()


def torch_hooks(model, sequences: list[np.ndarray], logits: bool = True) -> list[dict[str, np.ndarray]]:
    """For each token sequence run alone: {TransformerLens name: float32 array [n, ...]}."""
    import torch

    layers = model.model.layers
    results = []
    for ids in sequences:
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def keep(name, value):
            value = value[0] if isinstance(value, tuple) else value
            captured[name] = value.detach()

        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=index: keep(hook_name(i, "resid_pre"),
                                                      args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(
                lambda m, args, out, i=index: keep(hook_name(i, "attn_out"), out)))
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args, i=index: keep(hook_name(i, "resid_mid"), args[0])))
            handles.append(layer.mlp.register_forward_hook(
                lambda m, args, out, i=index: keep(hook_name(i, "mlp_out"), out)))
            handles.append(layer.register_forward_hook(
                lambda m, args, out, i=index: keep(hook_name(i, "resid_post"), out)))
        norm = model.model.norm
        handles.append(norm.register_forward_pre_hook(lambda m, args: keep("_final_norm_input", args[0])))
        try:
            with torch.no_grad():
                output = model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
        finally:
            for handle in handles:
                handle.remove()
        final_input = captured.pop("_final_norm_input").float()
        normalized = final_input * torch.rsqrt(final_input.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        captured[FINAL_NORM_NAME] = normalized.to(output.logits.dtype)
        if logits:
            captured[LOGITS_NAME] = output.logits
        results.append({k: v[0].float().numpy() for k, v in captured.items()})
    return results


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: a scale-aware error that does not explode near zero values."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))


def pack_right_padded(sequences: list[np.ndarray], length: int, pad_id: int = 151643):
    """One sequence per row, right-padded. Returns tokens, segment_ids, positions, placements (row, start, n)."""
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    placements = []
    for row, ids in enumerate(sequences):
        n = len(ids)
        tokens[row, :n], segment_ids[row, :n], positions[row, :n] = ids, 1, np.arange(n)
        placements.append((row, 0, n))
    return tokens, segment_ids, positions, placements


def pack_rows(rows: list[list[np.ndarray]], length: int, pad_id: int = 151643):
    """Several sequences per row (segment ids 1.., positions restarting at 0), right-padded."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    placements = []
    for row, sequences in enumerate(rows):
        start = 0
        for segment, ids in enumerate(sequences, start=1):
            n = len(ids)
            if start + n > length:
                raise ValueError(f"row {row}: sequences need {start + n} tokens, more than length {length}")
            tokens[row, start:start + n] = ids
            segment_ids[row, start:start + n] = segment
            positions[row, start:start + n] = np.arange(n)
            placements.append((row, start, n))
            start += n
    return tokens, segment_ids, positions, placements


def compare(ours: dict, references: list[dict], placements: list[tuple[int, int, int]]) -> dict[str, float]:
    """Relative error per captured name, over every real token of every sequence."""
    errors = {}
    for name, value in ours.items():
        value = np.asarray(value, dtype=np.float32)
        got = np.concatenate([value[row, start:start + n] for row, start, n in placements])
        want = np.concatenate([ref[name] for ref in references])
        errors[name] = relative_error(got, want)
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from model.hooks import CaptureSpec
    from model.qwen2 import load_model

    rng = np.random.default_rng(args.seed)
    ours32 = load_model(args.checkpoint, dtype="float32", attention="xla")
    ours16 = load_model(args.checkpoint, dtype="bfloat16", attention="xla")
    config = ours32.config
    sequences = [rng.integers(0, 151643, size=int(rng.integers(args.length // 2, args.length + 1)))
                 for _ in range(args.seqs)]
    reference = torch_hooks(load_torch_model(args.checkpoint, "float32"), sequences)
    torch16 = torch_hooks(load_torch_model(args.checkpoint, "bfloat16"), sequences)
    batch = pack_right_padded(sequences, args.length)
    spec = CaptureSpec(hooks=HOOKS, layers=tuple(range(config.num_hidden_layers)), logits=True, final_norm=True)
    errors32 = compare(ours32.capture(*batch[:3], spec), reference, batch[3])
    errors16 = compare(ours16.capture(*batch[:3], spec), reference, batch[3])
    placements_alone = [(i, 0, len(s)) for i, s in enumerate(sequences)]
    torch_errors16 = {}
    for name in errors16:
        stacked = {name: np.stack([np.pad(t[name], [(0, args.length - len(t[name]))] + [(0, 0)] * (t[name].ndim - 1))
                                   for t in torch16])}
        torch_errors16.update(compare(stacked, reference, placements_alone))
    print(f"{args.checkpoint}: d_model {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{args.seqs} sequences of up to {args.length} tokens")
    print("| hook | ours float32 | ours bfloat16 | transformers bfloat16 |")
    print("|---|---|---|---|")
    for name in errors16:
        print(f"| {name} | {errors32[name]:.1e} | {errors16[name]:.2e} | {torch_errors16[name]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
