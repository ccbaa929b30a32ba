"""`python -m pipeline.submission OUTPUT [--out FILE]`: the ARC Prize submission of a --generate run.

Reads every committed shard's predictions (OUTPUT/predictions/<shard>.parquet, listed by its commit marker;
uncommitted files are never read), votes over augmentations as arc24 does (transforms/predictions.py: the two
most voted original-frame grids of each test input become attempt_1 and attempt_2), writes
``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}`` to OUTPUT/submission.json (or --out), prints
top-1 / top-2 accuracy per dataset over the tasks whose ground truth is known, and records both in
OUTPUT/manifest.json under `submission`. The manifest's `predictions` section (counts and accuracy) is rebuilt
with the manifest after every run; `submission` describes the file written here and is dropped by the next
rebuild, which may have added predictions since.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.output_format import SUBMISSION_NAME
from transforms.predictions import TRUNCATED, marker_entry, score, vote


def read_predictions(output_root: str, shards: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Every prediction row of the committed shards (commit markers `shards`, read when not given)."""
    import pyarrow.parquet as pq

    from transforms.write import committed_shards, join, parallel_map

    output_root = output_root.rstrip("/")
    shards = committed_shards(output_root) if shards is None else shards
    entries = [entry for entry in (marker_entry(meta) for meta in shards.values()) if entry is not None]

    def read(entry):
        with FileSystems.open(join(output_root, entry["path"]),
                              compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            # TODO(https://github.com/apache/arrow/issues/34314): a process that started Arrow's thread pool can
            # abort at exit ("terminate called without an active exception", seen once from this command under
            # the parallel test run). Prediction files are small: read them without Arrow's threads.
            return pq.read_table(handle, page_checksum_verification=True, use_threads=False).to_pylist()

    return [row for rows in parallel_map(read, entries) for row in rows]


def predictions_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of the prediction rows (parsed, truncated by --max_new_tokens, correct, incorrect, unknown for lack
    of a ground truth) and the voted top-1 / top-2 accuracy per dataset (key "null" for rows without one)."""
    accuracy = {str(dataset): value for dataset, value in score(rows).items()}
    return {
        "rows": len(rows),
        "parsed": sum(row["grid"] is not None for row in rows),
        "unparsed": sum(row["grid"] is None for row in rows),
        "truncated": sum(row["stop_reason"] == TRUNCATED for row in rows),
        "correct": sum(row["correct"] is True for row in rows),
        "incorrect": sum(row["correct"] is False for row in rows),
        "unknown": sum(row["correct"] is None for row in rows),
        "generated_tokens": sum(len(row["token_ids"]) for row in rows),
        "accuracy": accuracy,
    }


def write_submission(output_root: str, out: str | None = None) -> dict[str, Any]:
    """Votes, writes the submission file and records it in the manifest; returns the manifest's `submission`."""
    from pipeline.manifest import read_manifest, write_manifest
    from transforms.write import join, put_atomic

    output_root = output_root.rstrip("/")
    rows = read_predictions(output_root)
    if not rows:
        raise ValueError(f"{output_root} holds no committed predictions: write them with python -m pipeline.run "
                         "--generate --prompt_mode=inference ... --output=" + output_root)
    submission = vote(rows)
    data = json.dumps(submission, separators=(",", ":")).encode("utf-8")
    path = out or join(output_root, SUBMISSION_NAME)
    put_atomic(data, path)
    record = {"path": path, "tasks": len(submission), "predictions": len(rows), "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(),
              "accuracy": {str(k): v for k, v in score(rows, submission).items()},
              "written": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    try:
        manifest = read_manifest(output_root)
    except Exception as error:  # a run that never finished has no manifest: the submission still stands
        print(f"warning: {output_root}/manifest.json not updated ({type(error).__name__}: {error}); rebuild it "
              f"with python -m pipeline.manifest {output_root}", file=sys.stderr)
        return record
    manifest["submission"] = record
    write_manifest(output_root, manifest)
    return record


def format_accuracy(accuracy: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for dataset, entry in sorted(accuracy.items()):
        def percent(value):
            return "n/a" if value is None else f"{100 * value:.1f}%"

        lines.append(f"{dataset}: top-1 {percent(entry['top1'])}, top-2 {percent(entry['top2'])} over "
                     f"{entry['tasks_scored']} tasks with a known answer ({entry['tasks_unscored']} unknown)")
    return lines


def main(argv: list[str] | None = None) -> int:
    from pipeline.storage import use_storage_emulator_if_configured

    parser = argparse.ArgumentParser(prog="python -m pipeline.submission", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the --output of a pipeline.run --generate run (local or gs://)")
    parser.add_argument("--out", default=None, help=f"where to write the submission (default OUTPUT/{SUBMISSION_NAME})")
    args = parser.parse_args(argv)
    use_storage_emulator_if_configured()
    try:
        record = write_submission(args.output, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{record['path']}: {record['tasks']} tasks from {record['predictions']} predictions")
    for line in format_accuracy(record["accuracy"]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
