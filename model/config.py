"""Qwen2 / Qwen2.5 geometry: read from a Hugging Face config.json, or one of the built-in Qwen2.5 sizes."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)


class ConfigError(ValueError):
    """A config.json (or a random: spec) this model cannot run, with the file and key at fault."""


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Everything the forward pass needs to know about a Qwen2 geometry. Frozen and hashable, so it can be a
    static argument of `jax.jit` (two equal configs share compilations)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Where the config came from, for error messages; not part of equality so equal geometries share compilations.
    name: str = dataclasses.field(default="", compare=False)

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{self.name or 'config'}: {field} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.name or 'config'}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{self.name or 'config'}: head_dim must be even for rotary embeddings, got {self.head_dim}")

    def with_layers(self, num_hidden_layers: int) -> "QwenConfig":
        """The same geometry cut to its first `num_hidden_layers` layers (smoke tests, benchmarks)."""
        return dataclasses.replace(self, num_hidden_layers=num_hidden_layers)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face style config dict (for manifests, and so `from_dict(to_dict())` round-trips)."""
        return {
            "architectures": list(SUPPORTED_ARCHITECTURES),
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "QwenConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path} does not exist: a Hugging Face checkpoint directory needs its config.json "
                "(download the whole model repository, not only the weights)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "QwenConfig":
        """Reads a Hugging Face Qwen2 config dict; rejects anything this forward pass would get wrong."""
        _check_architecture(data, source)
        rope_theta = _rope_theta(data, source)

        def required(key: str):
            if key not in data or data[key] is None:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            return data[key]

        hidden_size = int(required("hidden_size"))
        num_attention_heads = int(required("num_attention_heads"))
        head_dim = data.get("head_dim")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ConfigError(
                    f"{source}: hidden_size {hidden_size} is not divisible by num_attention_heads "
                    f"{num_attention_heads} and no 'head_dim' key is given"
                )
            head_dim = hidden_size // num_attention_heads
        try:
            return cls(
                vocab_size=int(required("vocab_size")),
                hidden_size=hidden_size,
                intermediate_size=int(required("intermediate_size")),
                num_hidden_layers=int(required("num_hidden_layers")),
                num_attention_heads=num_attention_heads,
                num_key_value_heads=int(data.get("num_key_value_heads") or num_attention_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                max_position_embeddings=int(data.get("max_position_embeddings", 32768)),
                name=source,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e


def _check_architecture(data: Mapping[str, Any], source: str) -> None:
    """A Qwen2 config whose attention and activation this forward pass implements."""
    model_type = data.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: key 'model_type' is {model_type!r}; only Qwen2/Qwen2.5 checkpoints "
            f"(model_type 'qwen2', architectures {list(SUPPORTED_ARCHITECTURES)}) are supported"
        )
    architectures = data.get("architectures")
    if architectures is not None and not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ConfigError(
            f"{source}: key 'architectures' is {architectures!r}; only {list(SUPPORTED_ARCHITECTURES)} "
            "is supported"
        )
    if model_type is None and architectures is None:
        raise ConfigError(
            f"{source}: neither 'model_type' nor 'architectures' is set, so this is not recognisably a "
            "Qwen2 config.json"
        )
    hidden_act = data.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"{source}: key 'hidden_act' is {hidden_act!r}; Qwen2 uses 'silu'")
    if data.get("use_sliding_window"):
        raise ConfigError(
            f"{source}: key 'use_sliding_window' is true; sliding-window attention is not implemented "
            "(no released Qwen2.5 model enables it)"
        )
    layer_types = data.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(
            f"{source}: key 'layer_types' lists {sorted(set(layer_types))}; only 'full_attention' is implemented"
        )


def _rope_theta(data: Mapping[str, Any], source: str) -> float:
    """rope_theta (or rope_parameters.rope_theta), once the RoPE is known to be the default kind."""
    rope_theta = data.get("rope_theta")
    rope_parameters = data.get("rope_parameters")
    if isinstance(rope_parameters, Mapping):
        _check_rope_type(rope_parameters, f"{source}: key 'rope_parameters'")
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta")
    rope_scaling = data.get("rope_scaling")
    if rope_scaling is not None:
        if not isinstance(rope_scaling, Mapping):
            raise ConfigError(f"{source}: key 'rope_scaling' must be null or an object, got {rope_scaling!r}")
        _check_rope_type(rope_scaling, f"{source}: key 'rope_scaling'")
    if rope_theta is None:
        raise ConfigError(f"{source}: key 'rope_theta' (or 'rope_parameters.rope_theta') is missing")
    return rope_theta


def _check_rope_type(params: Mapping[str, Any], where: str) -> None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"{where} sets rope_type {rope_type!r}; only the default RoPE is implemented (remove the scaling "
            "entry to run at the native context length)"
        )


def _qwen25(name, vocab, hidden, intermediate, layers, heads, kv_heads, eps, tied, max_pos) -> QwenConfig:
    return QwenConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=eps,
        rope_theta=1_000_000.0, tie_word_embeddings=tied, max_position_embeddings=max_pos, name=name,
    )


# The base models' config.json values on the Hugging Face hub (Qwen/Qwen2.5-*).
QWEN25_GEOMETRIES: dict[str, QwenConfig] = {
    c.name: c
    for c in (
        _qwen25("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, 1e-6, True, 32768),
        _qwen25("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, 1e-6, True, 131072),
        _qwen25("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, 1e-6, True, 32768),
        _qwen25("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, 1e-6, False, 131072),
        _qwen25("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, 1e-5, False, 131072),
        _qwen25("qwen2.5-32b", 152064, 5120, 27648, 64, 40, 8, 1e-5, False, 131072),
        _qwen25("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8, 1e-5, False, 131072),
        # Not a released model: the tests' tiny geometry, with the real vocabulary so the real tokenizer fits.
        _qwen25("tiny", 151936, 64, 128, 4, 4, 2, 1e-6, True, 4096),
    )
}


@dataclasses.dataclass(frozen=True)
class RandomSpec:
    config: QwenConfig
    seed: int


def parse_random_spec(spec: str) -> RandomSpec:
    """`random:<geometry>[?layers=N][&seed=S]`, e.g. `random:qwen2.5-0.5b?layers=4`.

    `layers` keeps the first N layers of the geometry (N <= its depth); `seed` (default 0) picks the weights."""
    if not spec.startswith("random:"):
        raise ConfigError(f"model spec {spec!r} is not a random: spec")
    body = spec[len("random:"):]
    name, _, query = body.partition("?")
    name = name.strip().lower()
    if name not in QWEN25_GEOMETRIES:
        raise ConfigError(
            f"--model={spec!r}: unknown geometry {name!r}; choose one of {', '.join(QWEN25_GEOMETRIES)} "
            "(e.g. random:qwen2.5-0.5b?layers=4)"
        )
    config = QWEN25_GEOMETRIES[name]
    seed = 0
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--model={spec!r}: option {item!r} must look like key=value (layers=N, seed=S)")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"--model={spec!r}: option {key}={value!r} needs an integer") from None
        if key == "layers":
            if not 1 <= number <= config.num_hidden_layers:
                raise ConfigError(
                    f"--model={spec!r}: layers={number} is out of range 1..{config.num_hidden_layers} for {name}"
                )
            config = config.with_layers(number)
        elif key == "seed":
            seed = number
        else:
            raise ConfigError(f"--model={spec!r}: unknown option {key!r}; valid options are layers and seed")
    return RandomSpec(config=config, seed=seed)
