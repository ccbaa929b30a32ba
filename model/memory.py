"""Pre-flight memory check: the peak device memory of one capture of the largest bucket, estimated from the
geometry alone (no weights read, nothing compiled), against what the device has.

The estimate adds what is live at the forward's high-water mark:
- the weights (every layer is loaded, whichever layers run); on CPU twice, since the host buffers they are read
  into are part of the same memory and the allocator keeps most of them after the copy;
- the batch's captured outputs, three times: the layer scan stacks them, the jitted forward slices the stack
  into one buffer per hook and layer, and the extractor keeps the previous batch's outputs on the device while
  the next batch computes;
- the residual stream and the rotary tables, alive for the whole forward;
- the largest transient of one layer: the MLP's [B, L, intermediate] tensors, or the attention workspace of the
  chosen kernel, whichever is larger (XLA frees one before the other starts). Transients are counted at 4 bytes
  per value whatever the compute dtype: XLA on CPU computes bfloat16 elementwise work in float32, and softmax
  is float32 everywhere, so on accelerators this part is an upper bound;
- the logits and the final norm when they are asked for;
- with --generate (model/generate.py), the KV cache of every layer, [layers, batch, prompt bucket +
  max_new_tokens, kv_heads, head_dim] twice in the compute dtype, with the decode loop's per-step tokens and
  log-probabilities; and the prefill's attention, which is always the dense kernel whatever --attention says, as
  one more candidate for the largest transient. The prompt bucket is taken to be the whole length (the longest a
  prompt's bucket can be), and the cache is counted as if alive with the captured outputs: an upper bound, since
  generation and capture are separate programs, but the extractor keeps the previous batch's outputs on the device
  while the next batch generates.

Attention workspace per layer: the dense path holds [B, heads, L, L] float32 logits, their exponentials and the
rounded probabilities plus a [B, L, L] mask; cuDNN on packed rows a [B, L, L] bias; the flash path one
[heads, block, block] float32 tile (three live copies) and its padded copies of q, k, v and the output; splash
and cuDNN on right-padded rows only their outputs and per-row statistics.
"""
from __future__ import annotations

import dataclasses
import math
import os

from model.config import QwenConfig
from model.dtypes import itemsize
from model.hooks import CaptureSpec

GIB = 1 << 30
# XLA's own buffers, the program and the runtime: not proportional to anything estimated above.
OVERHEAD_BYTES = 256 << 20
# What a run may plan to use of the device: XLA and the allocator fragment some of the rest.
USABLE_FRACTION = 0.9


class DeviceMemoryError(ValueError):
    """The largest bucket does not fit the device (a ValueError: the pipeline reports it as an option error)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    outputs: int
    stream: int
    layer_peak: int
    attention: int
    head: int
    # --generate only: the KV cache and decode records, and the prefill's dense attention workspace.
    generation: int = 0
    prefill_attention: int = 0

    @property
    def transient(self) -> int:
        return max(self.layer_peak, self.attention, self.prefill_attention)

    @property
    def total(self) -> int:
        return (self.weights + 3 * self.outputs + self.stream + self.transient + self.head + self.generation
                + OVERHEAD_BYTES)

    def describe(self) -> str:
        transient = ("prefill attention" if self.prefill_attention > max(self.layer_peak, self.attention) else
                     "attention" if self.attention >= self.layer_peak else "mlp")
        parts = {"weights": self.weights, "outputs x3": 3 * self.outputs, "residual": self.stream,
                 transient: self.transient, "head": self.head, "kv cache": self.generation,
                 "runtime": OVERHEAD_BYTES}
        return ", ".join(f"{name} {gib(value)}" for name, value in parts.items() if value)


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def param_count(config: QwenConfig) -> int:
    from model.weights import param_shapes

    import jax

    return int(sum(math.prod(shape) for shape in jax.tree.leaves(param_shapes(config),
                                                                  is_leaf=lambda x: isinstance(x, tuple))))


def attention_workspace(config: QwenConfig, batch: int, length: int, dtype: str, attention: str,
                        right_padded: bool = False, block: int | None = None) -> int:
    """Bytes of one layer's attention temporaries for `attention` (a resolved implementation, not auto)."""
    from model.flash_attention import DEFAULT_BLOCK, effective_block

    c = itemsize(dtype)
    t = 4  # transients: see the module docstring
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    qkv_out = batch * length * (2 * heads + 2 * kv_heads) * head_dim * c
    if attention == "xla_dense":
        return batch * length * length * (heads * (4 + 4 + t) + 1) + qkv_out
    if attention == "cudnn" and not right_padded:
        return batch * length * length * (t + 1) + qkv_out
    if attention in ("cudnn", "splash"):
        return qkv_out + batch * heads * length * 4 * 2
    tile = effective_block(length, block or DEFAULT_BLOCK)
    padded = -(-length // tile) * tile
    return (3 * heads * tile * tile * 4 + heads * tile * head_dim * 4
            + batch * padded * (2 * heads + 2 * kv_heads) * head_dim * c)


def kv_cache_bytes(config: QwenConfig, batch: int, slots: int, dtype: str) -> int:
    """Bytes of generate's K and V caches for `batch` rows of `slots` positions (model/generate.py's shape)."""
    return 2 * config.num_hidden_layers * batch * slots * config.num_key_value_heads * config.head_dim * itemsize(dtype)


def generation_bytes(config: QwenConfig, batch: int, length: int, max_new_tokens: int, dtype: str,
                     model_parallelism: int = 1) -> int:
    """The generate-only buffers that live through the decode loop: the KV cache (KV heads split over the model
    axis when they divide, as generate places them) and each step's int32 token and float32 log-probability."""
    if not max_new_tokens:
        return 0
    split = model_parallelism if config.num_key_value_heads % model_parallelism == 0 else 1
    return (kv_cache_bytes(config, batch, length + max_new_tokens, dtype) // split
            + batch * max_new_tokens * (4 + 4))


def estimate_forward_memory(config: QwenConfig, batch: int, length: int, spec: CaptureSpec, dtype: str,
                            attention: str, right_padded: bool = False, platform: str = "cpu",
                            model_parallelism: int = 1, max_new_tokens: int = 0) -> MemoryEstimate:
    """Peak device bytes of one capture of a [batch, length] bucket on one device (see the module docstring).
    `model_parallelism` devices share each weight (tensors that do not divide stay whole, such as 2 KV heads
    over 4 devices: a small part of a model, not counted). `max_new_tokens` > 0: each batch is first generated
    (--generate) from prompts bucketed to at most `length`."""
    c = itemsize(dtype)
    out = itemsize(spec.out_dtype or dtype)
    tokens = batch * length
    d = config.hidden_size
    captured = len(spec.hooks) * len(spec.layers) + int(spec.final_norm)
    logits = tokens * config.vocab_size * (4 + out) if spec.logits else 0
    return MemoryEstimate(
        weights=param_count(config) * c * (2 if platform == "cpu" else 1) // model_parallelism,
        outputs=tokens * d * out * captured + (tokens * config.vocab_size * out if spec.logits else 0),
        # residual in and out of the layer scan, the norm's float32 copy, cos and sin
        stream=tokens * (2 * d * c + d * 4 + 2 * config.head_dim * c),
        # q, k, v, the attention output and the MLP's gate, up and their product
        layer_peak=tokens * 4 * (config.q_size + 2 * config.kv_size + 3 * d + 3 * config.intermediate_size),
        attention=attention_workspace(config, batch, length, dtype, attention, right_padded),
        head=logits,
        generation=generation_bytes(config, batch, length, max_new_tokens, dtype, model_parallelism),
        prefill_attention=(attention_workspace(config, batch, length, dtype, "xla_dense") if max_new_tokens else 0),
    )


def device_memory_limit(device=None) -> tuple[int, str]:
    """(bytes, where the figure comes from): the accelerator's allocator limit, or the host's RAM on CPU."""
    if device is None:
        import jax

        device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats bytes_limit"
    return host_memory(), "host RAM"


def host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: sysconf below knows the same figure
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_forward_memory(config: QwenConfig, batch: int, length: int, spec: CaptureSpec, dtype: str,
                         attention: str, *, limit: int, limit_source: str, platform: str = "cpu",
                         data_parallelism: int = 1, model_parallelism: int = 1,
                         max_new_tokens: int = 0) -> MemoryEstimate:
    """Raises DeviceMemoryError with one line (the estimate, its parts, the limit, and a --batch_size and a
    --max_seq_len that would fit) when a [batch, length] bucket does not fit one device of `limit` bytes; returns
    the estimate otherwise. The rows are split over `data_parallelism` devices; `max_new_tokens` > 0 for
    --generate."""
    usable = int(limit * USABLE_FRACTION)
    rows = -(-batch // data_parallelism)

    def estimate_for(rows, length):
        return estimate_forward_memory(config, rows, length, spec, dtype, attention, platform=platform,
                                       model_parallelism=model_parallelism, max_new_tokens=max_new_tokens)

    estimate = estimate_for(rows, length)
    if estimate.total <= usable:
        return estimate
    fitting_batch = next((b for b in range(rows - 1, 0, -1) if estimate_for(b, length).total <= usable), None)
    # A length must leave room for a prompt besides the answer budget.
    fitting_length = next((n for n in _shorter(length) if n > max_new_tokens
                           and estimate_for(rows, n).total <= usable), None)
    advice = []
    if fitting_batch:
        advice.append(f"--batch_size={fitting_batch * data_parallelism}")
    if fitting_length:
        advice.append(f"--max_seq_len={fitting_length}")
    remedy = (" or ".join(advice) + " would fit" if advice else
              "no smaller batch or length fits: the weights alone need "
              f"{gib(estimate.weights)}; use a smaller model or more devices (--model_parallelism)")
    if attention == "xla_dense":
        remedy += "; --attention=xla keeps attention memory linear in the length"
    generating = f", generating up to {max_new_tokens} tokens" if max_new_tokens else ""
    raise DeviceMemoryError(
        f"one batch of {batch} x {length} tokens ({attention} attention, {dtype}{generating}) needs about "
        f"{gib(estimate.total)} ({estimate.describe()}) but the device has {gib(limit)} ({limit_source}, "
        f"{USABLE_FRACTION:.0%} usable): {remedy}.")


def check_run_memory(config: QwenConfig, hooks, layers, *, batch_size: int, max_seq_len: int, dtype: str,
                     out_dtype: str, attention: str, model_parallelism: int = 1,
                     max_new_tokens: int | None = None) -> MemoryEstimate:
    """The pipeline's pre-flight check on this host's devices: the largest bucket (batch_size x max_seq_len)
    with the attention kernel `attention` resolves to here, rows over the data axis as the extractor places
    them; `max_new_tokens`: --generate's resolved answer budget (None without --generate)."""
    import jax

    from model.qwen2 import resolve_attention

    devices = jax.local_devices()
    implementation = resolve_attention(attention, dtype)
    limit, source = device_memory_limit(devices[0])
    data = max(1, len(devices) // model_parallelism)
    spec = CaptureSpec(hooks=tuple(hooks), layers=tuple(layers), out_dtype=out_dtype)
    return check_forward_memory(config, batch_size, max_seq_len, spec, dtype, implementation, limit=limit,
                                limit_source=source, platform=devices[0].platform, data_parallelism=data,
                                model_parallelism=model_parallelism if len(devices) > 1 else 1,
                                max_new_tokens=int(max_new_tokens or 0))


def _shorter(length: int):
    """Candidate lengths below `length`: powers of two, the pipeline's bucket sizes, longest first."""
    n = 1 << (max(length - 1, 1).bit_length() - 1)
    while n >= 16:
        if n < length:
            yield n
        n //= 2

