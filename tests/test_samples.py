import json

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from transforms.augment import invert_grid
from transforms.samples import ExpandSamples, expand_task

TASK = {
    "record_id": "arc-agi-1/train:abc",
    "dataset": "arc-agi-1/train",
    "task_id": "abc",
    "source": "arc.json#abc",
    "train": [
        {"input": [[1, 0], [0, 0]], "output": [[2, 0], [0, 0]]},
        {"input": [[0, 3]], "output": [[0, 4]]},
        {"input": [[5, 5, 0]], "output": [[6, 6, 0]]},
    ],
    "test": [{"input": [[7, 0]], "output": [[8, 0]]}, {"input": [[9]]}],
}


def test_one_sample_per_test_input_times_augmentations():
    samples = list(expand_task(TASK, augmentations=2, seed=3))
    assert [s["sample_id"] for s in samples] == [
        f"arc-agi-1/train:abc/t{t}/a{a}" for t in range(2) for a in range(3)]
    first = samples[0]
    assert first == {
        "sample_id": "arc-agi-1/train:abc/t0/a0", "dataset": "arc-agi-1/train", "task_id": "abc",
        "test_index": 0, "augmentation": '{"index":0}', "source": "arc.json#abc",
        "train": TASK["train"], "test_input": [[7, 0]], "test_output": [[8, 0]]}
    assert samples[3]["test_output"] is None and samples[3]["test_index"] == 1
    assert samples[5]["test_output"] is None


def test_augmented_samples_invert_to_the_task():
    for sample in expand_task(TASK, augmentations=4, seed=11):
        augmentation = json.loads(sample["augmentation"])
        test = TASK["test"][sample["test_index"]]
        assert invert_grid(sample["test_input"], sample["augmentation"]) == test["input"]
        if test.get("output") is not None:
            assert invert_grid(sample["test_output"], sample["augmentation"]) == test["output"]
        order = augmentation.get("train_order", [0, 1, 2])
        for shown, original in zip(sample["train"], order):
            assert invert_grid(shown["input"], augmentation) == TASK["train"][original]["input"]
            assert invert_grid(shown["output"], augmentation) == TASK["train"][original]["output"]


def test_expansion_is_deterministic_from_seed_and_sample_id():
    assert list(expand_task(TASK, 3, seed=5)) == list(expand_task(TASK, 3, seed=5))
    other_seed = list(expand_task(TASK, 3, seed=6))
    assert [s["augmentation"] for s in expand_task(TASK, 3, seed=5)][1:] != [s["augmentation"] for s in other_seed][1:]


def test_negative_augmentations_rejected():
    with pytest.raises(ValueError, match="augmentations"):
        ExpandSamples(augmentations=-1)


def test_expand_samples_pipeline():
    text = {"sample_id": "web:0", "dataset": "web", "task_id": "0", "test_index": 0, "augmentation": "{}",
            "source": "web.jsonl:0", "text": "hello"}
    expected = list(expand_task(TASK, 1, seed=0)) + [text]
    pipeline = beam.Pipeline(runner=FnApiRunner())
    samples = pipeline | beam.Create([TASK, text]) | ExpandSamples(augmentations=1, seed=0)
    assert_that(samples | beam.Map(lambda s: (s["sample_id"], json.dumps(s, sort_keys=True))),
                equal_to([(s["sample_id"], json.dumps(s, sort_keys=True)) for s in expected]))
    run = pipeline.run()
    run.wait_until_finish()
    counters = run.metrics().query(MetricsFilter().with_name("samples_expanded"))["counters"]
    assert [c.committed for c in counters] == [4]


def test_expand_samples_fails_loudly_on_an_unvalidated_task():
    malformed = {"record_id": "x", "source": "bad.json#x", "train": []}  # no test, no dataset
    with pytest.raises(Exception, match=r"not a valid ArcTask \(bad.json#x\).*ValidateRecords"):
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = pipeline | beam.Create([malformed]) | ExpandSamples()
