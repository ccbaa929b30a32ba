"""OUTPUT/manifest.json: what the run was (from the driver) and what it wrote (from the commit markers).

Built after the pipeline has finished, from the shards' commit markers only, so a shard that never committed is
never counted; anything else found under the output (uncommitted activation files, temporary files) is listed
under `warnings` for `python -m pipeline.verify` and the user to see.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections import Counter, defaultdict
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline import identity as identity_lib
from transforms import activation_stats
from transforms.output_format import (
    ACTIVATIONS_DIR,
    DEAD_LETTER_DIR,
    FORMAT_VERSION,
    KEY_OVERFLOW,
    MANIFEST_NAME,
    RUNS_DIR,
    TEMP_PREFIX,
    basename,
    parse_manifest,
    relative_to,
)
from transforms.predictions import marker_entry as predictions_marker_entry
from transforms.write import committed_shards, join, parallel_map, put_atomic

# RUNS_DIR holds one record per host of what its last run was (options, times, Beam counters); the manifest merges
# them, so with several hosts it counts every host's reads.
_READ_CHUNK = 8 * 1024 * 1024


def file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, streamed through FileSystems in chunks."""
    sha, size = hashlib.sha256(), 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while chunk := handle.read(_READ_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def scan_dead_letters(path: str) -> tuple[int, str, Counter]:
    """(bytes, sha256, rejections per stage) of one dead-letter JSONL file, streamed."""
    sha, size, stages, carry = hashlib.sha256(), 0, Counter(), b""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while chunk := handle.read(_READ_CHUNK):
            sha.update(chunk)
            size += len(chunk)
            *lines, carry = (carry + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    stages[json.loads(line).get("stage", "unknown")] += 1
    if carry.strip():
        stages[json.loads(carry).get("stage", "unknown")] += 1
    return size, sha.hexdigest(), stages


def dead_letter_files(output_root: str) -> list[str]:
    paths = [m.path for m in FileSystems.match([join(output_root, f"{DEAD_LETTER_DIR}/*.jsonl")])[0].metadata_list]
    return sorted(p for p in paths if not basename(p).startswith(TEMP_PREFIX))


def build_manifest(output_root: str, run_info: dict[str, Any]) -> dict[str, Any]:
    """run_info (model, tokenizer, options, hooks, layers, dtypes, software, times, counters, ...) plus
    `format_version`, `files` (every committed file with kind, rows, bytes, sha256), `counts` and `warnings`.

    `counts` merges run_info["counts"] (e.g. records read, from the driver's Beam counters) with what the files
    say: shards, samples, tokens, activation rows per hook and layer, rejected records per stage."""
    output_root = output_root.rstrip("/")
    shards = committed_shards(output_root)
    tally = _ShardTally()
    tally.add_shards(output_root, shards)
    rejected_by_stage: Counter = Counter()
    dead_paths = dead_letter_files(output_root)
    for path, (size, sha, stages) in zip(dead_paths, parallel_map(scan_dead_letters, dead_paths)):
        rejected_by_stage.update(stages)
        tally.files.append({"path": relative_to(output_root, path), "kind": "dead_letter",
                            "rows": sum(stages.values()), "bytes": size, "sha256": sha})
    rows = tally.rows_per_hook_layer
    computed = {
        "shards": len(shards),
        "samples": tally.samples,
        "tokens": tally.tokens,
        "activation_rows": sum(sum(layers.values()) for layers in rows.values()),
        "tokens_per_hook_layer": {hook: dict(sorted(layers.items(), key=lambda kv: int(kv[0])))
                                  for hook, layers in sorted(rows.items())},
        "rejected": sum(rejected_by_stage.values()),
        "rejected_by_stage": dict(sorted(rejected_by_stage.items())),
        "float16_overflow": tally.overflow,
        "bytes": sum(f["bytes"] for f in tally.files),
    }
    recorded = [key for key in identity_lib.group_by_identity(shards) if key is not None]
    manifest = dict(run_info)
    manifest["format_version"] = FORMAT_VERSION
    if len(recorded) == 1:
        manifest["identity"] = identity_lib.decode(recorded[0])
    manifest["written"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    manifest["counts"] = {**dict(run_info.get("counts", {})), **computed}
    manifest["files"] = tally.files
    manifest["warnings"] = warnings = _warnings(output_root, shards, tally)
    if any(f["kind"] == "predictions" for f in tally.files):
        manifest["predictions"] = _predictions_section(output_root, shards, warnings)
    return manifest


def _predictions_section(output_root: str, shards: dict[str, dict], warnings: list[str]) -> dict[str, Any]:
    """--generate outputs: the committed predictions' counts and voted accuracy (pipeline.submission)."""
    from pipeline.submission import predictions_summary, read_predictions

    try:
        return predictions_summary(read_predictions(output_root, shards))
    except Exception as error:  # a damaged predictions file is verify's finding; the manifest still lists files
        warnings.append(f"predictions not summarized ({type(error).__name__}: {error}): run python -m "
                        f"pipeline.verify {output_root}")
        return {}


class _ShardTally:
    """The committed shards' files and totals, as their commit markers record them."""

    def __init__(self):
        self.files: list[dict[str, Any]] = []
        self.rows_per_hook_layer: dict[str, dict[str, int]] = defaultdict(dict)
        self.samples = self.tokens = self.overflow = 0
        self.storage_dtypes, self.compute_dtypes, self.d_models = set(), set(), set()
        self.activation_files: set[str] = set()

    def add_shards(self, output_root: str, shards: dict[str, dict]) -> None:
        samples_paths = [join(output_root, meta["path"]) for meta in shards.values()]
        digests = dict(zip(samples_paths, parallel_map(file_digest, samples_paths)))
        for shard in sorted(shards):
            meta = shards[shard]
            self.add(shard, meta, *digests[join(output_root, meta["path"])])

    def add(self, shard: str, meta: dict, size: int, sha: str) -> None:
        self.samples += int(meta["num_samples"])
        self.tokens += int(meta["num_tokens"])
        self.overflow += int(meta.get(KEY_OVERFLOW, 0))
        self.storage_dtypes.add(meta.get("storage_dtype"))
        self.compute_dtypes.add(meta.get("dtype"))
        self.d_models.add(meta.get("d_model"))
        self.files.append({"path": meta["path"], "kind": "samples", "shard": shard, "rows": int(meta["num_samples"]),
                           "bytes": size, "sha256": sha})
        for entry in meta["files"]:
            self.activation_files.add(entry["path"])
            layers = self.rows_per_hook_layer[entry["hook"]]
            layers[str(entry["layer"])] = layers.get(str(entry["layer"]), 0) + int(entry["rows"])
            self.files.append({"path": entry["path"], "kind": "activations", "shard": shard, "hook": entry["hook"],
                               "layer": int(entry["layer"]), "rows": int(entry["rows"]),
                               "bytes": int(entry["bytes"]), "sha256": entry["sha256"]})
        stats_entry = activation_stats.marker_entry(meta)
        if stats_entry is not None:
            self.files.append({"path": stats_entry["path"], "kind": activation_stats.KIND, "shard": shard,
                               "rows": int(stats_entry.get("layers", 0)), "bytes": int(stats_entry["bytes"]),
                               "sha256": stats_entry["sha256"]})
        predictions_entry = predictions_marker_entry(meta)
        if predictions_entry is not None:
            self.files.append({**{k: predictions_entry[k] for k in ("path", "kind", "rows", "bytes", "sha256")},
                               "shard": shard})


def _warnings(output_root: str, shards: dict[str, dict], tally: _ShardTally) -> list[str]:
    """Stray activation files, shards that disagree on dtypes or d_model, shards of another run."""
    warnings = []
    for meta in FileSystems.match([join(output_root, f"{ACTIVATIONS_DIR}/**")])[0].metadata_list:
        relpath = relative_to(output_root, meta.path)
        if basename(meta.path).startswith(TEMP_PREFIX):
            warnings.append(f"temporary file {relpath} (a killed or running writer left it)")
        elif relpath not in tally.activation_files:
            warnings.append(f"uncommitted activation file {relpath}: no samples file lists it")
    for label, values in (("storage dtypes", tally.storage_dtypes), ("compute dtypes", tally.compute_dtypes),
                          ("d_model values", tally.d_models)):
        if len(values) > 1:
            warnings.append(f"shards disagree on {label}: {sorted(map(str, values))}")
    mismatched = identity_lib.mismatched_shards(shards, identity_lib.read_identity_file(output_root))
    warnings += [f"run identity: samples/{shard}.parquet was written by another run: {'; '.join(diffs)}"
                 for shard, diffs in mismatched]
    return warnings


def write_manifest(output_root: str, manifest: dict[str, Any]) -> str:
    """Writes OUTPUT/manifest.json atomically (temporary name, then rename); returns its path."""
    path = join(output_root.rstrip("/"), MANIFEST_NAME)
    data = json.dumps(manifest, indent=1, ensure_ascii=False, default=str).encode("utf-8")
    put_atomic(data, path)
    return path


def write_host_run(output_root: str, host: str, run_info: dict[str, Any]) -> str:
    """Records what this host's run was, atomically, at OUTPUT/_runs/<host>.json."""
    path = join(output_root.rstrip("/"), f"{RUNS_DIR}/{host}.json")
    put_atomic(json.dumps(run_info, indent=1, ensure_ascii=False, default=str).encode("utf-8"), path)
    return path


def host_runs(output_root: str) -> dict[str, dict[str, Any]]:
    """host -> its last run record, for every host that finished a run into this output."""
    pattern = join(output_root.rstrip("/"), f"{RUNS_DIR}/*.json")
    runs = {}
    for meta in FileSystems.match([pattern])[0].metadata_list:
        if basename(meta.path).startswith(TEMP_PREFIX):
            continue
        with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            runs[basename(meta.path)[:-len(".json")]] = json.loads(handle.read().decode("utf-8"))
    return dict(sorted(runs.items()))


def merged_run_info(output_root: str) -> dict[str, Any]:
    """The run description of the manifest: the latest host's record (model, options, dtypes, software), with
    `run_counters` summed over every host's last run and each host's own record under `hosts`."""
    runs = host_runs(output_root)
    if not runs:
        return {}
    latest = max(runs.values(), key=lambda run: str(run.get("finished", "")))
    merged = {key: value for key, value in latest.items() if key not in ("host", "run_counters")}
    counters: Counter = Counter()
    for run in runs.values():
        counters.update({name: int(value) for name, value in run.get("run_counters", {}).items()})
    merged["run_counters"] = dict(sorted(counters.items()))
    merged["started"] = min(str(run.get("started", "")) for run in runs.values())
    merged["hosts"] = {host: {key: run.get(key) for key in ("started", "finished", "state", "run_counters")}
                       for host, run in runs.items()}
    return merged


def rebuild_manifest(output_root: str) -> dict[str, Any]:
    """Rebuilds and writes OUTPUT/manifest.json from every host's run record and every commit marker, and
    OUTPUT/stats.json, the committed shards' statistics merged, which the manifest names under `stats`."""
    from pipeline.stats import write_merged_stats

    manifest = build_manifest(output_root, merged_run_info(output_root))
    manifest["stats"] = write_merged_stats(output_root, manifest)
    manifest["warnings"] += manifest["stats"].pop("problems", [])
    if manifest["stats"].get("shards_without_stats"):
        manifest["warnings"].append(
            f"{manifest['stats']['shards_without_stats']} committed shards have no statistics file (written before "
            "statistics existed): python -m pipeline.stats OUTPUT --write recomputes them from the activations")
    write_manifest(output_root, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from pipeline.storage import use_storage_emulator_if_configured

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.manifest",
        description="Rebuild OUTPUT/manifest.json from the commit markers and every host's run record, e.g. "
                    "after several TPU-VM hosts finished writing into one output.")
    parser.add_argument("output", help="the run's --output (local directory or gs://...)")
    args = parser.parse_args(argv)
    use_storage_emulator_if_configured()
    manifest = rebuild_manifest(args.output)
    counts = manifest["counts"]
    print(f"{join(args.output.rstrip('/'), MANIFEST_NAME)}: {counts['shards']} shards, {counts['samples']} samples, "
          f"{counts['tokens']} tokens, {len(manifest.get('hosts', {}))} host(s), {len(manifest['warnings'])} warnings")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def read_manifest(output_root: str) -> dict[str, Any]:
    """OUTPUT/manifest.json, checked to be a manifest of this format (transforms.output_format.parse_manifest, which
    the reader and pipeline.inspect use too): ValueError naming the file and saying how to rebuild it otherwise."""
    root = output_root.rstrip("/")
    path = join(root, MANIFEST_NAME)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return parse_manifest(handle.read(), path, root)


if __name__ == "__main__":
    from pipeline.errors import exit_report

    exit_report(main)
