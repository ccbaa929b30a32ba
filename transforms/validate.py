"""Validation of ``ArcTask`` and ``TextSample`` dicts (docs/design.md) before formatting.

A grid is a rectangular list of lists of ints 0-9 (a bool is not an int), 1 to 30 cells per side. A task has
at least one train pair (each with ``input`` and ``output``) and at least one test input; a test output is
optional (``None`` or absent). Reasons name the field path, e.g. ``train[2].output row 3 has 5 cells, row 0
has 6``, so a dead letter says exactly what to fix.
"""
from __future__ import annotations

import numbers
from typing import Any

import apache_beam as beam

from transforms.dead_letter import DEAD_LETTER_TAG, RECORDS_VALID, counter, record_text, reject

MIN_GRID_SIDE = 1
MAX_GRID_SIDE = 30
MAX_COLOR = 9

VALID_TAG = "valid"


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError) as error:  # an int past Python's str conversion limit, deep nesting
        text = f"<unprintable: {type(error).__name__}>"
    if len(text) > 40:
        text = text[:40] + "..."
    return f"{text} ({type(value).__name__})"


def _is_color(value: Any) -> bool:
    # numbers.Integral covers numpy integers from Parquet/Arrow; bool is an int subclass but never a colour.
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    return isinstance(value, numbers.Integral) and 0 <= value <= MAX_COLOR


_INT_ONLY = {int}


def _is_color_row(row) -> bool:
    # C-level fast path for the common all-plain-int row (type() excludes bool); cells of other rows are
    # checked one by one. This keeps validation well below JSON decoding in the read profile.
    return not row or (set(map(type, row)) == _INT_ONLY and min(row) >= 0 and max(row) <= MAX_COLOR)


def validate_grid(grid: Any, path: str) -> list[str]:
    """Reasons why ``grid`` (found at field ``path``) is not a valid ARC grid; empty if it is."""
    if grid is None:
        return [f"{path} is missing"]
    if not isinstance(grid, (list, tuple)):
        return [f"{path} is {_describe(grid)}, expected a list of rows"]
    if not MIN_GRID_SIDE <= len(grid) <= MAX_GRID_SIDE:
        return [f"{path} has {len(grid)} rows, expected {MIN_GRID_SIDE} to {MAX_GRID_SIDE}"]
    reasons = []
    width = None
    for row_index, row in enumerate(grid):
        if not isinstance(row, (list, tuple)):
            reasons.append(f"{path} row {row_index} is {_describe(row)}, expected a list of ints 0-9")
            continue
        if width is None:
            width = len(row)
            if not MIN_GRID_SIDE <= width <= MAX_GRID_SIDE:
                reasons.append(f"{path} row 0 has {width} cells, expected {MIN_GRID_SIDE} to {MAX_GRID_SIDE}")
        elif len(row) != width:
            reasons.append(f"{path} row {row_index} has {len(row)} cells, row 0 has {width}")
    bad_cells = [
        (row_index, col_index, cell)
        for row_index, row in enumerate(grid) if isinstance(row, (list, tuple)) and not _is_color_row(row)
        for col_index, cell in enumerate(row) if not _is_color(cell)
    ]
    if bad_cells:
        row_index, col_index, cell = bad_cells[0]
        # One reason per grid, not per cell: a 30x30 grid of floats would otherwise give 900 reasons.
        more = f" ({len(bad_cells)} invalid cells in all)" if len(bad_cells) > 1 else ""
        reasons.append(
            f"{path} cell at row {row_index} col {col_index} is {_describe(cell)}, expected an int 0-9{more}")
    return reasons


def _validate_pairs(pairs: Any, field: str, output_required: bool) -> list[str]:
    if pairs is None:
        return [f"{field} is missing"]
    if not isinstance(pairs, (list, tuple)):
        return [f"{field} is {_describe(pairs)}, expected a list of {{input, output}} pairs"]
    if not pairs:
        what = "train pair" if field == "train" else "test input"
        return [f"{field} is empty: a task needs at least one {what}"]
    reasons = []
    for index, pair in enumerate(pairs):
        path = f"{field}[{index}]"
        if not isinstance(pair, dict):
            reasons.append(f"{path} is {_describe(pair)}, expected a dict with input and output")
            continue
        reasons += validate_grid(pair.get("input"), f"{path}.input")
        output = pair.get("output")
        if output is None:
            if output_required:
                reasons.append(f"{path}.output is missing")
        else:
            reasons += validate_grid(output, f"{path}.output")
    return reasons


def _missing_strings(record: dict, keys) -> list[str]:
    """A reason for each of `keys` whose value is not a non-empty str."""
    return [f"{key} is {_describe(record.get(key))}, expected a non-empty str"
            for key in keys if not isinstance(record.get(key), str) or not record.get(key)]


def validate_task(task: Any) -> list[str]:
    """Reasons why ``task`` is not a valid ``ArcTask``; an empty list means valid."""
    if not isinstance(task, dict):
        return [f"task is {_describe(task)}, expected a dict"]
    reasons = _missing_strings(task, ("record_id", "dataset", "task_id", "source"))
    reasons += _validate_pairs(task.get("train"), "train", output_required=True)
    reasons += _validate_pairs(task.get("test"), "test", output_required=False)
    return reasons


def validate_text_sample(sample: Any) -> list[str]:
    """Reasons why ``sample`` is not a valid ``TextSample``; an empty list means valid."""
    if not isinstance(sample, dict):
        return [f"sample is {_describe(sample)}, expected a dict"]
    reasons = _missing_strings(sample, ("sample_id", "dataset", "task_id", "source"))
    text = sample.get("text")
    if not isinstance(text, str):
        reasons.append(f"text is {_describe(text)}, expected a str")
    elif not text.strip():
        reasons.append("text is empty")
    return reasons


def validate_record(record: Any) -> list[str]:
    """Validates a ``TextSample`` (it has ``text``) or else an ``ArcTask``."""
    if isinstance(record, dict) and "text" in record:
        return validate_text_sample(record)
    return validate_task(record)


class _ValidateDoFn(beam.DoFn):
    def __init__(self):
        self._valid = counter(RECORDS_VALID)

    def process(self, record):
        try:
            reasons = validate_record(record)
        except Exception as error:  # a record validation cannot even inspect is rejected, never fatal
            reasons = [f"cannot be validated: {type(error).__name__}: {error}"]
        if reasons:
            source = record.get("source", "<unknown>") if isinstance(record, dict) else "<unknown>"
            try:
                shown = record_text(record)
            except (RecursionError, ValueError) as error:  # too deep, or a number too long to print
                shown = f"<unprintable record: {type(error).__name__}>"
            yield reject(source, "validate", "; ".join(reasons), shown)
        else:
            self._valid.inc()
            yield record


class ValidateRecords(beam.PTransform):
    """Splits ``ArcTask``/``TextSample`` dicts into valid records and dead letters.

    Returns Beam tagged outputs: ``result.valid`` (the records, unchanged) and ``result.dead_letter``
    (dead-letter dicts, stage ``validate``). Counts ``records_valid`` and ``records_rejected``.
    """

    def expand(self, records):
        return records | "Validate" >> beam.ParDo(_ValidateDoFn()).with_outputs(DEAD_LETTER_TAG, main=VALID_TAG)


# The name pipeline/run.py imports.
ValidateTasks = ValidateRecords
