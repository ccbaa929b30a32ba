import json

import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.dead_letter import MAX_RECORD_CHARS, dead_letter, record_text
from transforms.validate import ValidateRecords, validate_grid, validate_task, validate_text_sample


def make_task(**overrides):
    task = {
        "record_id": "d:t1", "dataset": "d", "task_id": "t1", "source": "f.json#t1",
        "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
        "test": [{"input": [[0]], "output": None}],
    }
    task.update(overrides)
    return task


def test_valid_task_has_no_reasons():
    assert validate_task(make_task()) == []
    # Test output present or absent both fine.
    assert validate_task(make_task(test=[{"input": [[0]], "output": [[9]]}])) == []
    assert validate_task(make_task(test=[{"input": [[0]]}])) == []


def test_grid_sides_from_1_to_30():
    assert validate_grid([[0] * 30] * 30, "g") == []
    assert validate_grid([[5]], "g") == []
    assert validate_grid([[0] * 31], "train[0].input") == ["train[0].input row 0 has 31 cells, expected 1 to 30"]
    assert validate_grid([[0]] * 31, "g") == ["g has 31 rows, expected 1 to 30"]
    assert validate_grid([], "g") == ["g has 0 rows, expected 1 to 30"]
    assert validate_grid([[]], "g") == ["g row 0 has 0 cells, expected 1 to 30"]


def test_non_rectangular_grid_names_row_and_widths():
    grid = [[0] * 6, [0] * 6, [0] * 6, [0] * 5]
    task = make_task(train=[{"input": [[1]], "output": [[1]]}] * 2 + [{"input": [[1]], "output": grid}])
    assert validate_task(task) == ["train[2].output row 3 has 5 cells, row 0 has 6"]


def test_cells_must_be_ints_0_to_9_and_not_bool():
    assert validate_grid([[0, True]], "test[0].input") == [
        "test[0].input cell at row 0 col 1 is True (bool), expected an int 0-9"]
    assert validate_grid([[10]], "g") == ["g cell at row 0 col 0 is 10 (int), expected an int 0-9"]
    assert validate_grid([[-1]], "g") == ["g cell at row 0 col 0 is -1 (int), expected an int 0-9"]
    assert validate_grid([[1.0]], "g") == ["g cell at row 0 col 0 is 1.0 (float), expected an int 0-9"]
    assert validate_grid([["1"]], "g") == ["g cell at row 0 col 0 is '1' (str), expected an int 0-9"]
    assert validate_grid([[np.bool_(True)]], "g")  # numpy bools are not colours either
    assert validate_grid([[np.int64(3), np.int8(9)]], "g") == []  # numpy ints from Arrow are fine


def test_many_bad_cells_give_one_reason():
    reasons = validate_grid([[1.5] * 30] * 30, "g")
    assert reasons == ["g cell at row 0 col 0 is 1.5 (float), expected an int 0-9 (900 invalid cells in all)"]


def test_task_structure_reasons():
    assert validate_task(make_task(train=[])) == ["train is empty: a task needs at least one train pair"]
    assert validate_task(make_task(test=[])) == ["test is empty: a task needs at least one test input"]
    assert validate_task(make_task(test=None)) == ["test is missing"]
    assert validate_task(make_task(train=[{"input": [[1]]}])) == ["train[0].output is missing"]
    assert validate_task(make_task(test=[{"output": [[1]]}])) == ["test[0].input is missing"]
    assert validate_task(make_task(train=[[[[1]], [[1]]]])) == [
        "train[0] is [[[1]], [[1]]] (list), expected a dict with input and output"]
    assert validate_task(make_task(record_id="")) == ["record_id is '' (str), expected a non-empty str"]
    assert validate_task("x") == ["task is 'x' (str), expected a dict"]
    # Several problems: all reported.
    assert len(validate_task(make_task(train=[{"input": [[10]], "output": [[True]]}], test=[]))) == 3


def test_text_sample_validation():
    sample = {"sample_id": "f:0", "dataset": "d", "task_id": "f:0", "test_index": 0, "augmentation": "{}",
              "source": "f:0", "text": "hello"}
    assert validate_text_sample(sample) == []
    assert validate_text_sample(dict(sample, text="  ")) == ["text is empty"]
    assert validate_text_sample(dict(sample, text=None)) == ["text is None (NoneType), expected a str"]


def test_dead_letter_record_is_truncated_json():
    record = {"examples": [[[[1] * 30] * 30] * 2] * 10}
    letter = dead_letter("a.jsonl:0", "read", "bad", record)
    assert set(letter) == {"source", "stage", "reason", "record"}
    assert letter["record"].startswith('{"examples": [[[[1, 1')
    assert len(letter["record"]) < MAX_RECORD_CHARS + 50
    assert "chars in all]" in letter["record"]
    assert dead_letter("s", "read", "r", "raw {line")["record"] == "raw {line"
    # Odd values (numpy scalars) still give readable JSON rather than failing the error path.
    assert "3" in json.loads(record_text({"a": np.int64(3)}))["a"]


def test_validate_records_ptransform_splits_and_counts():
    good = make_task()
    bad = make_task(record_id="d:t2", task_id="t2", source="f.json#t2",
                    train=[{"input": [[0, 1], [2]], "output": [[1]]}])
    pipeline = BeamTestPipeline(runner=FnApiRunner())
    result = pipeline | beam.Create([good, bad]) | ValidateRecords()
    assert_that(result.valid, equal_to([good]), label="valid")
    assert_that(
        result.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"])),
        equal_to([("f.json#t2", "validate", "train[0].input row 1 has 1 cells, row 0 has 2")]),
        label="dead")
    run = pipeline.run()
    run.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in run.metrics().query()["counters"]}
    assert counters["records_valid"] == 1
    assert counters["records_rejected"] == 1
    assert counters["rejected_validate"] == 1
