"""Hook points (TransformerLens names), what a forward pass should capture, and option parsing for them."""
from __future__ import annotations

import dataclasses
import re

from model.dtypes import TRANSFER_DTYPES

# Short names, in the order they occur inside a block. The writer, the options, the reader and the bench take
# the vocabulary from here.
HOOKS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
BLOCK_HOOKS = HOOKS
# The final RMSNorm's normalised input: short name (an output directory `hook=ln_final`) and TransformerLens name.
FINAL_NORM_HOOK = "ln_final"
FINAL_NORM_NAME = "ln_final.hook_normalized"
LOGITS_NAME = "logits"

_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def hook_name(layer: int, hook: str) -> str:
    """The TransformerLens name of a block hook, e.g. `blocks.12.hook_resid_post`."""
    return f"blocks.{layer}.hook_{hook}"


def transformer_lens_name(hook: str, layer: int) -> str:
    """The TransformerLens name of a short hook name at a layer: `blocks.{layer}.hook_{hook}` for block hooks,
    `ln_final.hook_normalized` for the final norm (whatever the layer)."""
    if hook in BLOCK_HOOKS:
        return hook_name(int(layer), hook)
    if hook == FINAL_NORM_HOOK:
        return FINAL_NORM_NAME
    raise ValueError(f"unknown hook {hook!r}: expected one of {', '.join(BLOCK_HOOKS + (FINAL_NORM_HOOK,))}")


def split_hook_name(name: str) -> tuple[str, int]:
    """`blocks.12.hook_resid_post` -> ("resid_post", 12)."""
    match = _HOOK_NAME.match(name)
    if not match or match.group(2) not in HOOKS:
        raise ValueError(f"{name!r} is not a block hook name like 'blocks.3.hook_resid_post'")
    return match.group(2), int(match.group(1))


def parse_hooks(text: str | tuple | list, option: str = "--hooks") -> tuple[str, ...]:
    """"resid_post,mlp_out" (or "all", or TransformerLens-style "hook_resid_post") -> ("mlp_out", "resid_post"),
    in block order, without duplicates."""
    items = _split(text)
    if not items:
        raise ValueError(f"{option}: no hook given; valid hooks are {', '.join(HOOKS)} or 'all'")
    if [i.lower() for i in items] == ["all"]:
        return HOOKS
    chosen = set()
    for item in items:
        short = item.lower().removeprefix("hook_")
        if short not in HOOKS:
            raise ValueError(f"{option}: unknown hook {item!r}; valid hooks are {', '.join(HOOKS)} or 'all'")
        chosen.add(short)
    return tuple(h for h in HOOKS if h in chosen)


def parse_layers(text: str | int | tuple | list, num_layers: int | None = None, option: str = "--layers") -> tuple[int, ...]:
    """"12", "0,6,12", "0-3" (inclusive) or "all" -> sorted unique layer indices.

    With `num_layers` every index is checked against 0..num_layers-1; "all" needs it."""
    if isinstance(text, int) and not isinstance(text, bool):
        items = [str(text)]
    else:
        items = _split(text)
    if not items:
        raise ValueError(f"{option}: no layer given; write e.g. 12, 0,6,12, 0-5 or all")
    valid = f"0..{num_layers - 1}" if num_layers else "non-negative integers"
    if [i.lower() for i in items] == ["all"]:
        if num_layers is None:
            raise ValueError(f"{option}=all needs the model's layer count to expand")
        return tuple(range(num_layers))
    layers: set[int] = set()
    for item in items:
        first, dash, last = item.partition("-")
        try:
            if dash and first:
                lo, hi = int(first), int(last)
                if lo > hi:
                    raise ValueError(f"{option}: range {item!r} runs backwards; write {hi}-{lo}")
                chunk = range(lo, hi + 1)
            else:
                chunk = [int(item)]
        except ValueError as e:
            if str(e).startswith(option):
                raise
            raise ValueError(
                f"{option}: {item!r} is not a layer index; write e.g. 12, 0,6,12, 0-5 or all (valid: {valid})"
            ) from None
        for layer in chunk:
            if layer < 0 or (num_layers is not None and layer >= num_layers):
                raise ValueError(f"{option}: layer {layer} is out of range; valid layers are {valid}")
            layers.add(layer)
    return tuple(sorted(layers))


def _split(text) -> list[str]:
    if isinstance(text, (tuple, list)):
        return [str(t).strip() for t in text if str(t).strip()]
    return [t.strip() for t in str(text).split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """What one forward pass returns. Frozen and hashable: it is a static argument of the jitted forward, so each
    distinct spec compiles once per (batch, length) shape. Hooks and layers are normalised (block order, sorted,
    unique) so equal requests share a compilation."""

    hooks: tuple[str, ...] = ("resid_post",)
    layers: tuple[int, ...] = ()
    logits: bool = False
    final_norm: bool = False
    out_dtype: str | None = None

    def __post_init__(self):
        hooks = self.hooks
        if isinstance(hooks, str):
            hooks = (hooks,)
        object.__setattr__(self, "hooks", parse_hooks(tuple(hooks), option="CaptureSpec.hooks") if hooks else ())
        layers = self.layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"CaptureSpec.layers: {layer!r} is not a non-negative layer index")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if self.layers and not self.hooks:
            raise ValueError("CaptureSpec: layers are given but hooks is empty; name at least one hook")
        if self.out_dtype is not None and self.out_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"CaptureSpec.out_dtype: {self.out_dtype!r} is not one of {', '.join(TRANSFER_DTYPES)}")
        if not self.layers and not self.logits and not self.final_norm:
            raise ValueError("CaptureSpec asks for nothing: give layers (with hooks), final_norm=True or logits=True")

    def validate(self, num_layers: int) -> None:
        bad = [layer for layer in self.layers if layer >= num_layers]
        if bad:
            raise ValueError(
                f"CaptureSpec.layers: layer {bad[0]} is out of range; this model's layers are 0..{num_layers - 1}"
            )

    def deepest_layer(self, num_layers: int) -> int:
        """The last layer the forward must run: the final norm and logits need every layer."""
        if self.logits or self.final_norm:
            return num_layers - 1
        return max(self.layers)

    def output_names(self) -> tuple[str, ...]:
        names = [hook_name(layer, hook) for layer in self.layers for hook in self.hooks]
        if self.final_norm:
            names.append(FINAL_NORM_NAME)
        if self.logits:
            names.append(LOGITS_NAME)
        return tuple(names)
