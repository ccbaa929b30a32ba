"""Qwen2 weights: Hugging Face safetensors (local directory, hub cache, sharded) or random, as a plain pytree.

Parameter tree (layer parameters stacked on a leading layer axis so the forward can `lax.scan` over them):

    {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (untied checkpoints only),
     "layers": {"attn_norm": [N, D], "q_w": [N, D, H, hd], "q_b": [N, H, hd], "k_w": [N, D, K, hd],
                "k_b": [N, K, hd], "v_w": [N, D, K, hd], "v_b": [N, K, hd], "o_w": [N, H, hd, D],
                "mlp_norm": [N, D], "gate_w": [N, D, I], "up_w": [N, D, I], "down_w": [N, I, D]}}

Every Hugging Face tensor goes through the one table `WEIGHT_TABLE`: its key, its expected shape, how it becomes
the parameter, the parameter's logical axes (used for sharding) and how a random model initialises it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from model.config import QwenConfig
from model.dtypes import numpy_dtype

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some old exports saved; they are recomputed from rope_theta, so they carry no information.
_DERIVED_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the file, key and what to do."""


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    hf_key: str                                        # "{layer}" stands for the layer index
    path: tuple[str, ...]                              # where the parameter sits in the tree
    hf_shape: Callable[[QwenConfig], tuple[int, ...]]  # the tensor's shape in the checkpoint
    to_param: Callable[[np.ndarray, QwenConfig], np.ndarray]
    axes: tuple[str | None, ...]                       # logical axes of one layer's parameter
    init: str                                          # "normal" (scaled by fan_in), "embed", "ones", "bias"
    fan_in: Callable[[QwenConfig], int] = lambda c: 1

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_key

    def param_shape(self, config: QwenConfig) -> tuple[int, ...]:
        per_layer = self.to_param(np.empty(self.hf_shape(config), dtype=np.int8), config).shape
        return ((config.num_hidden_layers,) + per_layer) if self.per_layer else per_layer

    def logical_axes(self) -> tuple[str | None, ...]:
        return (("layers",) + self.axes) if self.per_layer else self.axes


def _same(t, c):
    return t


def _in_heads(heads: Callable[[QwenConfig], int]):
    """[heads*hd, D] (torch Linear: out x in) -> [D, heads, hd]."""
    return lambda t, c: t.T.reshape(c.hidden_size, heads(c), c.head_dim)


def _bias_heads(heads: Callable[[QwenConfig], int]):
    return lambda t, c: t.reshape(heads(c), c.head_dim)


def _transpose(t, c):
    return t.T


def _heads(c: QwenConfig) -> int:
    return c.num_attention_heads


def _kv_heads(c: QwenConfig) -> int:
    return c.num_key_value_heads


_L = "model.layers.{layer}."
WEIGHT_TABLE: tuple[WeightEntry, ...] = (
    WeightEntry("model.embed_tokens.weight", ("embed",), lambda c: (c.vocab_size, c.hidden_size), _same,
                ("vocab", "embed"), "embed"),
    WeightEntry(_L + "input_layernorm.weight", ("layers", "attn_norm"), lambda c: (c.hidden_size,), _same,
                ("embed",), "ones"),
    WeightEntry(_L + "self_attn.q_proj.weight", ("layers", "q_w"), lambda c: (c.q_size, c.hidden_size),
                _in_heads(_heads), ("embed", "heads", "head_dim"), "normal", lambda c: c.hidden_size),
    WeightEntry(_L + "self_attn.q_proj.bias", ("layers", "q_b"), lambda c: (c.q_size,), _bias_heads(_heads),
                ("heads", "head_dim"), "bias"),
    WeightEntry(_L + "self_attn.k_proj.weight", ("layers", "k_w"), lambda c: (c.kv_size, c.hidden_size),
                _in_heads(_kv_heads), ("embed", "kv_heads", "head_dim"), "normal", lambda c: c.hidden_size),
    WeightEntry(_L + "self_attn.k_proj.bias", ("layers", "k_b"), lambda c: (c.kv_size,), _bias_heads(_kv_heads),
                ("kv_heads", "head_dim"), "bias"),
    WeightEntry(_L + "self_attn.v_proj.weight", ("layers", "v_w"), lambda c: (c.kv_size, c.hidden_size),
                _in_heads(_kv_heads), ("embed", "kv_heads", "head_dim"), "normal", lambda c: c.hidden_size),
    WeightEntry(_L + "self_attn.v_proj.bias", ("layers", "v_b"), lambda c: (c.kv_size,), _bias_heads(_kv_heads),
                ("kv_heads", "head_dim"), "bias"),
    # o_proj has no bias in Qwen2; a checkpoint that has one is rejected as an unexpected key.
    WeightEntry(_L + "self_attn.o_proj.weight", ("layers", "o_w"), lambda c: (c.hidden_size, c.q_size),
                lambda t, c: t.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
                ("heads", "head_dim", "embed"), "normal", lambda c: c.q_size),
    WeightEntry(_L + "post_attention_layernorm.weight", ("layers", "mlp_norm"), lambda c: (c.hidden_size,), _same,
                ("embed",), "ones"),
    WeightEntry(_L + "mlp.gate_proj.weight", ("layers", "gate_w"), lambda c: (c.intermediate_size, c.hidden_size),
                _transpose, ("embed", "mlp"), "normal", lambda c: c.hidden_size),
    WeightEntry(_L + "mlp.up_proj.weight", ("layers", "up_w"), lambda c: (c.intermediate_size, c.hidden_size),
                _transpose, ("embed", "mlp"), "normal", lambda c: c.hidden_size),
    WeightEntry(_L + "mlp.down_proj.weight", ("layers", "down_w"), lambda c: (c.hidden_size, c.intermediate_size),
                _transpose, ("mlp", "embed"), "normal", lambda c: c.intermediate_size),
    WeightEntry("model.norm.weight", ("final_norm",), lambda c: (c.hidden_size,), _same, ("embed",), "ones"),
    WeightEntry("lm_head.weight", ("lm_head",), lambda c: (c.vocab_size, c.hidden_size), _same,
                ("vocab", "embed"), "normal", lambda c: c.hidden_size),
)


def table_for(config: QwenConfig) -> tuple[WeightEntry, ...]:
    """The entries a checkpoint of this config must hold (tied embeddings have no lm_head)."""
    return tuple(e for e in WEIGHT_TABLE if not (e.path == ("lm_head",) and config.tie_word_embeddings))


def expected_keys(config: QwenConfig) -> dict[str, tuple[WeightEntry, int | None]]:
    """Every checkpoint key this config needs -> (its table entry, its layer or None)."""
    keys = {}
    for entry in table_for(config):
        if entry.per_layer:
            for layer in range(config.num_hidden_layers):
                keys[entry.hf_key.format(layer=layer)] = (entry, layer)
        else:
            keys[entry.hf_key] = (entry, None)
    return keys


def logical_axes_tree(config: QwenConfig) -> dict:
    """The parameter tree's shape, with each leaf's logical axes (for sharding)."""
    tree: dict = {}
    for entry in table_for(config):
        _set(tree, entry.path, entry.logical_axes())
    return tree


def param_shapes(config: QwenConfig) -> dict:
    tree: dict = {}
    for entry in table_for(config):
        _set(tree, entry.path, entry.param_shape(config))
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------- locating files


def unreadable_safetensors(path: Path, error: BaseException) -> CheckpointError:
    """The error for a safetensors file the library cannot read: safetensors' own message names no file."""
    try:
        size = f"{Path(path).stat().st_size:,} bytes on disk"
    except OSError as stat_error:
        size = f"cannot stat it: {stat_error.strerror}"
    return CheckpointError(
        f"{path} is truncated or corrupt ({size}; safetensors says: {error}): download or copy it again and "
        "compare its size and sha256 with the original's")


@contextlib.contextmanager
def open_safetensors(path: Path):
    """``safe_open`` whose failures name the file (a truncated copy fails here, at its header)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="flax")
    except Exception as error:
        raise unreadable_safetensors(path, error) from error
    with handle as f:
        yield f


def resolve_checkpoint_dir(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """A local directory, or a hub id (`Qwen/Qwen2.5-0.5B`, optionally `@revision`) found in the Hugging Face cache.

    Returns the directory and, for hub snapshots, the commit it holds. Downloads only when the process is online
    (HF_HUB_OFFLINE unset); offline, a missing model gives an error that says how to fetch it. A gs:// folder is
    copied once per machine into a local cache and checked (model/checkpoint_cache.py)."""
    from model import checkpoint_cache

    if checkpoint_cache.is_remote(spec):
        return checkpoint_cache.local_checkpoint_dir(str(spec)), None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"--model={spec}: {path} is a file; pass the checkpoint directory (with config.json and "
                "*.safetensors), a hub id such as Qwen/Qwen2.5-0.5B, or random:qwen2.5-0.5b"
            )
        return path, None
    text = str(spec)
    if not _HUB_ID.match(text):
        raise CheckpointError(
            f"--model={spec}: directory {path} does not exist (and it is not a hub id like Qwen/Qwen2.5-0.5B); "
            "pass an existing checkpoint directory or random:qwen2.5-0.5b"
        )
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    patterns = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "tokenizer*"]
    try:
        folder = snapshot_download(repo_id, revision=revision or None, local_files_only=True,
                                   allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        if offline:
            raise CheckpointError(
                f"--model={spec}: no local directory {path} and {repo_id} is not in the Hugging Face cache "
                f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), and "
                f"HF_HUB_OFFLINE is set. Download it on a machine with network access: "
                f"`huggingface-cli download {repo_id} --include '*.json' '*.safetensors' merges.txt vocab.json` "
                "(then copy the cache), or pass a local checkpoint directory."
            ) from e
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    folder = Path(folder)
    return folder, folder.name if folder.parent.name == "snapshots" else None


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Every tensor key -> the safetensors file holding it; never opens a pickle."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists {len(missing)} shard file(s) that are missing from {directory}: "
                f"{', '.join(missing[:5])}; download every shard of the checkpoint"
            )
        paths = [directory / f for f in files]
    else:
        paths = sorted(directory.glob("*.safetensors"))
        weight_map = None
    if not paths:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); they are never "
                "unpickled here because loading a pickle can run arbitrary code. Use the model's safetensors "
                "files (most hub repos have them), or convert on a trusted machine with transformers: "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
            )
        raise CheckpointError(
            f"{directory} has no *.safetensors weights (and no model.safetensors.index.json); "
            "pass a complete Hugging Face checkpoint directory"
        )
    located: dict[str, Path] = {}
    for path in paths:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key in located:
                    raise CheckpointError(f"tensor {key} appears in both {located[key]} and {path}")
                located[key] = path
    if weight_map is not None:
        for key, file in weight_map.items():
            if key not in located:
                raise CheckpointError(f"{index} maps {key} to {file}, but that file does not contain it")
            if located[key].name != Path(file).name:
                raise CheckpointError(f"{index} maps {key} to {file}, but it is in {located[key].name}")
    return located


# --------------------------------------------------------------------------------------------- loading


def load_checkpoint_params(directory: Path, config: QwenConfig, dtype: str = "bfloat16") -> dict:
    """Reads every tensor of a Qwen2 safetensors checkpoint into host numpy arrays of `dtype`, shape-checked
    against `config`, in the parameter tree layout. Missing or unexpected keys are errors."""
    import jax

    target = numpy_dtype(dtype)
    located = checkpoint_files(directory)
    needed = expected_keys(config)
    tied_head = _check_keys(directory, config, located, needed)
    params: dict = {}
    for entry in table_for(config):
        _set(params, entry.path, np.empty(entry.param_shape(config), dtype=target))

    by_file: dict[Path, list[str]] = {}
    for key in needed:
        by_file.setdefault(located[key], []).append(key)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        for path, keys in by_file.items():
            with open_safetensors(path) as f:
                for key in keys:
                    entry, layer = needed[key]
                    tensor = _read_tensor(f, path, key, entry.hf_shape(config), config)
                    value = entry.to_param(tensor, config).astype(target)
                    leaf = _get(params, entry.path)
                    if layer is None:
                        leaf[...] = value
                    else:
                        leaf[layer] = value
        if tied_head:
            # After the loop: the embedding may live in a later shard than the head.
            path = located["lm_head.weight"]
            with open_safetensors(path) as f:
                _check_tied_head(f, "lm_head.weight", path, params["embed"], target)
    return params


def _check_keys(directory: Path, config: QwenConfig, located: dict, needed: dict) -> bool:
    """Every tensor the config needs is there and none it does not know; returns whether the checkpoint
    also holds a head that the config ties to the embedding."""
    missing = [k for k in needed if k not in located]
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) that config.json (num_hidden_layers="
            f"{config.num_hidden_layers}, tie_word_embeddings={config.tie_word_embeddings}) requires are missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    tied_head = config.tie_word_embeddings and "lm_head.weight" in located
    derived = [k for k in located if _DERIVED_KEYS.match(k)]
    if derived:
        log.info("%s: ignoring %d rotary_emb.inv_freq buffers (recomputed from rope_theta)", directory, len(derived))
    allowed_extra = set(derived) | ({"lm_head.weight"} if tied_head else set())
    unexpected = [k for k in located if k not in needed and k not in allowed_extra]
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) this Qwen2 model does not use, e.g. "
            f"{', '.join(unexpected[:3])} in {located[unexpected[0]].name}; is config.json "
            "(num_hidden_layers, tie_word_embeddings) the one that belongs to these weights?"
        )
    return tied_head


def _read_tensor(f, path: Path, key: str, expected: tuple, config: QwenConfig) -> np.ndarray:
    """One tensor of an open safetensors file, once its dtype and shape are known to be right."""
    try:
        tensor_slice = f.get_slice(key)
    except Exception as error:
        raise unreadable_safetensors(path, error) from error
    found = tuple(tensor_slice.get_shape())
    if tensor_slice.get_dtype() not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {key} has dtype {tensor_slice.get_dtype()}; expected one of "
            f"{', '.join(_FLOAT_DTYPES)} (quantised checkpoints are not supported)"
        )
    if found != expected:
        raise CheckpointError(
            f"{path}: tensor {key} has shape {list(found)}, expected {list(expected)} from "
            f"{config.name or 'config.json'}"
        )
    try:
        return np.asarray(f.get_tensor(key))
    except Exception as error:
        raise unreadable_safetensors(path, error) from error


def _check_tied_head(f, key, path, embed, target) -> None:
    head = np.asarray(f.get_tensor(key)).astype(target)
    if head.shape != embed.shape or not np.array_equal(head, embed):
        raise CheckpointError(
            f"{path}: config.json sets tie_word_embeddings=true but {key} differs from model.embed_tokens.weight; "
            "set tie_word_embeddings=false in config.json if the checkpoint has its own LM head"
        )


def _get(tree: dict, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


# --------------------------------------------------------------------------------------------- random weights

BIAS_STD = 0.02


def random_params(config: QwenConfig, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """Random host weights of `config`'s geometry, deterministic from `seed` on every platform.

    Each tensor of each layer has its own generator, seeded by (seed, table index, layer), so `?layers=2` is the
    first two layers of the full model and the bfloat16 model is the float32 one rounded. Generated with numpy
    (threads over layers; no XLA compilation, which costs more than the generation on small models).
    Scales keep activations O(1) at every depth: matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1,
    biases N(0, 0.02^2)."""
    from concurrent.futures import ThreadPoolExecutor

    target = numpy_dtype(dtype)
    params: dict = {}
    jobs = []
    for index, entry in enumerate(table_for(config)):
        leaf = np.empty(entry.param_shape(config), dtype=target)
        _set(params, entry.path, leaf)
        if entry.init == "ones":
            leaf[...] = 1
            continue
        std = {"normal": entry.fan_in(config) ** -0.5, "embed": 1.0, "bias": BIAS_STD}[entry.init]
        if entry.per_layer:
            jobs += [(leaf, layer, (seed, index, layer), std) for layer in range(config.num_hidden_layers)]
        else:
            jobs.append((leaf, None, (seed, index), std))

    def fill(job):
        leaf, layer, key, std = job
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        values = np.random.default_rng(key).standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        if layer is None:
            leaf[...] = values.astype(target)
        else:
            leaf[layer] = values.astype(target)

    # numpy releases the GIL while it fills arrays, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, jobs))
    return params
