"""Tiny random Qwen2 checkpoints written by transformers' `save_pretrained`, so tests exercise the real loading code."""
from __future__ import annotations

from pathlib import Path

from model.tokenizer import write_qwen25_tokenizer

QWEN25_VOCAB_SIZE = 151936  # what Qwen2.5 0.5B-3B configs declare; the tokenizer has 151665 ids


def write_tiny_checkpoint(
    directory,
    *,
    tie_word_embeddings: bool = True,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = QWEN25_VOCAB_SIZE,
    rope_theta: float = 1_000_000.0,
    max_shard_size: str | None = None,
    torch_dtype: str = "float32",
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Writes config.json, model.safetensors (or shards + index) and the Qwen2.5 tokenizer into `directory`.

    Weights are drawn with a larger spread than transformers' default init so that activations differ
    visibly from layer to layer (parity tests then compare real signal, not near-zero values)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        initializer_range=0.2,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / (param.shape[-1] ** 0.5))
    model = model.to(getattr(torch, torch_dtype))
    directory = Path(directory)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    if with_tokenizer:
        write_qwen25_tokenizer(directory)
    return directory
