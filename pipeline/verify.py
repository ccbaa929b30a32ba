"""`python -m pipeline.verify OUTPUT [--deep]`: checks an output against its manifest and commit markers.

Checks, each failure naming the file:
* manifest.json is present and parses; every file it lists exists, with its byte size, sha256 and row count;
* every commit marker (samples file) is readable and agrees with the manifest; no activation file is unlisted;
* no sample id appears in two shards; each sample's num_tokens matches its token_ids;
* every sample is complete: for each hook and layer of the run, positions 0..num_tokens-1 each exactly once, with
  the sample's token ids;
* --deep also decodes every activation value: width d_model, and non-finite values reported.
Exit code 0 when everything holds, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.manifest import MANIFEST_NAME, dead_letter_files, file_digest, read_manifest, scan_dead_letters
from transforms import activation_stats
from transforms.write import (
    ACTIVATIONS_DIR,
    KEY_FILES,
    KEY_SHARD,
    TEMP_PREFIX,
    _name,
    _parallel,
    activations_to_numpy,
    decode_metadata,
    join,
    relative_to,
    samples_files,
)

MAX_DETAILS = 5
STATS_KINDS = (activation_stats.KIND, "merged_stats")


@dataclass
class VerifyReport:
    output: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"verify {self.output}: {'OK' if self.ok else f'FAILED ({len(self.errors)} errors)'}"]
        lines += [f"  {key}: {value}" for key, value in self.stats.items()]
        lines += [f"ERROR {message}" for message in self.errors]
        lines += [f"warning {message}" for message in self.warnings]
        return "\n".join(lines)


def _open(path):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _read_table(path: str, columns=None) -> pa.Table:
    with _open(path) as handle:
        return pq.read_table(handle, columns=columns)


def _footer(path: str) -> pq.FileMetaData:
    with _open(path) as handle:
        return pq.ParquetFile(handle).metadata


def _check_file(root: str, entry: dict) -> list[str]:
    """Existence, size, sha256 and row count of one listed file."""
    relpath, path = entry["path"], join(root, entry["path"])
    if not FileSystems.exists(path):
        return [f"{relpath}: listed but missing"]
    errors = []
    try:
        if entry.get("kind") == "dead_letter":
            size, sha, stages = scan_dead_letters(path)
            rows = sum(stages.values())
        elif entry.get("kind") in STATS_KINDS:  # JSON: size and sha256 are the check
            size, sha = file_digest(path)
            rows = entry.get("rows")
        else:
            size, sha = file_digest(path)
            rows = _footer(path).num_rows
    except Exception as error:  # any unreadable file is a finding, not a crash of the checker
        return [f"{relpath}: unreadable ({type(error).__name__}: {error})"]
    if size != entry.get("bytes"):
        errors.append(f"{relpath}: {size} bytes on disk, {entry.get('bytes')} listed")
    if sha != entry.get("sha256"):
        errors.append(f"{relpath}: sha256 {sha[:16]}... does not match the listed {str(entry.get('sha256'))[:16]}...")
    if rows != entry.get("rows"):
        errors.append(f"{relpath}: {rows} rows, {entry.get('rows')} listed")
    return errors


def _expected_rows(samples: pa.Table):
    num_tokens = samples["num_tokens"].to_numpy().astype(np.int64)
    sample_index = np.repeat(np.arange(samples.num_rows), num_tokens)
    positions = np.concatenate([np.arange(n) for n in num_tokens]) if len(num_tokens) else np.zeros(0, np.int64)
    token_ids = pc.list_flatten(samples["token_ids"]).to_numpy()
    return sample_index, positions, token_ids


def check_rows(relpath: str, sample_ids: list[str], expected, table: pa.Table) -> list[str]:
    """Every sample's positions 0..n-1 exactly once, with its token ids, in the activation table."""
    exp_index, exp_pos, exp_tok = expected
    ids = table["sample_id"]
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(pa.string())
    index = pc.index_in(ids, value_set=pa.array(sample_ids, pa.string()))
    errors = []
    if index.null_count:
        strangers = sorted(set(pc.filter(ids, pc.is_null(index)).to_pylist()))
        errors.append(f"{relpath}: rows of {len(strangers)} sample ids that its shard's samples file does not "
                      f"hold, e.g. {strangers[:MAX_DETAILS]}")
        keep = pc.is_valid(index)
        table, index = table.filter(keep), pc.filter(index, keep)
    got_index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    got_pos = table["position"].to_numpy().astype(np.int64)
    got_tok = table["token_id"].to_numpy()
    if (len(got_index) == len(exp_index) and np.array_equal(got_index, exp_index)
            and np.array_equal(got_pos, exp_pos) and np.array_equal(got_tok, exp_tok)):
        return errors
    # Slow path, only on a mismatch: say which samples lack, repeat or mislabel which positions.
    stride = int(max(exp_pos.max(initial=0), got_pos.max(initial=0))) + 2
    got_key = got_index * stride + np.where(got_pos < 0, stride - 1, got_pos)
    exp_key = exp_index * stride + exp_pos
    keys, counts = np.unique(got_key, return_counts=True)
    missing = np.setdiff1d(exp_key, keys)
    duplicated = keys[counts > 1]
    extra = np.setdiff1d(keys, exp_key)
    for label, bad in (("missing", missing), ("duplicated", duplicated), ("out of range", extra)):
        if bad.size:
            samples = sorted({sample_ids[k // stride] for k in bad.tolist()})
            detail = [f"{sample_ids[k // stride]}@{k % stride}" for k in bad[:MAX_DETAILS].tolist()]
            errors.append(f"{relpath}: {bad.size} positions {label} in {len(samples)} samples "
                          f"(e.g. {', '.join(detail)})")
    # Token ids of the positions present exactly once.
    exp_lookup = dict(zip(exp_key.tolist(), exp_tok.tolist())) if exp_key.size < 5_000_000 else None
    if exp_lookup is not None:
        wrong = [(k, t) for k, t in zip(got_key.tolist(), got_tok.tolist()) if k in exp_lookup and exp_lookup[k] != t]
        if wrong:
            detail = [f"{sample_ids[k // stride]}@{k % stride}" for k, _ in wrong[:MAX_DETAILS]]
            errors.append(f"{relpath}: {len(wrong)} rows whose token_id differs from the samples file "
                          f"(e.g. {', '.join(detail)})")
    if not errors:
        errors.append(f"{relpath}: rows are complete but not in sample-then-position order")
    return errors


def _check_shard(root: str, shard: str, marker: dict, expected_keys: set, deep: bool) -> tuple[list, list, dict]:
    """Errors, warnings and counts of one committed shard."""
    errors, warnings = [], []
    samples_rel = f"samples/{shard}.parquet"
    try:
        samples = _read_table(join(root, samples_rel))
    except Exception as error:
        return [f"{samples_rel}: unreadable ({type(error).__name__}: {error})"], [], {}
    lengths = pc.list_value_length(samples["token_ids"]).to_numpy()
    bad = np.flatnonzero(lengths != samples["num_tokens"].to_numpy())
    if bad.size:
        errors.append(f"{samples_rel}: num_tokens differs from len(token_ids) for "
                      f"{samples['sample_id'][int(bad[0])].as_py()!r} and {bad.size - 1} more")
    sample_ids = samples["sample_id"].to_pylist()
    expected = _expected_rows(samples)
    keys = {(entry["hook"], int(entry["layer"])) for entry in marker[KEY_FILES]}
    for hook, layer in sorted(expected_keys - keys):
        errors.append(f"{samples_rel}: shard has no activation file for hook={hook} layer={layer}")
    non_finite = 0
    for entry in marker[KEY_FILES]:
        relpath = entry["path"]
        path = join(root, relpath)
        columns = None if deep else ["sample_id", "position", "token_id"]
        try:
            table = _read_table(path, columns)
        except Exception as error:
            errors.append(f"{relpath}: unreadable ({type(error).__name__}: {error})")
            continue
        errors += check_rows(relpath, sample_ids, expected, table)
        if deep:
            metadata = decode_metadata(_footer(path))
            values = activations_to_numpy(table)
            if str(values.shape[1]) != metadata.get("d_model"):
                errors.append(f"{relpath}: activation width {values.shape[1]}, metadata d_model "
                              f"{metadata.get('d_model')}")
            count = int(values.size - np.isfinite(values.astype(np.float32)).sum())
            if count:
                warnings.append(f"{relpath}: {count} non-finite activation values "
                                f"(float16_overflow in metadata: {metadata.get('float16_overflow')})")
            non_finite += count
    return errors, warnings, {"sample_ids": sample_ids, "tokens": int(lengths.sum()), "non_finite": non_finite}


def verify_output(output: str, deep: bool = False) -> VerifyReport:
    root = output.rstrip("/")
    report = VerifyReport(output=root)
    manifest = None
    try:
        manifest = read_manifest(root)
    except Exception as error:
        report.errors.append(
            f"{MANIFEST_NAME}: missing or unreadable ({type(error).__name__}: {error}); the driver writes it when "
            "the run ends: finish the run (python -m pipeline.run ... --resume) before using the output")

    # Commit markers.
    markers: dict[str, dict] = {}
    for path in samples_files(root):
        relpath = relative_to(root, path)
        shard = _name(path)[:-len(".parquet")]
        try:
            metadata = decode_metadata(_footer(path))
        except Exception as error:
            report.errors.append(f"{relpath}: unreadable commit marker ({type(error).__name__}: {error})")
            continue
        if metadata.get(KEY_SHARD) != shard or KEY_FILES not in metadata:
            report.errors.append(f"{relpath}: not a commit marker (no shard/files metadata)")
            continue
        markers[shard] = metadata

    # Files against the manifest (and, without one, against the markers).
    if manifest is not None:
        listed = {entry["path"]: entry for entry in manifest.get("files", [])}
        for shard, marker in markers.items():
            if f"samples/{shard}.parquet" not in listed:
                report.errors.append(f"samples/{shard}.parquet: committed shard not in {MANIFEST_NAME} "
                                     "(written after the manifest? rebuild it)")
            for entry in marker[KEY_FILES]:
                if entry["path"] in listed and listed[entry["path"]]["sha256"] != entry["sha256"]:
                    report.errors.append(f"{entry['path']}: sha256 in {MANIFEST_NAME} and in samples/{shard}.parquet "
                                         "disagree")
        for path in dead_letter_files(root):
            if relative_to(root, path) not in listed:
                report.errors.append(f"{relative_to(root, path)}: dead-letter file not in {MANIFEST_NAME}")
        merged_stats = manifest.get("stats") or {}
        if merged_stats.get("path"):
            listed[merged_stats["path"]] = {**merged_stats, "kind": "merged_stats", "rows": None}
    else:
        listed = {entry["path"]: {**entry, "kind": "activations"} for marker in markers.values()
                  for entry in marker[KEY_FILES]}
        for marker in markers.values():
            stats_entry = activation_stats.marker_entry(marker)
            if stats_entry is not None:
                listed[stats_entry["path"]] = stats_entry
    for errors in _parallel(lambda entry: _check_file(root, entry), list(listed.values())):
        report.errors += errors

    # Unlisted activation files and leftovers.
    in_markers = {entry["path"] for marker in markers.values() for entry in marker[KEY_FILES]}
    for meta in FileSystems.match([join(root, f"{ACTIVATIONS_DIR}/**")])[0].metadata_list:
        relpath = relative_to(root, meta.path)
        if _name(meta.path).startswith(TEMP_PREFIX):
            report.warnings.append(f"{relpath}: temporary file left by a killed writer (safe to delete once no "
                                   "run writes here)")
        elif relpath not in in_markers:
            report.errors.append(f"{relpath}: activation file listed by no commit marker (an uncommitted shard: "
                                 "rerun with --resume, which deletes it and recomputes its samples)")

    # Samples: uniqueness and completeness.
    if manifest is not None and manifest.get("hooks") and manifest.get("layers") is not None:
        expected_keys = {(hook, int(layer)) for hook in manifest["hooks"] for layer in manifest["layers"]}
    else:
        expected_keys = {(e["hook"], int(e["layer"])) for m in markers.values() for e in m[KEY_FILES]}
    owner: dict[str, str] = {}
    samples = tokens = non_finite = 0
    for shard, (errors, warnings, counts) in zip(
            sorted(markers), _parallel(lambda s: _check_shard(root, s, markers[s], expected_keys, deep),
                                       sorted(markers))):
        report.errors += errors
        report.warnings += warnings
        for sample_id in counts.get("sample_ids", []):
            if sample_id in owner:
                report.errors.append(f"samples/{shard}.parquet: sample {sample_id!r} also in "
                                     f"samples/{owner[sample_id]}.parquet (duplicate sample id)")
            else:
                owner[sample_id] = shard
        samples += len(counts.get("sample_ids", []))
        tokens += counts.get("tokens", 0)
        non_finite += counts.get("non_finite", 0)

    if manifest is not None:
        counts = manifest.get("counts", {})
        for key, value in (("samples", samples), ("tokens", tokens), ("shards", len(markers))):
            if key in counts and counts[key] != value:
                report.errors.append(f"{MANIFEST_NAME}: counts.{key} is {counts[key]}, the files hold {value}")
    report.stats.update({"shards": len(markers), "samples": samples, "tokens": tokens,
                         "hooks_layers": len(expected_keys), "files_checked": len(listed)})
    if deep:
        report.stats["non_finite_values"] = non_finite
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the run's --output (local directory or gs://bucket/path)")
    parser.add_argument("--deep", action="store_true",
                        help="also decode every activation value (width, non-finite values); reads everything")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    report = verify_output(args.output, deep=args.deep)
    if args.json:
        print(json.dumps({"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                          "stats": report.stats}, indent=1))
    else:
        print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
