"""`python -m pipeline.verify OUTPUT [--deep] [--repair]`: checks an output against its manifest and commit markers.

Checks, each failure naming the file and the command that fixes it (ADVICE):
* manifest.json is present and is a manifest of this format; every samples and dead-letter file it lists exists,
  with its byte size, sha256 and row count; it lists every committed shard and dead-letter file, exactly the
  activation, statistics and predictions files their commit markers list (pipeline.dataset, which reads what the
  manifest lists, refuses an output whose manifest disagrees), and its counts are the files';
* every commit marker (samples file) is readable; every activation file it lists exists with the size, sha256 and
  row count the marker records, and so do its statistics and (--generate) predictions files, the predictions with
  one row per sample of the shard; no other file lies under activations/, samples/, stats/ or predictions/;
* no sample id appears in two shards; each sample's num_tokens matches its token_ids;
* every sample is complete: for each hook and layer of the run, positions 0..num_tokens-1 each exactly once, with
  the sample's token ids;
* Parquet page checksums, where the writer stored them, are verified on every read;
* --deep also decodes every activation value: width d_model, and non-finite values reported.
Exit code 0 when everything holds, 1 otherwise.

--repair makes the output whole again: it uncommits every damaged shard (its commit marker first, then its
activation files), deletes foreign, uncommitted and temporary files under activations/ and samples/, temporary
files under dead_letter/ and damaged dead-letter files, rebuilds manifest.json and prints what it did. A following
`python -m pipeline.run ... --resume` recomputes exactly the uncommitted samples and rewrites the dead letters.
Run it only while no run writes into the output.
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

from pipeline import identity as identity_lib
from pipeline.manifest import (
    MANIFEST_NAME,
    RUNS_DIR,
    build_manifest,
    dead_letter_files,
    file_digest,
    merged_run_info,
    read_manifest,
    scan_dead_letters,
    write_manifest,
)
from transforms.output_format import (
    ACTIVATIONS_DIR,
    DEAD_LETTER_DIR,
    KEY_FILES,
    KEY_SHARD,
    PREDICTIONS_DIR,
    SAMPLES_DIR,
    STATS_DIR,
    TEMP_PREFIX,
    activations_to_numpy,
    basename,
    decode_metadata,
    relative_to,
    samples_relpath,
)
from transforms import activation_stats
from transforms import predictions as predictions_lib
from transforms.write import join, match_files, parallel_map


@dataclass(frozen=True)
class Advice:
    """The commands that fix one kind of finding, in order; `{output}` stands for the output's path."""
    key: str
    commands: tuple[str, ...]
    why: str

    def text(self, output: str) -> str:
        steps = " then ".join(f"`{command.format(output=output)}`" for command in self.commands)
        return f"fix: {steps} ({self.why.format(output=output)})"


RESUME_COMMAND = "python -m pipeline.run <the run's options> --resume"
REPAIR_COMMAND = "python -m pipeline.verify {output} --repair"
UNCOMMIT = Advice(
    "uncommit", (REPAIR_COMMAND, RESUME_COMMAND),
    f"--repair uncommits the shard and deletes its files; --resume recomputes its samples; the run's options are "
    f"in {{output}}/{RUNS_DIR}/")
REMOVE = Advice("remove", (REPAIR_COMMAND,), "the file is no part of the output: --repair deletes it")
REBUILD_MANIFEST = Advice(
    "rebuild_manifest", ("python -m pipeline.manifest {output}",),
    "rebuilds the manifest from the commit markers; after a run that was stopped, finish it with --resume instead")
REWRITE_DEAD_LETTERS = Advice(
    "rewrite_dead_letters", (REPAIR_COMMAND, RESUME_COMMAND),
    f"--repair deletes the damaged dead-letter file; --resume rewrites every dead letter of its host; the run's "
    f"options are in {{output}}/{RUNS_DIR}/")
# Every advice verify can print; tests make each one's fault and check that its commands fix it.
ADVICE = {advice.key: advice for advice in (UNCOMMIT, REMOVE, REBUILD_MANIFEST, REWRITE_DEAD_LETTERS)}


@dataclass(frozen=True)
class Finding:
    """One error or warning: the file it is about, what is wrong, how to fix it, and the shard it condemns
    (for UNCOMMIT) so that --repair acts on exactly what verify found."""
    path: str
    message: str
    advice: Advice
    shard: str | None = None

MAX_DETAILS = 5
STATS_KINDS = (activation_stats.KIND, "merged_stats")


@dataclass
class VerifyReport:
    output: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # Commit markers as read (shard -> metadata), for --repair to find a damaged shard's files.
    markers: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def fail(self, path: str, message: str, advice: Advice, shard: str | None = None) -> None:
        self.findings.append(Finding(path, message, advice, shard))
        self.errors.append(f"{path}: {message}; {advice.text(self.output)}")

    def warn(self, path: str, message: str, advice: Advice) -> None:
        self.findings.append(Finding(path, message, advice))
        self.warnings.append(f"{path}: {message}; {advice.text(self.output)}")

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
        return pq.read_table(handle, columns=columns, page_checksum_verification=True)


def _footer(path: str) -> pq.FileMetaData:
    with _open(path) as handle:
        return pq.ParquetFile(handle, page_checksum_verification=True).metadata


def _unreadable(error: Exception) -> str:
    return f"unreadable ({type(error).__name__}: {error})"


def _check_file(root: str, entry: dict) -> list[str]:
    """Problems with one listed file's existence, size, sha256 and row count (each without the path)."""
    path = join(root, entry["path"])
    if not FileSystems.exists(path):
        return ["listed but missing"]
    problems = []
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
        return [_unreadable(error)]
    if size != entry.get("bytes"):
        problems.append(f"{size} bytes on disk, {entry.get('bytes')} listed")
    if sha != entry.get("sha256"):
        problems.append(f"sha256 {sha[:16]}... does not match the listed {str(entry.get('sha256'))[:16]}...")
    if rows != entry.get("rows"):
        problems.append(f"{rows} rows, {entry.get('rows')} listed")
    return problems


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
    """(path, problem) errors, warnings and counts of one committed shard: its activation files against the
    sizes, sha256 and row counts its marker records, then every row against its samples."""
    errors, warnings = [], []
    samples_rel = samples_relpath(shard)
    for entry in marker[KEY_FILES]:
        errors += [(entry["path"], problem) for problem in _check_file(root, {**entry, "kind": "activations"})]
    try:
        stats_entry = activation_stats.marker_entry(marker)
    except ValueError as error:
        errors.append((samples_relpath(shard), str(error)))
        stats_entry = None
    if stats_entry is not None:
        errors += [(stats_entry["path"], problem) for problem in _check_file(root, {**stats_entry, "rows": None})]
    predictions_entry = _predictions_entry(marker, errors)
    try:
        samples = _read_table(join(root, samples_rel))
    except Exception as error:
        return errors + [(samples_rel, _unreadable(error))], [], {}
    if predictions_entry is not None:
        errors += _check_predictions(root, predictions_entry, samples["sample_id"].to_pylist())
    lengths = pc.list_value_length(samples["token_ids"]).to_numpy()
    bad = np.flatnonzero(lengths != samples["num_tokens"].to_numpy())
    if bad.size:
        errors.append((samples_rel, f"num_tokens differs from len(token_ids) for "
                                    f"{samples['sample_id'][int(bad[0])].as_py()!r} and {bad.size - 1} more"))
    sample_ids = samples["sample_id"].to_pylist()
    expected = _expected_rows(samples)
    keys = {(entry["hook"], int(entry["layer"])) for entry in marker[KEY_FILES]}
    for hook, layer in sorted(expected_keys - keys):
        errors.append((samples_rel, f"shard has no activation file for hook={hook} layer={layer}"))
    damaged = {path for path, _ in errors}
    non_finite = 0
    for entry in marker[KEY_FILES]:
        relpath = entry["path"]
        if relpath in damaged:
            continue
        path = join(root, relpath)
        columns = None if deep else ["sample_id", "position", "token_id"]
        try:
            table = _read_table(path, columns)
        except Exception as error:
            errors.append((relpath, _unreadable(error)))
            continue
        errors += [(relpath, message[len(relpath) + 2:]) for message in check_rows(relpath, sample_ids, expected,
                                                                                   table)]
        if deep:
            metadata = decode_metadata(_footer(path))
            values = activations_to_numpy(table)
            if str(values.shape[1]) != metadata.get("d_model"):
                errors.append((relpath, f"activation width {values.shape[1]}, metadata d_model "
                                        f"{metadata.get('d_model')}"))
            count = int(values.size - np.isfinite(values.astype(np.float32)).sum())
            if count:
                warnings.append(f"{relpath}: {count} non-finite activation values "
                                f"(float16_overflow in metadata: {metadata.get('float16_overflow')})")
            non_finite += count
    return errors, warnings, {"sample_ids": sample_ids, "tokens": int(lengths.sum()), "non_finite": non_finite}


def _predictions_entry(marker: dict, errors: list | None = None) -> dict | None:
    """The marker's predictions-file entry (--generate runs), None without one; a malformed one is an error."""
    try:
        return predictions_lib.marker_entry(marker)
    except ValueError as error:
        if errors is not None:
            errors.append((samples_relpath(marker.get(KEY_SHARD, "?")), str(error)))
        return None


def _check_predictions(root: str, entry: dict, sample_ids: list[str]) -> list[tuple[str, str]]:
    """A predictions file as its marker lists it (size, sha256, rows), holding one row per sample of its shard."""
    problems = _check_file(root, {**entry, "kind": "predictions"})
    if problems:
        return [(entry["path"], problem) for problem in problems]
    try:
        held = _read_table(join(root, entry["path"]), ["sample_id"])["sample_id"].to_pylist()
    except Exception as error:
        return [(entry["path"], _unreadable(error))]
    if sorted(held) != sorted(sample_ids):
        strays = sorted(set(held) ^ set(sample_ids))
        return [(entry["path"], f"its sample ids are not one per sample of its shard (e.g. {strays[:MAX_DETAILS]}, "
                                f"{len(held)} rows for {len(sample_ids)} samples)")]
    return []


def _shard_files(marker: dict) -> list[dict]:
    """The entries of every file a commit marker covers: its activation files, its statistics file and (--generate)
    its predictions file."""
    entries = list(marker.get(KEY_FILES, []))
    try:
        stats_entry = activation_stats.marker_entry(marker)
    except ValueError:  # reported by _check_shard
        stats_entry = None
    predictions_entry = _predictions_entry(marker)
    return entries + [entry for entry in (stats_entry, predictions_entry) if entry]


def _data_files(root: str) -> list[str]:
    """Every file under activations/, samples/, stats/ and predictions/, temporary or not, as paths relative to
    the output."""
    return sorted(relative_to(root, meta.path)
                  for directory in (ACTIVATIONS_DIR, SAMPLES_DIR, STATS_DIR, PREDICTIONS_DIR)
                  for meta in match_files(join(root, f"{directory}/**")))


def _dead_letter_temp_files(root: str) -> list[str]:
    return sorted(relative_to(root, meta.path) for meta in match_files(join(root, f"{DEAD_LETTER_DIR}/*"))
                  if basename(meta.path).startswith(TEMP_PREFIX))


def _shard_of(relpath: str) -> str | None:
    """The shard a samples or activation file name belongs to (None for a name no writer makes)."""
    name = relpath.rsplit("/", 1)[-1]
    return name[:-len(".parquet")] if name.endswith(".parquet") and not name.startswith(TEMP_PREFIX) else None


def _check_identity(root: str, manifest: dict | None, report: VerifyReport) -> None:
    """One output holds one run: a shard whose run identity differs from the output's (OUTPUT/_identity.json, or
    the one most shards record) is condemned, and so is a manifest that records another identity."""
    reference = identity_lib.read_identity_file(root)
    for shard, diffs in identity_lib.mismatched_shards(report.markers, reference):
        report.fail(samples_relpath(shard), "written by another run than the rest of the output: " + "; ".join(diffs),
                    UNCOMMIT, shard)
    recorded = manifest.get("identity") if manifest else None
    if recorded is not None and not isinstance(recorded, dict):
        report.fail(MANIFEST_NAME, f"its identity is {json.dumps(recorded)[:80]}, not an object", REBUILD_MANIFEST)
        recorded = None
    if recorded and reference and identity_lib.differences(reference, recorded):
        report.fail(MANIFEST_NAME, "its run identity differs from the output's: "
                    + "; ".join(identity_lib.differences(reference, recorded)), REBUILD_MANIFEST)


def verify_output(output: str, deep: bool = False) -> VerifyReport:
    root = output.rstrip("/")
    report = VerifyReport(output=root)
    manifest = _read_manifest(root, report)
    data_files = _data_files(root)
    _collect_markers(root, data_files, report)
    _check_unlisted_files(root, data_files, report)
    _check_identity(root, manifest, report)
    checked = _check_against_manifest(root, manifest, report)
    expected_keys = _expected_keys(manifest, report.markers)
    samples, tokens, non_finite = _check_shards(root, expected_keys, deep, report)
    if manifest is not None:
        counts = manifest.get("counts", {})
        if not isinstance(counts, dict):
            report.fail(MANIFEST_NAME, f"its counts is {json.dumps(counts)[:80]}, not an object", REBUILD_MANIFEST)
            counts = {}
        for key, value in (("samples", samples), ("tokens", tokens), ("shards", len(report.markers))):
            if key in counts and counts[key] != value:
                report.fail(MANIFEST_NAME, f"counts.{key} is {counts[key]}, the files hold {value}",
                            REBUILD_MANIFEST)
    report.stats.update({"shards": len(report.markers), "samples": samples, "tokens": tokens,
                         "hooks_layers": len(expected_keys), "files_checked": checked})
    if deep:
        report.stats["non_finite_values"] = non_finite
    return report


def _read_manifest(root: str, report: VerifyReport) -> dict | None:
    try:
        return read_manifest(root)
    except ValueError as error:  # not JSON, or not this format's structure; the advice says how to rebuild it
        report.fail(MANIFEST_NAME, str(error).partition("; rebuild it with ")[0], REBUILD_MANIFEST)
        return None
    except Exception as error:
        report.fail(MANIFEST_NAME, f"missing or {_unreadable(error)}; the driver writes it when the run ends",
                    REBUILD_MANIFEST)
        return None


def _collect_markers(root: str, data_files: list[str], report: VerifyReport) -> None:
    """The commit markers into report.markers; temporary and foreign files among them reported."""
    for relpath in data_files:
        name = relpath.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX):
            report.warn(relpath, "temporary file left by a killed writer", REMOVE)
            continue
        if not relpath.startswith(f"{SAMPLES_DIR}/"):
            continue
        shard = _shard_of(relpath)
        if shard is None or relpath != samples_relpath(shard):
            report.fail(relpath, "foreign file among the commit markers (no writer makes this name)", REMOVE)
            continue
        try:
            metadata = decode_metadata(_footer(join(root, relpath)))
        except Exception as error:
            report.fail(relpath, f"{_unreadable(error)} commit marker", UNCOMMIT, shard)
            continue
        if metadata.get(KEY_SHARD) != shard or KEY_FILES not in metadata:
            report.fail(relpath, "not a commit marker (no shard/files metadata): a foreign file", REMOVE)
            continue
        report.markers[shard] = metadata


def _check_unlisted_files(root: str, data_files: list[str], report: VerifyReport) -> None:
    """Activation and statistics files no commit marker lists, and dead-letter temporary files."""
    in_markers = {entry["path"] for marker in report.markers.values() for entry in _shard_files(marker)}
    for relpath in data_files:
        name = relpath.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX) or relpath in in_markers:
            continue
        if relpath.startswith(f"{ACTIVATIONS_DIR}/"):
            report.fail(relpath, "activation file listed by no commit marker (an uncommitted shard or a foreign "
                                 "file)", REMOVE)
        elif relpath.startswith(f"{STATS_DIR}/"):
            report.fail(relpath, "statistics file listed by no commit marker (an uncommitted shard or a foreign "
                                 "file)", REMOVE)
        elif relpath.startswith(f"{PREDICTIONS_DIR}/"):
            report.fail(relpath, "predictions file listed by no commit marker (an uncommitted shard or a foreign "
                                 "file)", REMOVE)
    for relpath in _dead_letter_temp_files(root):
        report.warn(relpath, "temporary file left by a killed writer", REMOVE)


def _check_against_manifest(root: str, manifest: dict | None, report: VerifyReport) -> int:
    """Samples, dead-letter and merged statistics files against the manifest; returns how many files it
    checked (without a manifest: how many the commit markers list)."""
    markers = report.markers
    if manifest is None:
        return sum(len(marker[KEY_FILES]) for marker in markers.values())
    listed = {entry["path"]: entry for entry in manifest.get("files", [])}
    for shard, marker in markers.items():
        if samples_relpath(shard) not in listed:
            report.fail(samples_relpath(shard), f"committed shard not in {MANIFEST_NAME} (written after it)",
                        REBUILD_MANIFEST)
            continue  # its files are not in the manifest either: the shard's finding covers them
        for entry in _shard_files(marker):
            if entry["path"] not in listed:
                # pipeline.dataset reads the files the manifest lists (and refuses one that leaves a file out).
                report.fail(entry["path"], f"listed by its commit marker {samples_relpath(shard)} but not by "
                                           f"{MANIFEST_NAME}", REBUILD_MANIFEST)
            elif listed[entry["path"]].get("sha256") != entry.get("sha256"):
                report.fail(entry["path"], f"sha256 in {MANIFEST_NAME} and in {samples_relpath(shard)} "
                                           "disagree", REBUILD_MANIFEST)
    for path in dead_letter_files(root):
        if relative_to(root, path) not in listed:
            report.fail(relative_to(root, path), f"dead-letter file not in {MANIFEST_NAME}", REBUILD_MANIFEST)
    entries = [entry for entry in listed.values() if entry.get("kind") in ("samples", "dead_letter")]
    checked = len(listed)
    for entry, problems in zip(entries, parallel_map(lambda entry: _check_file(root, entry), entries)):
        for problem in problems:
            if entry["kind"] == "samples":
                report.fail(entry["path"], problem, UNCOMMIT, entry.get("shard") or _shard_of(entry["path"]))
            else:
                report.fail(entry["path"], problem, REWRITE_DEAD_LETTERS)
    _check_manifest_only_files(listed, report)
    merged_stats = manifest.get("stats") or {}
    if not isinstance(merged_stats, dict):
        report.fail(MANIFEST_NAME, f"its stats is {json.dumps(merged_stats)[:80]}, not an object", REBUILD_MANIFEST)
        merged_stats = {}
    if merged_stats.get("path"):
        checked += 1
        for problem in _check_file(root, {**merged_stats, "kind": "merged_stats", "rows": None}):
            report.fail(merged_stats["path"], problem, REBUILD_MANIFEST)
    return checked


def _check_manifest_only_files(listed: dict[str, dict], report: VerifyReport) -> None:
    """Activation, statistics and predictions files the manifest lists but no commit marker does: files that are no
    part of the output (pipeline.dataset refuses a manifest that lists one)."""
    covered = {entry["path"] for marker in report.markers.values() for entry in _shard_files(marker)}
    # Shards already condemned (an unreadable or missing commit marker): their finding covers their files.
    condemned = {finding.shard for finding in report.findings if finding.shard}
    for path, entry in sorted(listed.items()):
        if entry.get("kind") in ("samples", "dead_letter") or path in covered:
            continue
        if (entry.get("shard") or _shard_of(path)) in condemned:
            continue
        report.fail(path, f"listed by {MANIFEST_NAME} (as {entry.get('kind')}) but by no commit marker",
                    REBUILD_MANIFEST)


def _expected_keys(manifest: dict | None, markers: dict[str, dict]) -> set[tuple[str, int]]:
    """The (hook, layer) files every shard should hold: the manifest's, else those any marker lists."""
    if manifest is not None and manifest.get("hooks") and manifest.get("layers") is not None:
        try:
            return {(hook, int(layer)) for hook in manifest["hooks"] for layer in manifest["layers"]}
        except (TypeError, ValueError):  # not lists of names and numbers: what the markers list is the run's
            pass
    return {(e["hook"], int(e["layer"])) for m in markers.values() for e in m[KEY_FILES]}


def _check_shards(root: str, expected_keys, deep: bool, report: VerifyReport) -> tuple[int, int, int]:
    """Each shard's activation files, and sample ids unique across shards; returns (samples, tokens,
    non-finite values)."""
    markers = report.markers
    owner: dict[str, str] = {}
    samples = tokens = non_finite = 0
    for shard, (errors, warnings, counts) in zip(
            sorted(markers), parallel_map(lambda s: _check_shard(root, s, markers[s], expected_keys, deep),
                                       sorted(markers))):
        for path, problem in errors:
            report.fail(path, problem, UNCOMMIT, shard)
        report.warnings += warnings
        duplicates = [sample_id for sample_id in counts.get("sample_ids", []) if sample_id in owner]
        if duplicates:
            # The later shard goes: --resume then finds the earlier shard's copy and recomputes only the rest.
            report.fail(samples_relpath(shard), f"sample {duplicates[0]!r} (and {len(duplicates) - 1} more) also "
                        f"in {samples_relpath(owner[duplicates[0]])} (duplicate sample id)", UNCOMMIT, shard)
        for sample_id in counts.get("sample_ids", []):
            owner.setdefault(sample_id, shard)
        samples += len(counts.get("sample_ids", []))
        tokens += counts.get("tokens", 0)
        non_finite += counts.get("non_finite", 0)
    return samples, tokens, non_finite


def _delete(root: str, relpaths) -> list[str]:
    """Deletes the files that exist, one call each so that one vanished file does not stop the rest."""
    deleted = []
    for relpath in relpaths:
        path = join(root, relpath)
        if FileSystems.exists(path):
            FileSystems.delete([path])
            deleted.append(relpath)
    return deleted


class RepairRefused(RuntimeError):
    """A run holds a lease on the output: repairing now would delete files it is writing."""


def repair_output(output: str, deep: bool = False) -> tuple[list[str], VerifyReport]:
    """Makes the output pass verify (see the module docstring); returns what it did, one line per action, and
    the report of the verify run it acted on."""
    from pipeline.lease import describe_holder, live_leases

    root = output.rstrip("/")
    running = live_leases(root)
    if running:
        raise RepairRefused(
            f"{root} is being written ({'; '.join(f'{share}: {describe_holder(h)}' for share, h in running.items())})"
            ": --repair deletes files a running writer needs; wait for it or stop it first")
    report = verify_output(root, deep=deep)
    actions = []
    doomed = sorted({f.shard for f in report.findings if f.advice is UNCOMMIT and f.shard})
    for shard in doomed:
        # The marker goes first: once it is gone the shard is uncommitted, whatever happens to the rest.
        files = [samples_relpath(shard)]
        files += [entry["path"] for entry in _shard_files(report.markers.get(shard, {}))]
        files += [path for path in _data_files(root) if _shard_of(path) == shard and path not in files]
        deleted = _delete(root, files)
        reasons = sorted({f"{f.path}: {f.message}" for f in report.findings if f.shard == shard})
        actions.append(f"uncommitted shard {shard} (deleted {len(deleted)} files) because "
                       + "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""))
    keep = {samples_relpath(shard) for shard in report.markers if shard not in doomed}
    keep |= {entry["path"] for shard, marker in report.markers.items() if shard not in doomed
             for entry in _shard_files(marker)}
    for relpath in _delete(root, [path for path in _data_files(root) if path not in keep]):
        actions.append(f"deleted {relpath} (no committed shard holds it)")
    dead = {f.path for f in report.findings if f.advice is REWRITE_DEAD_LETTERS}
    dead |= set(_dead_letter_temp_files(root))
    for relpath in _delete(root, sorted(dead)):
        actions.append(f"deleted {relpath} (damaged or temporary dead-letter file; --resume rewrites it)")
    run_info = merged_run_info(root)
    if not run_info:
        try:  # an output without host records keeps the run description of its old manifest
            run_info = {key: value for key, value in read_manifest(root).items()
                        if key not in ("format_version", "written", "files", "warnings")}
        except Exception:  # no manifest either: the rebuilt one describes the files only
            run_info = {}
    manifest = build_manifest(root, run_info)
    write_manifest(root, manifest)
    counts = manifest["counts"]
    actions.append(f"rebuilt {MANIFEST_NAME}: {counts['shards']} shards, {counts['samples']} samples, "
                   f"{counts['tokens']} tokens")
    return actions, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the run's --output (local directory or gs://bucket/path)")
    parser.add_argument("--deep", action="store_true",
                        help="also decode every activation value (width, non-finite values); reads everything")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--repair", action="store_true",
                        help="uncommit damaged shards, delete foreign, uncommitted and temporary files, rebuild the "
                             "manifest, print what was done, then verify again; follow with pipeline.run --resume "
                             "to recompute the uncommitted samples. Refused while a run holds a lease on the output.")
    args = parser.parse_args(argv)
    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    actions, before = [], None
    if args.repair:
        try:
            actions, before = repair_output(args.output, deep=args.deep)
        except RepairRefused as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"repair {before.output}: {len(before.errors)} errors, {len(before.warnings)} warnings found")
            for action in actions:
                print(f"  {action}")
    report = verify_output(args.output, deep=args.deep)
    if args.json:
        print(json.dumps({"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                          "stats": report.stats,
                          "findings": [{"path": f.path, "message": f.message, "advice": f.advice.key,
                                        "shard": f.shard} for f in report.findings],
                          **({"repaired": actions} if args.repair else {})}, indent=1))
    else:
        print(report.format())
        if args.repair and report.ok and any(f.advice in (UNCOMMIT, REWRITE_DEAD_LETTERS) for f in before.findings):
            print(f"now run `{RESUME_COMMAND}` to recompute the uncommitted samples and rewrite the dead letters")
    return 0 if report.ok else 1


if __name__ == "__main__":
    from pipeline.errors import exit_report

    exit_report(main)
