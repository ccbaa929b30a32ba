"""`python -m pipeline.stats OUTPUT [--write] [--json]`: the merged activation statistics (OUTPUT/stats.json).

stats.json holds, per (hook, layer), the statistics of every committed shard merged (schema in docs/format.md,
"Statistics"). It is built from the per-shard files `stats/<shard>.json` that the writer commits with each shard,
each counted once because only shards with a commit marker are read, in shard-name order, so the same set of
shards gives the same file bit for bit whatever the hosts and retries were.

This command recomputes the statistics from the stored activations (decoded with
transforms.write.activations_to_numpy, so it also works on outputs written before statistics existed) and checks
them against stats.json: exit 0 when they agree, 1 naming hook, layer and field otherwise. Without a stats.json it
exits 1, or with --write writes the recomputed one and names it in manifest.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterable

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import activation_stats as S
from transforms.output_format import (
    KEY_FILES,
    KEY_OVERFLOW,
    KEY_STORAGE_DTYPE,
    STATS_NAME,
    activations_to_numpy,
    decode_metadata,
)
from transforms.write import committed_shards, join, parallel_map, put_atomic

# Float64 sums may differ by rounding between two summation orders: relative to the value, and relative to an
# upper bound of the sum of |x| (sqrt(n * sum of squares)), which covers sums that cancel to near zero.
SUM_RTOL = 1e-9
SUM_BOUND_RTOL = 1e-12
MAX_DISAGREEMENTS = 20


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def read_shard_stats(output_root: str, entry: dict[str, Any]) -> list[S.LayerStats]:
    """The statistics of one shard from its stats file, after checking its size and sha256 against `entry`."""
    import hashlib

    data = _read(join(output_root, entry["path"]))
    if len(data) != int(entry["bytes"]) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['path']}: {len(data)} bytes / sha256 differ from its commit marker's; the file "
                         "was changed after the shard committed (python -m pipeline.stats OUTPUT --write "
                         "recomputes statistics from the activations)")
    return S.loads(data, entry["path"])[1]


def merged_from_shards(output_root: str, entries: dict[str, dict]) -> tuple[dict, list[str]]:
    """(statistics merged in shard-name order, a message per stats file left out because it is unreadable or
    changed since its shard committed); entries: shard -> stats-file entry."""

    def read(shard):
        try:
            return read_shard_stats(output_root, entries[shard]), None
        except (OSError, ValueError) as error:
            return [], f"{entries[shard]['path']} left out of {STATS_NAME}: {error}"

    results = parallel_map(read, sorted(entries))
    problems = [problem for _, problem in results if problem]
    return S.merge_all(stats for layers, _ in results for stats in layers), problems


def write_stats(output_root: str, merged: dict, **extra) -> dict[str, Any]:
    """Writes OUTPUT/stats.json atomically; returns its entry for the manifest ({path, bytes, sha256, ...})."""
    import hashlib

    data = S.dumps(S.document(merged.values(), **extra))
    put_atomic(data, join(output_root.rstrip("/"), STATS_NAME))
    return {"path": STATS_NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "layers": len(merged), **extra}


def write_merged_stats(output_root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """stats.json from the stats files the manifest lists (one per committed shard); its entry for the manifest.
    Shards written before statistics existed have none: they are counted in `shards_without_stats`, and no
    stats.json is written when no shard has one."""
    output_root = output_root.rstrip("/")
    entries = {f["shard"]: f for f in manifest.get("files", []) if f.get("kind") == S.KIND}
    shards = {f["shard"] for f in manifest.get("files", []) if f.get("kind") == "samples"}
    missing = len(shards - set(entries))
    if not entries:
        return {"path": None, "shards": 0, "shards_without_stats": missing}
    merged, problems = merged_from_shards(output_root, entries)
    entry = write_stats(output_root, merged, shards=len(entries) - len(problems),
                        shards_without_stats=missing + len(problems), source="shard stats files")
    return {**entry, "problems": problems} if problems else entry


def read_stats(output_root: str) -> dict[tuple[str, int], S.LayerStats] | None:
    """OUTPUT/stats.json as (hook, layer) -> LayerStats, or None when there is none."""
    path = join(output_root.rstrip("/"), STATS_NAME)
    if not FileSystems.exists(path):
        return None
    header, layers = S.loads(_read(path), STATS_NAME)
    return {stats.key: stats for stats in layers}


# ------------------------------------------------------------------------------------------- recompute

def _shard_from_activations(output_root: str, shard: str, marker: dict) -> list[S.LayerStats]:
    import pyarrow.parquet as pq

    result = []
    for entry in sorted(marker[KEY_FILES], key=lambda e: (e["hook"], int(e["layer"]))):
        with FileSystems.open(join(output_root, entry["path"]), compression_type=CompressionTypes.UNCOMPRESSED) as f:
            parquet = pq.ParquetFile(f)
            metadata = decode_metadata(parquet.metadata)
            table = parquet.read()
        storage = metadata.get(KEY_STORAGE_DTYPE) or marker.get(KEY_STORAGE_DTYPE)
        result.append(S.from_arrow(table, entry["hook"], int(entry["layer"]), storage,
                                   int(entry.get(KEY_OVERFLOW, metadata.get(KEY_OVERFLOW, 0))),
                                   activation=activations_to_numpy(table)))
    return result


def recompute(output_root: str, shards: dict[str, dict] | None = None) -> dict[tuple[str, int], S.LayerStats]:
    """The statistics of every committed shard, from its activation files, merged in shard-name order."""
    output_root = output_root.rstrip("/")
    shards = committed_shards(output_root) if shards is None else shards
    merged: dict[tuple[str, int], S.LayerStats] = {}
    for shard in sorted(shards):  # one shard in memory at a time
        for stats in _shard_from_activations(output_root, shard, shards[shard]):
            merged[stats.key] = merged[stats.key].merge(stats) if stats.key in merged else stats
    return merged


# --------------------------------------------------------------------------------------------- compare

def _close(a: float, b: float, bound: float = 0.0) -> bool:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= SUM_RTOL * max(abs(a), abs(b)) + SUM_BOUND_RTOL * bound


def compare(stored: dict, computed: dict) -> list[str]:
    """Disagreements between two {(hook, layer): LayerStats}, each naming hook/layer and field."""
    problems = []
    for key in sorted(set(stored) | set(computed)):
        name = f"hook={key[0]} layer={key[1]}"
        if key not in stored or key not in computed:
            problems.append(f"{name}: only in the {'recomputed' if key in computed else 'stored'} statistics")
            continue
        a, b = stored[key], computed[key]
        problems += [f"{name}: {field} {x} stored, {y} recomputed" for field, x, y in _diff(a, b)]
    return problems


def _diff(a: S.LayerStats, b: S.LayerStats) -> Iterable[tuple[str, Any, Any]]:
    for field in ("d_model", "storage_dtype", "shards", "tokens", "non_finite", "float16_overflow", "norm_count",
                  "norm_non_finite", "norm_min", "norm_max"):
        if getattr(a, field) != getattr(b, field):
            yield field, getattr(a, field), getattr(b, field)
    if a.d_model != b.d_model:
        return
    for field in ("dim_min", "dim_max", "dim_non_finite", "histogram"):
        x, y = getattr(a, field), getattr(b, field)
        same = (x == y) | (np.isnan(x) & np.isnan(y)) if x.dtype.kind == "f" else x == y
        if not same.all():
            index = int(np.flatnonzero(~same)[0])
            yield f"{field}[{index}]", x[index], y[index]
    bound = np.sqrt(np.maximum(a.dim_count(), 1) * np.maximum(a.dim_sumsq, b.dim_sumsq))
    for field, scale in (("dim_sum", bound), ("dim_sumsq", np.maximum(a.dim_sumsq, b.dim_sumsq))):
        x, y = getattr(a, field), getattr(b, field)
        bad = np.abs(x - y) > SUM_RTOL * np.maximum(np.abs(x), np.abs(y)) + SUM_BOUND_RTOL * scale
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            yield f"{field}[{index}]", repr(float(x[index])), repr(float(y[index]))
    for field in ("norm_sum", "norm_sumsq"):
        if not _close(getattr(a, field), getattr(b, field)):
            yield field, repr(getattr(a, field)), repr(getattr(b, field))
    ids_a = [(t.sample_id, t.position, t.token_id) for t in a.top]
    ids_b = [(t.sample_id, t.position, t.token_id) for t in b.top]
    if ids_a != ids_b:
        yield "top", ids_a[:3], ids_b[:3]
    for field in ("by_part", "by_cell", "by_color"):
        x, y = getattr(a, field), getattr(b, field)
        if set(x) != set(y):
            yield f"{field} keys", sorted(set(x) - set(y))[:5], sorted(set(y) - set(x))[:5]
            continue
        for group in sorted(x):
            if (x[group].tokens, x[group].finite) != (y[group].tokens, y[group].finite) or not _close(
                    x[group].norm_sum, y[group].norm_sum):
                yield f"{field}[{group}]", x[group], y[group]


# ------------------------------------------------------------------------------------------------ main

def _summary(merged: dict) -> list[dict]:
    return [{"hook": s.hook, "layer": s.layer, "tokens": s.tokens, "mean_norm": s.mean_norm(),
             "saelens_scale": s.saelens_scale(), "non_finite": s.non_finite, "float16_overflow": s.float16_overflow}
            for s in sorted(merged.values(), key=lambda s: s.key)]


def _name_in_manifest(output_root: str, entry: dict) -> None:
    from pipeline.manifest import MANIFEST_NAME, read_manifest, write_manifest

    if not FileSystems.exists(join(output_root, MANIFEST_NAME)):
        return
    manifest = read_manifest(output_root)
    manifest["stats"] = entry
    manifest["warnings"] = [w for w in manifest.get("warnings", []) if "have no statistics file" not in w]
    write_manifest(output_root, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the run's --output (local directory or gs://...)")
    parser.add_argument("--write", action="store_true",
                        help=f"write {STATS_NAME} from the recomputed statistics when the output has none")
    parser.add_argument("--json", action="store_true", help="print a per-layer summary as JSON")
    args = parser.parse_args(argv)
    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    root = args.output.rstrip("/")
    shards = committed_shards(root)
    if not shards:
        print(f"{root}: no committed shard (no samples/*.parquet commit marker)", file=sys.stderr)
        return 1
    computed = recompute(root, shards)
    stored = read_stats(root)
    if stored is None and args.write:  # before anything is printed: a reader that stops early (| head) skips nothing
        entry = write_stats(root, computed, shards=len(shards), shards_without_stats=0,
                            source="recomputed from activations")
        _name_in_manifest(root, entry)
    if args.json:
        print(json.dumps(_summary(computed), indent=1))
    if stored is None:
        if not args.write:
            print(f"{join(root, STATS_NAME)}: missing; rerun with --write to write it from the activations "
                  f"({len(shards)} shards recomputed)", file=sys.stderr)
            return 1
        print(f"{join(root, STATS_NAME)}: written from {len(shards)} shards, {len(computed)} hook/layer pairs")
        return 0
    problems = compare(stored, computed)
    for problem in problems[:MAX_DISAGREEMENTS]:
        print(f"DISAGREE {problem}", file=sys.stderr)
    if len(problems) > MAX_DISAGREEMENTS:
        print(f"... and {len(problems) - MAX_DISAGREEMENTS} more disagreements", file=sys.stderr)
    print(f"{join(root, STATS_NAME)}: {'OK' if not problems else 'DISAGREES'}: {len(computed)} hook/layer pairs, "
          f"{len(shards)} shards recomputed from the activations")
    return 0 if not problems else 1


if __name__ == "__main__":
    from pipeline.errors import exit_report

    exit_report(main)
