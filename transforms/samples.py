"""``ArcTask`` -> ``ArcSample``: one sample per test input, times (1 + N augmentations) (docs/design.md).

Sample ids are ``f"{record_id}/t{test_index}/a{aug_index}"``; ``a0`` is the task as given, ``a1..aN`` are
augmentations drawn deterministically from ``(seed, sample_id)`` (transforms/augment.py).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import apache_beam as beam

from transforms.augment import NO_AUGMENTATION, augment_examples, random_augmentation
from transforms.dead_letter import counter


def sample_id(record_id: str, test_index: int, aug_index: int) -> str:
    return f"{record_id}/t{test_index}/a{aug_index}"


def expand_task(task: dict[str, Any], augmentations: int = 0, seed: int | str = 0) -> Iterator[dict[str, Any]]:
    """The ``ArcSample`` dicts of one ``ArcTask``, in (test index, augmentation index) order."""
    if augmentations < 0:
        raise ValueError(f"augmentations must be >= 0, got {augmentations}")
    train = task["train"]
    for test_index, test in enumerate(task["test"]):
        for aug_index in range(augmentations + 1):
            this_id = sample_id(task["record_id"], test_index, aug_index)
            augmentation = (
                dict(NO_AUGMENTATION) if aug_index == 0
                else random_augmentation(seed, this_id, aug_index, len(train)))
            new_train, test_input, test_output = augment_examples(
                train, test["input"], test.get("output"), augmentation)
            yield {
                "sample_id": this_id,
                "dataset": task["dataset"],
                "task_id": task["task_id"],
                "test_index": test_index,
                "augmentation": json.dumps(augmentation, separators=(",", ":")),
                "source": task["source"],
                "train": new_train,
                "test_input": test_input,
                "test_output": test_output,
            }


class _ExpandDoFn(beam.DoFn):
    def __init__(self, augmentations: int, seed: int | str):
        self.augmentations = augmentations
        self.seed = seed

    def setup(self):
        self.samples_counter = counter("samples_expanded")

    def process(self, record):
        if isinstance(record, dict) and "text" in record:
            # TextSamples are already samples; they pass through so one graph serves both kinds of input.
            yield record
            return
        try:
            samples = list(expand_task(record, self.augmentations, self.seed))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            # Validation (transforms/validate.py) sends malformed tasks to the dead letter before this step, so
            # one reaching here is a bug in the graph: fail loudly rather than drop it.
            source = record.get("source", "<unknown>") if isinstance(record, dict) else "<unknown>"
            raise ValueError(
                f"ExpandSamples got a record that is not a valid ArcTask ({source}): {type(error).__name__}: "
                f"{error}. Put ValidateRecords before ExpandSamples.") from error
        self.samples_counter.inc(len(samples))
        yield from samples


class ExpandSamples(beam.PTransform):
    """``ArcTask`` -> ``ArcSample`` (``TextSample``s pass through unchanged); expects validated tasks.

    Returns one PCollection of samples. Counter ``samples_expanded`` (namespace ``arc_activations``).
    """

    def __init__(self, augmentations: int = 0, seed: int | str = 0):
        super().__init__()
        if isinstance(augmentations, bool) or not isinstance(augmentations, int) or augmentations < 0:
            raise ValueError(f"--augmentations must be an integer >= 0, got {augmentations!r}")
        self.augmentations = augmentations
        self.seed = seed

    def expand(self, tasks):
        return tasks | "Expand" >> beam.ParDo(_ExpandDoFn(self.augmentations, self.seed))
