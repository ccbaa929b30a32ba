"""Batched autoregressive generation with a KV cache: greedy decoding or seeded temperature sampling, the whole
decode loop on the device.

Shapes are fixed per call: prompts are LEFT-padded to a bucket of length T, so every row's last prompt token sits
at index T - 1 and every decode step writes the cache at one shared index (T + step - 1). Positions are per row
(index minus the row's padding), so a padded row gets exactly the positions it would have alone; padding keys are
masked out. The cache holds T + max_new_tokens slots per layer, ``[layers, batch, slots, kv_heads, head_dim]``.

One jitted program runs the prefill and a ``lax.while_loop`` over decode steps that ends when every row has stopped
(or at ``max_new_tokens``): no host round trip per token. A row stops on the first of its stop sequences (token-id
sequences: ``<|im_end|>``, ``<|endoftext|>``, and the closing grid fence as the tokenizer writes it) that its
generated tokens end with; the stop tokens are part of its output, as transformers' ``generate`` returns EOS.
After a row has stopped its remaining slots hold the pad id and log-probability 0.

Parameters and building blocks are model/qwen2.py's (stacked layer params, ``rms_norm``, ``rope_tables``,
``apply_rope``); under a mesh, rows and the cache's batch axis go over "data", KV heads over "model" where they
divide, like the forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model import dtypes
from model import sharding as sharding_lib
from model.qwen2 import apply_rope, rms_norm, rope_tables

# Room for the end-of-turn marker and a model that writes a slightly different header than asked.
ANSWER_TOKEN_MARGIN = 16
# ARC grids are at most 30 x 30; an answer's shape is unknown before it is written.
MAX_GRID_SHAPE = (30, 30)
# Prompt buckets are multiples of this, so batches of similar lengths share one compiled program.
BUCKET_MULTIPLE = 64
STOP_TABLE_MULTIPLE = 4
# The stop reason of a row that ran out of budget.
NO_STOP = "max_new_tokens"


@dataclasses.dataclass(frozen=True)
class StopSequence:
    name: str
    token_ids: tuple[int, ...]


def fence_token_ids(tokenizer) -> tuple[int, ...]:
    """The token ids that close an answer grid: "\\n```" as the tokenizer writes it after a grid row. Checked to be
    context free (the same ids after a digit as alone), so matching them at the end of the generated ids is
    exact."""
    alone = tuple(tokenizer.encode("\n```", add_special_tokens=False))
    after_row = tuple(tokenizer.encode("1 12\n```", add_special_tokens=False))
    if not alone or after_row[-len(alone):] != alone:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} writes the closing fence '\\n```' as {alone} alone "
            f"but as the tail of {after_row} after a grid row; the fence stop cannot be expressed as one token "
            "sequence: pass stop_sequences explicitly")
    return alone


def default_stop_sequences(tokenizer) -> tuple[StopSequence, ...]:
    """``<|im_end|>`` and ``<|endoftext|>`` (Qwen2.5-Instruct's generation_config stops on both), and the fence."""
    stops = []
    for name, token in (("im_end", "<|im_end|>"), ("endoftext", "<|endoftext|>")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            stops.append(StopSequence(name, (int(token_id),)))
    stops.append(StopSequence("fence", fence_token_ids(tokenizer)))
    return tuple(stops)


def max_new_tokens_for_grid(tokenizer, encoder, shape: Sequence[int] = MAX_GRID_SHAPE,
                            margin: int = ANSWER_TOKEN_MARGIN) -> int:
    """Tokens needed to write an answer grid of `shape` with `encoder` after an inference prompt (which ends with
    the opening "```grid"), through the closing fence and ``<|im_end|>``, plus `margin`. Cells take colours
    1-9 cycling, so no run of equal digits merges into fewer tokens than a real answer would use."""
    from transforms.prompts import INFERENCE_ANSWER_START

    height, width = (int(n) for n in shape)
    if not (1 <= height <= MAX_GRID_SHAPE[0] and 1 <= width <= MAX_GRID_SHAPE[1]):
        raise ValueError(f"grid shape {height}x{width} is outside ARC's 1x1..30x30")
    grid = (1 + (np.arange(height * width) % 9)).reshape(height, width).tolist()
    text = encoder.to_text(grid)
    if not text.startswith(INFERENCE_ANSWER_START):
        # Encoders without a fence (minimal, row-number...) are never prompted with one; count the grid itself.
        continuation = text
    else:
        continuation = text[len(INFERENCE_ANSWER_START):]
    return len(tokenizer.encode(continuation + "<|im_end|>", add_special_tokens=False)) + margin


def default_max_new_tokens(tokenizer, encoder) -> int:
    """The default answer budget: a 30x30 answer (ARC's largest grid) plus margin. An ARC output's shape need not
    follow its test input's (outputs grow, shrink and transpose), so the test input cannot bound it; callers that
    know the answer's shape (e.g. from the ground truth) pass it to `max_new_tokens_for_grid` instead."""
    return max_new_tokens_for_grid(tokenizer, encoder, MAX_GRID_SHAPE)


def bucket_length(longest: int, multiple: int = BUCKET_MULTIPLE) -> int:
    return -(-longest // multiple) * multiple


@dataclasses.dataclass
class GenerationResult:
    """Per row: the generated ids (stop tokens included), their log-probabilities under the model (temperature 1,
    whatever the sampling temperature), and why the row stopped (a stop sequence's name, or "max_new_tokens")."""
    tokens: list[np.ndarray]
    logprobs: list[np.ndarray]
    stop_reasons: list[str]
    steps: int
    # Seconds: host preparation and transfer, the device program (prefill + decode loop), fetching and trimming.
    timings: dict
    # [B, max_new_tokens, vocab] float32 logits of every step, only with return_logits=True (tests).
    logits: np.ndarray | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


def stop_table(stop_sequences: Sequence[StopSequence]) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences as device data, right-aligned in a [S, W] table padded with -1 (no token id) and their
    lengths; S and W are rounded up to multiples of STOP_TABLE_MULTIPLE so that changing the stops rarely
    recompiles. Row s of the table with length 0 never matches."""
    count = max(len(stop_sequences), 1)
    width = max((len(s.token_ids) for s in stop_sequences), default=1)
    count, width = (bucket_length(n, STOP_TABLE_MULTIPLE) for n in (count, width))
    table = np.full((count, width), -1, np.int32)
    lengths = np.zeros(count, np.int32)
    for row, stop in enumerate(stop_sequences):
        table[row, width - len(stop.token_ids):] = stop.token_ids
        lengths[row] = len(stop.token_ids)
    return table, lengths


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), bucket), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, bucket - len(ids):] = ids
        lengths[row] = len(ids)
    return tokens, lengths


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int | Sequence[int] = 0, bucket: int | None = None,
             stop_sequences: Sequence[StopSequence] | None = None, max_seq_len: int | None = None,
             return_logits: bool = False) -> GenerationResult:
    """Continues each prompt (a list of token ids) of `model` (a HookedQwen) by up to `max_new_tokens` tokens.

    temperature 0: greedy (the first of equal maxima, as transformers). temperature > 0: sampling from
    softmax(logits / temperature) with one key per row, PRNGKey(seed_row) folded with the step number; `seed` is one
    int (row r gets seed + r) or one per row, so a row's sample does not depend on its batch neighbours.
    `bucket`: the padded prompt length (default: the longest prompt rounded up to a multiple of 64).
    `max_seq_len`: refuse prompts whose length plus max_new_tokens exceeds it."""
    started = time.perf_counter()
    config = model.config
    prompts = _checked_prompts(prompts, config.vocab_size, max_new_tokens, temperature, max_seq_len)
    longest = max(p.size for p in prompts)
    bucket = bucket_length(longest) if bucket is None else int(bucket)
    if bucket < longest:
        raise ValueError(f"generate: bucket={bucket} is shorter than the longest prompt ({longest} tokens)")
    if stop_sequences is None:
        stop_sequences = default_stop_sequences(model.tokenizer)
    stop_sequences = tuple(stop_sequences)
    for stop in stop_sequences:
        if not stop.token_ids:
            raise ValueError(f"generate: stop sequence {stop.name!r} is empty")
    # Any id works (padding keys are masked, stopped rows are trimmed); the tokenizer's pad id reads best.
    pad_id = int(model.tokenizer.pad_token_id or 0)
    tokens, lengths = left_pad(prompts, bucket, pad_id)
    batch = len(prompts)
    seeds = _row_seeds(seed, batch)
    tokens, lengths, seeds, cache_sharding, activation_sharding = _place(
        model, tokens, lengths, seeds, bucket + max_new_tokens)
    prepared = time.perf_counter()
    stops, stop_lengths = stop_table(stop_sequences)
    out = _generate_jit(
        model.params, tokens, lengths, seeds, jnp.float32(max(temperature, 1e-6)), stops, stop_lengths,
        config=config, dtype=model.dtype, max_new_tokens=int(max_new_tokens), sample=temperature > 0,
        return_logits=return_logits, pad_id=pad_id, cache_sharding=cache_sharding,
        activation_sharding=activation_sharding)
    jax.block_until_ready(out)
    ran = time.perf_counter()
    result = _result(jax.device_get(out), [s.name for s in stop_sequences])
    done = time.perf_counter()
    result.timings = {"prepare_s": prepared - started, "device_s": ran - prepared, "fetch_s": done - ran,
                      "total_s": done - started}
    return result


def _checked_prompts(prompts, vocab_size: int, max_new_tokens, temperature, max_seq_len) -> list[np.ndarray]:
    """The prompts as arrays, once the request is known to be one generate can serve."""
    if not prompts:
        raise ValueError("generate: no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    prompts = [np.asarray(p) for p in prompts]
    for row, ids in enumerate(prompts):
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"generate: prompt {row} must be a non-empty 1-D list of token ids, got shape "
                             f"{ids.shape} dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"generate: prompt {row} holds token id {int(ids.max() if ids.max() >= 0 else ids.min())}"
                             f" outside the vocabulary 0..{vocab_size - 1}")
        if max_seq_len is not None and ids.size + max_new_tokens > max_seq_len:
            raise ValueError(f"generate: prompt {row} has {ids.size} tokens; with max_new_tokens={max_new_tokens} "
                             f"that is {ids.size + max_new_tokens} > max_seq_len={max_seq_len}")
    return prompts


def _row_seeds(seed, batch: int) -> np.ndarray:
    """One uint32 seed per row: seed + row for one int, else the given per-row seeds."""
    seeds = (np.asarray(seed, np.int64) + np.arange(batch) if np.ndim(seed) == 0 else np.asarray(seed, np.int64))
    if seeds.shape != (batch,):
        raise ValueError(f"generate: seed must be one int or one per prompt ({batch}), got shape {seeds.shape}")
    return seeds.astype(np.uint32)


def _place(model, tokens, lengths, seeds, slots: int):
    """The inputs on the model's devices, with the KV cache's and the activations' shardings (None without a
    mesh)."""
    config = model.config
    if model.mesh is None:
        return jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(seeds), None, None
    mesh = model.mesh
    batch, bucket = tokens.shape
    tokens, lengths, seeds = (jax.device_put(v, sharding_lib.batch_sharding(mesh, v.shape))
                              for v in (tokens, lengths, seeds))
    cache_shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads, config.head_dim)
    cache_sharding = jax.sharding.NamedSharding(
        mesh, sharding_lib.logical_spec(mesh, (None, "batch", None, "kv_heads", None), cache_shape))
    activation_sharding = sharding_lib.batch_sharding(mesh, (batch, bucket, config.hidden_size))
    return tokens, lengths, seeds, cache_sharding, activation_sharding


def _result(out: dict, stop_names: list[str]) -> GenerationResult:
    """The fetched device output, each row trimmed to what it generated."""
    n = out["lengths"]
    rows = range(len(n))
    return GenerationResult(
        tokens=[out["tokens"][row, :n[row]] for row in rows],
        logprobs=[out["logprobs"][row, :n[row]] for row in rows],
        stop_reasons=[stop_names[r - 1] if r > 0 else NO_STOP for r in out["reasons"]],
        steps=int(out["steps"]),
        timings={},
        logits=out.get("logits"),
    )


# --------------------------------------------------------------------------------------------- device program


def _attend(x, p, cos, sin, mask, k_cache, v_cache, layer, write_index, fresh_only, config):
    """One decoder layer over the new tokens x [B, t, D], writing their K/V at `write_index` of layer `layer`'s
    cache. `fresh_only` (the prefill, which writes slots 0..t-1) attends to the new K/V directly instead of reading
    the whole cache back."""
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    q = jnp.einsum("bld,dhk->blhk", h, p["q_w"]) + p["q_b"]
    k = jnp.einsum("bld,dhk->blhk", h, p["k_w"]) + p["k_b"]
    v = jnp.einsum("bld,dhk->blhk", h, p["v_w"]) + p["v_b"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    start = (layer, 0, write_index, 0, 0)
    k_cache = lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), start)
    v_cache = lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), start)
    if fresh_only:
        keys, values = k, v
    else:
        keys = lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        values = lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
    attended = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")
    resid_mid = x + jnp.einsum("blhk,hkd->bld", attended, p["o_w"])
    h = rms_norm(resid_mid, p["mlp_norm"], config.rms_norm_eps)
    gate = jnp.einsum("bld,df->blf", h, p["gate_w"])
    up = jnp.einsum("bld,df->blf", h, p["up_w"])
    return resid_mid + jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, p["down_w"]), k_cache, v_cache


def _run_layers(params, x, cos, sin, mask, k_cache, v_cache, write_index, fresh_only, config, constrain):
    layers = params["layers"]

    def step(carry, layer):
        x, k_cache, v_cache = carry
        p = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), layers)
        x, k_cache, v_cache = _attend(x, p, cos, sin, mask, k_cache, v_cache, layer, write_index, fresh_only,
                                      config)
        return (constrain(x), k_cache, v_cache), None

    (x, k_cache, v_cache), _ = lax.scan(step, (x, k_cache, v_cache),
                                        jnp.arange(config.num_hidden_layers, dtype=jnp.int32))
    return x, k_cache, v_cache


def _last_logits(params, x, config):
    """float32 logits [B, V] of the last position of x [B, t, D]."""
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    normed = rms_norm(x[:, -1], params["final_norm"], config.rms_norm_eps)
    return jnp.einsum("bd,vd->bv", normed, head).astype(jnp.float32)


def _choose(logits, step, seeds, temperature, sample):
    """The next token of every row and its log-probability under the model."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if sample:
        def one(seed, row_logits):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
            return jax.random.categorical(key, row_logits / temperature)

        token = jax.vmap(one)(seeds, logits).astype(jnp.int32)
    else:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def _generate(params, tokens, prompt_lengths, seeds, temperature, stops, stop_lengths, *, config, dtype,
              max_new_tokens, sample, return_logits, pad_id, cache_sharding, activation_sharding):
    compute = jnp.dtype(dtypes.numpy_dtype(dtype))
    # float32 means float32, as in the forward: no TF32/bf16 matmul passes on GPUs and TPUs.
    precision = jax.default_matmul_precision("highest") if compute == jnp.float32 else contextlib.nullcontext()
    with precision:
        return _generate_body(params, tokens, prompt_lengths, seeds, temperature, stops, stop_lengths, config,
                              compute, max_new_tokens, sample, return_logits, pad_id, cache_sharding, activation_sharding)


def _generate_body(params, tokens, prompt_lengths, seeds, temperature, stops, stop_lengths, config, compute,
                   max_new_tokens, sample, return_logits, pad_id, cache_sharding, activation_sharding):
    batch, bucket = tokens.shape
    slots = bucket + max_new_tokens

    def constrain(x, sharding=activation_sharding):
        return lax.with_sharding_constraint(x, sharding) if sharding is not None else x

    def embed(ids):
        return jnp.take(params["embed"], ids, axis=0, mode="fill", fill_value=jnp.nan).astype(compute)

    cache_shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads, config.head_dim)
    k_cache = constrain(jnp.zeros(cache_shape, compute), cache_sharding)
    v_cache = constrain(jnp.zeros(cache_shape, compute), cache_sharding)
    pads = bucket - prompt_lengths
    logits, k_cache, v_cache = _prefill(params, embed(tokens), pads, k_cache, v_cache, config, compute, constrain)
    record = _recorder(seeds, temperature, sample, stops, stop_lengths, pad_id, return_logits)
    state = _initial_state(k_cache, v_cache, stops.shape[1], max_new_tokens, pad_id,
                           logits.shape[-1] if return_logits else None)
    state = record(state, 0, logits)

    def keep_going(state):
        return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def decode(state):
        step = state["step"]
        # Feed the token chosen at step - 1: cache slot bucket + step - 1, position prompt length + step - 1.
        write_index = bucket + step - 1
        slot = jnp.arange(slots)
        mask = ((slot[None, :] >= pads[:, None]) & (slot[None, :] <= write_index))[:, None, :]
        positions = (prompt_lengths + step - 1)[:, None]
        cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, compute)
        x, k_cache, v_cache = _run_layers(params, constrain(embed(state["token"][:, None])), cos, sin, mask,
                                          state["k_cache"], state["v_cache"], write_index, False, config,
                                          constrain)
        new = record(state, step, _last_logits(params, x, config))
        new.update(step=step + 1, k_cache=constrain(k_cache, cache_sharding),
                   v_cache=constrain(v_cache, cache_sharding))
        return new

    state = lax.while_loop(keep_going, decode, state)
    out = {"tokens": state["tokens"], "logprobs": state["logprobs"], "lengths": state["lengths"],
           "reasons": state["reasons"], "steps": state["step"]}
    if return_logits:
        out["logits"] = state["logits"]
    return out


def _prefill(params, x, pads, k_cache, v_cache, config, compute, constrain):
    """The prompts x [B, bucket, D] (left-padded by `pads`) through every layer, filling the cache's first slots;
    returns the last position's logits and the cache. Causal over the bucket, padding keys masked; a padding
    query sees itself so no softmax row is empty."""
    bucket = x.shape[1]
    index = jnp.arange(bucket)
    positions = jnp.maximum(index[None, :] - pads[:, None], 0)
    real_key = index[None, :] >= pads[:, None]
    causal = index[:, None] >= index[None, :]
    mask = causal[None] & (real_key[:, None, :] | jnp.eye(bucket, dtype=bool)[None])
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, compute)
    x, k_cache, v_cache = _run_layers(params, constrain(x), cos, sin, mask, k_cache, v_cache, 0, True,
                                      config, constrain)
    return _last_logits(params, x, config), k_cache, v_cache


def _initial_state(k_cache, v_cache, width: int, max_new_tokens: int, pad_id: int, vocab: int | None) -> dict:
    """The decode loop's state before the first token: `width` columns of token history for stop matching,
    and room for the logits of every step when `vocab` is given."""
    batch = k_cache.shape[1]
    state = {
        "step": jnp.int32(1), "k_cache": k_cache, "v_cache": v_cache,
        "token": jnp.zeros((batch,), jnp.int32), "history": jnp.full((batch, width), -1, jnp.int32),
        "done": jnp.zeros((batch,), bool), "reasons": jnp.zeros((batch,), jnp.int32),
        "lengths": jnp.zeros((batch,), jnp.int32),
        "tokens": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32),
    }
    if vocab is not None:
        state["logits"] = jnp.zeros((batch, max_new_tokens, vocab), jnp.float32)
    return state


def _recorder(seeds, temperature, sample, stops, stop_lengths, pad_id, return_logits):
    """record(state, step, logits): chooses step's token from its logits and records it, its log-probability
    and whether a stop sequence ended there."""
    width = stops.shape[1]
    # Only the last `length` columns of a stop's row are compared; the others are -1 and count as matching.
    compared = jnp.arange(width)[None, :] >= (width - stop_lengths)[:, None]

    def record(state, step, logits):
        token, logprob = _choose(logits, step, seeds, temperature, sample)
        was_done = state["done"]
        history = jnp.concatenate([state["history"][:, 1:], token[:, None]], axis=1)
        # hits[b, s]: row b's generated tokens end with stop s (the stop fits in what was generated).
        equal = (history[:, None, :] == stops[None]) | ~compared[None]
        hits = jnp.all(equal, axis=2) & (stop_lengths > 0)[None] & (stop_lengths <= step + 1)[None]
        hit = jnp.any(hits, axis=1)
        # Earlier stop sequences win when several end at the same token; reasons count from 1.
        reasons = jnp.where(hit & ~was_done, jnp.argmax(hits, axis=1) + 1, state["reasons"])
        done = was_done | hit
        new = dict(state)
        new.update(
            token=token, history=history, done=done, reasons=reasons,
            lengths=jnp.where(was_done, state["lengths"], step + 1),
            tokens=state["tokens"].at[:, step].set(jnp.where(was_done, pad_id, token)),
            logprobs=state["logprobs"].at[:, step].set(jnp.where(was_done, 0.0, logprob)),
        )
        if return_logits:
            new["logits"] = state["logits"].at[:, step].set(logits)
        return new

    return record


_generate_jit = jax.jit(_generate, static_argnames=(
    "config", "dtype", "max_new_tokens", "sample", "return_logits", "pad_id", "cache_sharding",
    "activation_sharding"))
