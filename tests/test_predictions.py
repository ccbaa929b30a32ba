"""Generated answers back to grids (every encoder), parse failures recorded with their reason, the inverse
augmentation, scoring, voting into the ARC Prize submission shape, and top-1 / top-2 accuracy."""
import json

import pytest

from transforms.augment import apply_to_grid, random_augmentation
from transforms.grid_encoders import create_grid_encoder
from transforms.predictions import parse_answer, prediction_row, score, vote
from transforms.prompts import INFERENCE_ANSWER_START

GRID = [[1, 2, 3], [4, 5, 6]]
ENCODERS = ("shape(row-number(minimal))", "shape(minimal)", "code-block(minimal)", "code-block(separation(|))",
            "shape(replace(minimal))", "shape(repeat(3))", "minimal", "row-number(minimal)")


def _continuation(encoder, grid) -> str:
    """What a model writes after an inference prompt, as the encoder would write the grid."""
    text = encoder.to_text(grid)
    return (text[len(INFERENCE_ANSWER_START):] if text.startswith(INFERENCE_ANSWER_START) else text) + "<|im_end|>"


@pytest.mark.parametrize("spec", ENCODERS)
def test_an_encoded_answer_parses_back(spec):
    encoder = create_grid_encoder(spec)
    assert parse_answer(_continuation(encoder, GRID), encoder, "im_end") == (GRID, None)


@pytest.mark.parametrize("text, reason", [
    (" shape: 2x3\n1 123\n2 45\n```", "impossible grid: grid is not rectangular"),
    (" shape: 2x3\n1 12a\n```", "not parseable by shape(row-number(minimal)): ValueError"),
    (" shape: 2x3\n1123\n```", "not parseable by shape(row-number(minimal)): IndexError"),
    ("I think the answer is blue", "impossible grid: grid must be a non-empty"),
    (" shape: 31x1\n" + "".join(f"{i} 1\n" for i in range(1, 32)) + "```", "exceeds ARC's 30x30"),
])
def test_a_bad_answer_is_recorded_with_its_reason(text, reason):
    grid, error = parse_answer(text, create_grid_encoder(), "fence")
    assert grid is None
    assert reason in error


def test_a_truncated_answer_is_a_failure_even_if_its_rows_parse():
    text = " shape: 3x3\n1 123\n2 456\n"
    encoder = create_grid_encoder()
    assert parse_answer(text, encoder, "im_end")[0] == [[1, 2, 3], [4, 5, 6]]
    grid, error = parse_answer(text, encoder, "max_new_tokens")
    assert grid is None and error.startswith("truncated")


def _sample(augmentation, truth, test_index=0, task_id="t1", dataset="d", aug_index=0):
    return {"sample_id": f"{task_id}/t{test_index}/a{aug_index}", "dataset": dataset, "task_id": task_id,
            "test_index": test_index, "augmentation": json.dumps(augmentation),
            "test_output": None if truth is None else apply_to_grid(truth, augmentation)}


def test_a_prediction_maps_back_through_the_augmentation_and_is_scored():
    encoder = create_grid_encoder()
    augmentation = random_augmentation(0, "t1/t0/a1", 1, 2)
    assert augmentation["dihedral"] != 0 or augmentation["colors"] != list(range(10))
    sample = _sample(augmentation, GRID, aug_index=1)
    seen = apply_to_grid(GRID, augmentation)  # what the model sees and should write
    row = prediction_row(sample, _continuation(encoder, seen), [1, 2, 3], [-0.5, -0.25, -0.25], "im_end", encoder)
    assert row["grid"] == seen and row["grid_original"] == GRID and row["ground_truth"] == GRID
    assert row["correct"] is True and row["parse_error"] is None
    assert row["logprob_sum"] == pytest.approx(-1.0) and row["token_ids"] == [1, 2, 3]
    wrong = prediction_row(sample, _continuation(encoder, GRID), [], [], "im_end", encoder)
    assert wrong["grid_original"] != GRID and wrong["correct"] is False
    failed = prediction_row(sample, "no grid here", [], [], "im_end", encoder)
    assert failed["grid"] is None and failed["correct"] is False and failed["parse_error"]
    unknown = prediction_row(_sample(augmentation, None, aug_index=1), _continuation(encoder, seen), [], [],
                             "im_end", encoder)
    assert unknown["correct"] is None and unknown["grid_original"] == GRID


def _row(task_id, test_index, grid, logprob=-1.0, aug=0, truth=None, dataset="d"):
    return {"sample_id": f"{task_id}/t{test_index}/a{aug}", "task_id": task_id, "test_index": test_index,
            "grid_original": grid, "logprob_sum": logprob, "ground_truth": truth, "dataset": dataset}


A, B, C = [[1]], [[2]], [[3, 3]]


def test_voting_keeps_the_two_most_voted_grids_per_test_input():
    rows = [_row("t1", 0, A, aug=0), _row("t1", 0, B, aug=1), _row("t1", 0, B, aug=2), _row("t1", 0, None, aug=3),
            _row("t1", 0, C, aug=4),
            # Test 1: a tie between A and C, broken by the better log-probability.
            _row("t1", 1, A, -5.0, aug=0), _row("t1", 1, C, -1.0, aug=1),
            # Task 2: one test input, only failures.
            _row("t2", 0, None)]
    submission = vote(rows)
    assert submission == {
        "t1": [{"attempt_1": B, "attempt_2": A}, {"attempt_1": C, "attempt_2": A}],
        "t2": [{"attempt_1": [], "attempt_2": []}],
    }
    assert vote(rows[::-1]) == submission
    # A task's test inputs without any prediction still get an entry.
    assert vote(rows, num_tests={"t1": 3, "t2": 1, "t3": 1})["t3"] == [{"attempt_1": [], "attempt_2": []}]
    assert vote(rows, num_tests={"t1": 3, "t2": 1})["t1"][2] == {"attempt_1": [], "attempt_2": []}
    json.dumps(submission)  # the ARC Prize file is plain JSON


def test_top1_and_top2_accuracy_per_dataset():
    rows = [
        # t1 (dataset d): test 0 right at attempt 2, test 1 right at attempt 1 -> top-1 0.5, top-2 1.0.
        _row("t1", 0, A, aug=0, truth=B), _row("t1", 0, A, aug=1, truth=B), _row("t1", 0, B, aug=2, truth=B),
        _row("t1", 1, C, truth=C),
        # t2 (dataset d): wrong -> 0.
        _row("t2", 0, A, truth=C),
        # t3 (dataset e): no ground truth -> unscored.
        _row("t3", 0, A, dataset="e"),
    ]
    result = score(rows)
    assert result["d"] == {"tasks_scored": 2, "tasks_unscored": 0, "top1": 0.25, "top2": 0.5}
    assert result["e"] == {"tasks_scored": 0, "tasks_unscored": 1, "top1": None, "top2": None}


def test_rows_with_different_truths_for_one_test_input_are_refused():
    rows = [_row("t1", 0, A, aug=0, truth=A), _row("t1", 0, A, aug=1, truth=B)]
    with pytest.raises(ValueError, match="sample t1/t0/a1: its ground truth differs"):
        score(rows)
