"""The run identity: every setting that changes what a row of the output holds.

It is recorded in every shard's commit marker (key `run_identity`), in `OUTPUT/_identity.json` (written once,
create-exclusive, by the first run into an output) and in the manifest. `--resume`, a second host and
`pipeline.verify` compare identities key by key. Settings that only change how rows are computed or written
(batch size, packing, wave size, writer threads, attention kernel, hosts) are not part of it and may differ
between attempts (docs/format.md lists both). Nor are the limits that choose which samples exist
(`--max_samples`, `--max_tokens`): a token budget selects an input-order prefix, so a resume with a larger one
extends the same output.
"""
from __future__ import annotations

import json

from transforms.output_format import IDENTITY_FILE  # noqa: F401 - the identity file's name, for callers

# identity key -> the flag that sets it (what a refusal tells the user to pass)
FLAGS = {
    "model_weights": "--model (the same checkpoint)",
    "tokenizer": "--model (the same tokenizer files)",
    "dataset": "--dataset",
    "prompt_version": "--prompt_version",
    "prompt_mode": "--prompt_mode",
    "grid_encoder": "--grid_encoder",
    "max_seq_len": "--max_seq_len",
    "max_train_examples": "--max_train_examples",
    "augmentations": "--augmentations",
    "seed": "--seed",
    "dtype": "--dtype",
    "storage_dtype": "--activation_dtype",
    "hooks": "--hooks",
    "layers": "--layers",
    "generate": "--generate (or its absence)",
    "max_new_tokens": "--max_new_tokens",
    "format_version": "(the writer's format version: use the release that wrote this output)",
}
# What identities recorded before a key existed meant by it: outputs of earlier releases still resume.
LEGACY_VALUES = {"generate": "false", "max_new_tokens": "0"}
# Recorded beside the identity for people; two specs naming the same weights are one identity.
DESCRIPTIVE = ("model", "model_path", "model_revision")


def run_identity(opts, hooks, layers, *, storage_dtype: str, format_version: int,
                 max_new_tokens: int | None = None) -> dict[str, str]:
    """The identity of the run `opts` describes (fingerprints hash the checkpoint once per machine).
    `max_new_tokens`: the answer budget of a --generate run as resolved (its default depends on the tokenizer)."""
    from model import describe_spec
    from model.fingerprint import tokenizer_fingerprint, weights_fingerprint

    source = describe_spec(opts.model)
    identity = {
        "model": str(opts.model), "model_path": str(source.get("path")), "model_revision": str(source.get("revision")),
        "model_weights": weights_fingerprint(opts.model), "tokenizer": tokenizer_fingerprint(opts.model),
        "dataset": str(opts.dataset), "prompt_version": str(opts.prompt_version),
        "prompt_mode": str(opts.prompt_mode), "grid_encoder": str(opts.grid_encoder),
        "max_seq_len": str(opts.max_seq_len), "max_train_examples": str(opts.max_train_examples),
        "augmentations": str(opts.augmentations), "seed": str(opts.seed), "dtype": str(opts.dtype),
        "storage_dtype": str(storage_dtype), "hooks": ",".join(hooks),
        "layers": ",".join(str(int(layer)) for layer in layers), "format_version": str(format_version),
        "generate": "true" if getattr(opts, "generate", False) else "false",
        "max_new_tokens": str(int(max_new_tokens or 0)) if getattr(opts, "generate", False) else "0",
    }
    return identity


def encode(identity: dict[str, str]) -> str:
    return json.dumps(identity, sort_keys=True)


def decode(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"a run identity must be a JSON object, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def differences(recorded: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """Each compared key on which two identities differ, as `key: recorded 'a', this run 'b' (flag)`."""
    out = []
    for key in FLAGS:
        was, now = (identity.get(key, LEGACY_VALUES.get(key)) for identity in (recorded, wanted))
        if was != now:
            out.append(f"{key}: recorded {was!r}, this run {now!r} (pass {FLAGS[key]})")
    return out


def mismatch_message(where: str, recorded: dict[str, str], wanted: dict[str, str]) -> str | None:
    """One line refusing to mix two identities in one output, or None when they agree."""
    diffs = differences(recorded, wanted)
    if not diffs:
        return None
    return (f"{where} was written by a run with other settings, and one output holds one run: "
            + "; ".join(diffs) + ". Pass the recorded values, or write to a new --output.")


def group_by_identity(markers: dict[str, dict]) -> dict[str | None, list[str]]:
    """Commit markers (shard -> metadata) grouped by the identity they record (None: written before identities
    were recorded)."""
    from transforms.output_format import KEY_IDENTITY

    groups: dict[str | None, list[str]] = {}
    for shard in sorted(markers):
        groups.setdefault(markers[shard].get(KEY_IDENTITY), []).append(shard)
    return groups


def read_identity_file(output_root: str) -> dict[str, str] | None:
    """The identity recorded in OUTPUT/_identity.json, or None when there is none (or it is unreadable)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(f"{output_root.rstrip('/')}/{IDENTITY_FILE}") as handle:
            return decode(handle.read().decode())
    except Exception:  # absent or damaged: the shards' majority stands in for it
        return None


def mismatched_shards(markers: dict[str, dict], reference: dict[str, str] | None = None
                      ) -> list[tuple[str, list[str]]]:
    """(shard, differences) for every shard whose recorded identity differs from `reference` (by default the
    identity most shards record). Shards that record none are not judged."""
    groups = {key: shards for key, shards in group_by_identity(markers).items() if key is not None}
    if not groups:
        return []
    if reference is None:
        reference = decode(max(groups, key=lambda key: (len(groups[key]), key)))
    out = []
    for key, shards in groups.items():
        diffs = differences(reference, decode(key))
        out += [(shard, diffs) for shard in shards if diffs]
    return sorted(out)
