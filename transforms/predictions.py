"""A generated answer back to an ARC grid, scored, and voted into an ARC Prize submission (plain functions, no Beam).

One prediction row per sample (``prediction_row``): the generated text and ids, the grid parsed with the grid
encoder's ``to_grid`` as arc24 parses it (a failure is recorded with its reason, never raised), the grid mapped back
through the inverse augmentation, the ground truth in the original task's frame (None when unknown), ``correct``
(None when the ground truth is unknown) and the sum of the generated tokens' log-probabilities.

``vote`` groups the rows of one task's test input across augmentations, counts identical original-frame grids and
keeps the two most voted as ``attempt_1`` / ``attempt_2``, as arc24 does; ties go to the candidate with the higher
best summed log-probability, then to the earlier sample id, so the result never depends on row order. ``score``
gives top-1 / top-2 accuracy per dataset the ARC Prize way: a test input counts when one of its attempts equals the
truth, a task scores the mean over its test inputs, a dataset the mean over its tasks.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from transforms.augment import invert_grid
from transforms.grid_encoders import GridEncoder, grid_array
from transforms.prompts import INFERENCE_ANSWER_START

MAX_GRID_SIDE = 30
# Markers a decoded answer may end with; they are not part of the grid.
END_MARKERS = ("<|im_end|>", "<|endoftext|>")
TRUNCATED = "max_new_tokens"
NO_ATTEMPT: list = []


def parse_answer(text: str, encoder: GridEncoder, stop_reason: str | None = None
                 ) -> tuple[list[list[int]] | None, str | None]:
    """(grid, None), or (None, reason) when the continuation of an inference prompt is no complete ARC grid.

    `text` is what the model wrote after the prompt's opening ```` ```grid ````; encoders that write the fence get
    it back in front before ``to_grid``. An answer cut off by the token budget (`stop_reason` "max_new_tokens") is a
    failure even where its first rows would parse: it is not the answer the model would have written."""
    if stop_reason == TRUNCATED:
        return None, "truncated: the answer reached max_new_tokens before its closing fence"
    body = text
    for marker in END_MARKERS:
        body = body.split(marker, 1)[0]
    probe = encoder.to_text([[0]])
    full = INFERENCE_ANSWER_START + body if probe.startswith(INFERENCE_ANSWER_START) else body
    try:
        grid = encoder.to_grid(full)
    except (ValueError, IndexError) as error:
        return None, f"not parseable by {encoder.spec}: {type(error).__name__}: {error}"
    try:
        array = grid_array(grid)
    except ValueError as error:
        return None, f"impossible grid: {error}"
    if array.shape[0] > MAX_GRID_SIDE or array.shape[1] > MAX_GRID_SIDE:
        return None, f"impossible grid: shape {array.shape[0]}x{array.shape[1]} exceeds ARC's 30x30"
    return array.tolist(), None


def prediction_row(sample: dict[str, Any], text: str, token_ids: Sequence[int], logprobs: Sequence[float],
                   stop_reason: str, encoder: GridEncoder) -> dict[str, Any]:
    """The prediction of one sample (an ``ArcSample`` dict: sample_id, dataset, task_id, test_index, augmentation,
    test_output in the augmented frame or None)."""
    grid, error = parse_answer(text, encoder, stop_reason)
    augmentation = sample["augmentation"]
    original = None if grid is None else invert_grid(grid, augmentation)
    truth = sample.get("test_output")
    truth = None if truth is None else invert_grid(truth, augmentation)
    return {
        "sample_id": sample["sample_id"],
        "dataset": sample.get("dataset"),
        "task_id": sample["task_id"],
        "test_index": int(sample["test_index"]),
        "augmentation": augmentation if isinstance(augmentation, str) else str(augmentation),
        "text": text,
        "token_ids": [int(t) for t in token_ids],
        "stop_reason": stop_reason,
        "grid": grid,
        "parse_error": error,
        "grid_original": original,
        "ground_truth": truth,
        "correct": None if truth is None else original == truth,
        "logprob_sum": float(np.sum(np.asarray(logprobs, dtype=np.float64))),
    }


def _key(grid) -> tuple:
    return tuple(tuple(row) for row in grid)


def ranked_candidates(rows: Iterable[dict[str, Any]]) -> list[tuple[list[list[int]], int, float]]:
    """(grid, votes, best logprob_sum) of the parsed original-frame grids of some rows, most voted first."""
    votes: dict[tuple, list] = {}
    for row in rows:
        if row.get("grid_original") is None:
            continue
        key = _key(row["grid_original"])
        entry = votes.setdefault(key, [row["grid_original"], 0, -np.inf, row["sample_id"]])
        entry[1] += 1
        entry[2] = max(entry[2], row["logprob_sum"])
        entry[3] = min(entry[3], row["sample_id"])
    ranked = sorted(votes.values(), key=lambda e: (-e[1], -e[2], e[3]))
    return [(grid, count, best) for grid, count, best, _ in ranked]


def vote(rows: Iterable[dict[str, Any]], num_tests: dict[str, int] | None = None
         ) -> dict[str, list[dict[str, list]]]:
    """The ARC Prize submission ``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}``, one dict per test
    input in test-index order. `num_tests` gives each task's number of test inputs (default: the highest test index
    seen + 1); a test input without any parsed grid, or with only one candidate, gets ``[]`` for the missing
    attempt (a valid entry that never scores)."""
    groups: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["task_id"]][row["test_index"]].append(row)
    task_ids = set(groups) | set(num_tests or {})
    submission = {}
    for task_id in sorted(task_ids):
        by_test = groups.get(task_id, {})
        count = (num_tests or {}).get(task_id, max(by_test, default=-1) + 1)
        entries = []
        for test_index in range(count):
            ranked = ranked_candidates(by_test.get(test_index, []))
            attempts = [grid for grid, _, _ in ranked[:2]] + [NO_ATTEMPT] * 2
            entries.append({"attempt_1": attempts[0], "attempt_2": attempts[1]})
        submission[task_id] = entries
    return submission


def ground_truths(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[list[int]] | None]:
    """(task_id, test_index) -> the original-frame truth its rows carry (None when unknown). Rows of one test input
    must agree (they come from the same task); a disagreement is an error naming the sample."""
    truths: dict[tuple[str, int], list[list[int]] | None] = {}
    for row in rows:
        key = (row["task_id"], row["test_index"])
        truth = row.get("ground_truth")
        if key in truths and truths[key] is not None and truth is not None and truths[key] != truth:
            raise ValueError(f"sample {row['sample_id']}: its ground truth differs from another sample of task "
                             f"{key[0]} test {key[1]}; predictions of different task versions are mixed")
        if truths.get(key) is None:
            truths[key] = truth
    return truths


def score(rows: Sequence[dict[str, Any]], submission: dict[str, list[dict[str, list]]] | None = None
          ) -> dict[str, dict[str, Any]]:
    """Per dataset: top-1 and top-2 accuracy over the tasks whose every test input has a known truth, the number
    of such tasks, and the number of tasks left unscored for lack of a truth."""
    rows = list(rows)
    submission = vote(rows) if submission is None else submission
    truths = ground_truths(rows)
    dataset_of = {row["task_id"]: row.get("dataset") for row in rows}
    per_dataset: dict[Any, dict[str, list]] = defaultdict(lambda: {"top1": [], "top2": [], "unscored": []})
    for task_id, entries in submission.items():
        bucket = per_dataset[dataset_of.get(task_id)]
        known = [truths.get((task_id, i)) for i in range(len(entries))]
        if not entries or any(truth is None for truth in known):
            bucket["unscored"].append(task_id)
            continue
        top1 = [entry["attempt_1"] == truth for entry, truth in zip(entries, known)]
        top2 = [entry["attempt_1"] == truth or entry["attempt_2"] == truth for entry, truth in zip(entries, known)]
        bucket["top1"].append(float(np.mean(top1)))
        bucket["top2"].append(float(np.mean(top2)))
    return {
        dataset: {"tasks_scored": len(b["top1"]), "tasks_unscored": len(b["unscored"]),
                  "top1": float(np.mean(b["top1"])) if b["top1"] else None,
                  "top2": float(np.mean(b["top2"])) if b["top2"] else None}
        for dataset, b in per_dataset.items()
    }


# ------------------------------------------------------------------------------------------- files

def predictions_schema():
    """Columns of predictions/<shard>.parquet, one row per sample (docs/format.md). pyarrow is imported here so
    that voting and scoring stay importable without it."""
    import pyarrow as pa

    grid = pa.list_(pa.list_(pa.int8()))
    return pa.schema([
        ("sample_id", pa.string()), ("dataset", pa.string()), ("task_id", pa.string()),
        ("test_index", pa.int32()), ("augmentation", pa.string()), ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())), ("num_generated", pa.int32()), ("stop_reason", pa.string()),
        ("grid", grid), ("parse_error", pa.string()), ("grid_original", grid), ("ground_truth", grid),
        ("correct", pa.bool_()), ("logprob_sum", pa.float64()),
    ])


def predictions_table(rows: Sequence[dict[str, Any]]):
    """The prediction rows of one shard as an Arrow table of `predictions_schema()`, in sample-id order."""
    import pyarrow as pa

    schema = predictions_schema()
    ordered = sorted(rows, key=lambda row: row["sample_id"])
    columns = {}
    for field in schema:
        if field.name == "num_generated":
            columns[field.name] = [len(row["token_ids"]) for row in ordered]
        else:
            columns[field.name] = [row.get(field.name) for row in ordered]
    return pa.table(columns, schema=schema)


def predictions_file(shard: str, rows: Sequence[dict[str, Any]]) -> tuple[bytes, dict[str, Any]]:
    """The bytes of predictions/<shard>.parquet and its commit-marker entry {path, kind, rows, bytes, sha256}."""
    import hashlib

    from transforms.output_format import KEY_PREDICTIONS, parquet_bytes, predictions_relpath

    table = predictions_table(rows)
    data = parquet_bytes(table.replace_schema_metadata({"shard": shard}))
    entry = {"path": predictions_relpath(shard), "kind": KEY_PREDICTIONS, "rows": table.num_rows,
             "bytes": data.size, "sha256": hashlib.sha256(memoryview(data)).hexdigest()}
    return data, entry


def marker_entry(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The predictions-file entry of a commit marker's (decoded) metadata; None for a shard without one."""
    from transforms.output_format import KEY_PREDICTIONS, marker_file_entry

    return marker_file_entry(metadata, KEY_PREDICTIONS, frozenset({"path", "rows", "bytes", "sha256"}))


def rows_from_table(table) -> list[dict[str, Any]]:
    """Prediction rows back from a predictions table (the form `vote` and `score` take)."""
    return table.to_pylist()
