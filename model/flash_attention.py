"""Memory-bounded attention in plain JAX: the flash-attention recurrence over blocks of queries and keys.

Each row is cut into blocks of `block` tokens. For query block i only key blocks lo..i are visited: blocks above
the causal diagonal are never computed, and neither are the blocks before `lo`, the first key block holding a
token of a sequence that query block i holds (in a packed row, the earlier sequences). Logits, the running
maximum and the running denominator stay in float32 (the online softmax), so nothing L x L is materialised: the
largest temporary is one [heads, block, block] float32 logit tile per step.

Rows are visited one after another (`lax.map`), and so are query blocks, so that each (row, query block) runs
exactly its own number of key blocks. This is the path for CPUs and for whatever the fused kernels (cuDNN,
splash) do not cover; those kernels remain the fast path on accelerators.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The fastest tile on CPU among those measured (docs/model.md); a tile's logits then stay in cache.
DEFAULT_BLOCK = 128
# Masked logits get this instead of -inf (as jax.nn.dot_product_attention does), so a query whose keys in the
# current tile are all masked yields exp(0) = 1 rather than NaN; the first real key then rescales that by
# exp(masked - real) = 0 exactly, and every query reaches a real key: itself, in the diagonal tile.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def effective_block(length: int, block: int = DEFAULT_BLOCK) -> int:
    """The tile size used for rows of `length` tokens: `block`, or the whole row when it is shorter."""
    if block < 1:
        raise ValueError(f"flash attention block must be a positive number of tokens, got {block}")
    return min(block, length)


def first_key_blocks(segment_ids: jax.Array, block: int) -> jax.Array:
    """[B, n] int32: for each row and query block, the first key block that may share a sequence with it.

    Each block is summarised by the interval [smallest, largest] of its real (non-zero) segment ids; two blocks
    can hold tokens of one sequence only if their intervals meet, so starting at the first such key block skips
    nothing needed, whatever the layout. With the pipeline's layout (sequences in increasing id order, padding
    after them) every block between that one and the diagonal is needed too. A query block of padding only gets
    its diagonal block: padding attends to earlier padding of that block (at least itself), which keeps it
    finite, and its values are of no meaning anyway."""
    rows, length = segment_ids.shape
    n = length // block
    seg = segment_ids.reshape(rows, n, block)
    real = seg > 0
    low = jnp.where(real, seg, jnp.iinfo(jnp.int32).max).min(axis=-1)
    high = jnp.where(real, seg, -1).max(axis=-1)
    meets = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
    index = jnp.arange(n)
    needed = meets & (index[None, None, :] <= index[None, :, None])
    return jnp.where(needed.any(axis=-1), jnp.argmax(needed, axis=-1), index[None, :]).astype(jnp.int32)


def flash_attention(q, k, v, segment_ids, *, block: int = DEFAULT_BLOCK) -> jax.Array:
    """q [B, L, H, hd], k/v [B, L, K, hd] (H a multiple of K: head h reads KV head h // (H / K), as transformers'
    repeat_kv does), segment_ids [B, L] -> [B, L, H, hd] in q's dtype. A query attends to keys of its own segment
    that are not after it. Lengths that `block` does not divide are padded with keys no query can see."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    block = effective_block(length, block)
    n = -(-length // block)
    pad = n * block - length
    if pad:
        widen = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widen) for x in (q, k, v))
        # -1 matches no real segment and no padding: the added keys are invisible to every real query.
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    segment_ids = segment_ids.astype(jnp.int32)
    lo = first_key_blocks(segment_ids, block)
    scale = jnp.float32(head_dim ** -0.5)
    q = q.reshape(batch, n, block, kv_heads, groups, head_dim)
    k = k.reshape(batch, n, block, kv_heads, head_dim)
    v = v.reshape(batch, n, block, kv_heads, head_dim)
    seg = segment_ids.reshape(batch, n, block)
    offsets = jnp.arange(block, dtype=jnp.int32)

    def row(args):
        q_row, k_row, v_row, seg_row, lo_row = args

        def query_block(i):
            q_i, seg_i = q_row[i], seg_row[i]
            query_index = i * block + offsets

            def step(j, carry):
                running_max, denominator, acc = carry
                k_j, v_j, seg_j = k_row[j], v_row[j], seg_row[j]
                logits = jnp.einsum("qkgd,skd->kgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
                visible = (seg_i[:, None] == seg_j[None, :]) & (query_index[:, None] >= (j * block + offsets)[None, :])
                logits = jnp.where(visible, logits, _MASKED)
                new_max = jnp.maximum(running_max, logits.max(axis=-1))
                rescale = jnp.exp(running_max - new_max)
                probs = jnp.exp(logits - new_max[..., None])
                denominator = denominator * rescale + probs.sum(axis=-1)
                acc = acc * rescale[..., None] + jnp.einsum(
                    "kgqs,skd->kgqd", probs.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return new_max, denominator, acc

            init = (jnp.full((kv_heads, groups, block), _MASKED, jnp.float32),
                    jnp.zeros((kv_heads, groups, block), jnp.float32),
                    jnp.zeros((kv_heads, groups, block, head_dim), jnp.float32))
            _, denominator, acc = lax.fori_loop(lo_row[i], i + 1, step, init)
            out = (acc / denominator[..., None]).astype(q_i.dtype)  # [K, G, block, hd]
            return out.transpose(2, 0, 1, 3).reshape(block, heads, head_dim)

        return lax.map(query_block, jnp.arange(n))

    out = lax.map(row, (q, k, v, seg, lo))  # [B, n, block, H, hd]
    return out.reshape(batch, n * block, heads, head_dim)[:, :length]
