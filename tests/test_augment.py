import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transforms.augment import (
    DIHEDRAL_TRANSFORMS, apply_to_grid, augment_examples, invert_grid, parse_augmentation, random_augmentation,
)

GRID = [[1, 2, 3], [4, 5, 6]]

grids = st.integers(1, 30).flatmap(lambda h: st.integers(1, 30).flatmap(
    lambda w: st.lists(st.lists(st.integers(0, 9), min_size=w, max_size=w), min_size=h, max_size=h)))
augmentations = st.builds(
    lambda d, colors, n: {"index": 1, "dihedral": d, "colors": colors, "train_order": list(range(n))},
    st.integers(0, 7), st.permutations(list(range(10))), st.integers(1, 5))


def _identity_colors(dihedral):
    return {"index": 1, "dihedral": dihedral, "colors": list(range(10)), "train_order": [0]}


def test_dihedral_order_is_arc24s_flip_then_quarter_turns():
    # arc24: product([False, True], [0, 1, 2, 3]); np.flip(axis=1) first, then np.rot90(k).
    assert DIHEDRAL_TRANSFORMS == ((False, 0), (False, 1), (False, 2), (False, 3),
                                   (True, 0), (True, 1), (True, 2), (True, 3))
    golden = {
        0: [[1, 2, 3], [4, 5, 6]],
        1: [[3, 6], [2, 5], [1, 4]],          # one counter-clockwise quarter turn
        2: [[6, 5, 4], [3, 2, 1]],
        3: [[4, 1], [5, 2], [6, 3]],
        4: [[3, 2, 1], [6, 5, 4]],            # horizontal flip
        5: [[1, 4], [2, 5], [3, 6]],          # flip then a quarter turn: the transpose
        6: [[4, 5, 6], [1, 2, 3]],
        7: [[6, 3], [5, 2], [4, 1]],
    }
    for dihedral, expected in golden.items():
        assert apply_to_grid(GRID, _identity_colors(dihedral)) == expected


def test_colors_map_old_to_new():
    augmentation = {"index": 1, "dihedral": 0, "colors": [0, 2, 3, 4, 5, 6, 7, 8, 9, 1], "train_order": [0]}
    assert apply_to_grid([[0, 1, 9]], augmentation) == [[0, 2, 1]]
    assert invert_grid([[0, 2, 1]], augmentation) == [[0, 1, 9]]


@settings(max_examples=150, deadline=None)
@given(grid=grids, augmentation=augmentations)
def test_invert_grid_undoes_augmentation_and_keeps_shape_and_colour_counts(grid, augmentation):
    augmented = apply_to_grid(grid, augmentation)
    assert invert_grid(augmented, augmentation) == grid
    assert invert_grid(augmented, json.dumps(augmentation)) == grid  # from the recorded JSON too
    height, width = len(grid), len(grid[0])
    hflip, n_rot90 = DIHEDRAL_TRANSFORMS[augmentation["dihedral"]]
    assert (len(augmented), len(augmented[0])) == ((width, height) if n_rot90 % 2 else (height, width))
    before = Counter(c for row in grid for c in row)
    after = Counter(c for row in augmented for c in row)
    assert after == {augmentation["colors"][color]: count for color, count in before.items()}


@settings(max_examples=50, deadline=None)
@given(sample_id=st.text(min_size=1, max_size=40), seed=st.integers(0, 2**40), num_train=st.integers(1, 10))
def test_random_augmentation_is_deterministic_and_well_formed(sample_id, seed, num_train):
    first = random_augmentation(seed, sample_id, 3, num_train)
    assert first == random_augmentation(seed, sample_id, 3, num_train)
    assert first["index"] == 3
    assert 0 <= first["dihedral"] < 8
    assert sorted(first["colors"]) == list(range(10))
    assert sorted(first["train_order"]) == list(range(num_train))
    assert parse_augmentation(json.dumps(first)) == first


def test_random_augmentation_statistics_follow_arc24():
    draws = [random_augmentation(7, f"task{i}/t0/a1", 1, 4) for i in range(4000)]
    kept_background = np.mean([d["colors"][0] == 0 for d in draws])
    # arc24 keeps colour 0 with probability 0.9; an all-colour permutation also keeps it 1 time in 10.
    assert abs(kept_background - (0.9 + 0.1 * 0.1)) < 0.02
    dihedral_counts = Counter(d["dihedral"] for d in draws)
    assert set(dihedral_counts) == set(range(8)) and min(dihedral_counts.values()) > 400
    assert len({tuple(d["train_order"]) for d in draws}) == 24
    # Seed and sample id both matter.
    assert random_augmentation(7, "a/t0/a1", 1, 4) != random_augmentation(8, "a/t0/a1", 1, 4)
    assert random_augmentation(7, "a/t0/a1", 1, 4) != random_augmentation(7, "b/t0/a1", 1, 4)


def test_augment_examples_applies_one_transform_to_every_grid_and_reorders_train():
    train = [{"input": [[1, 0]], "output": [[2, 0]]}, {"input": [[3, 3]], "output": [[4, 0]]},
             {"input": [[5]], "output": [[6]]}]
    augmentation = {"index": 2, "dihedral": 1, "colors": [0, 9, 8, 7, 6, 5, 4, 3, 2, 1], "train_order": [2, 0, 1]}
    new_train, test_input, test_output = augment_examples(train, [[1, 2]], [[3, 4]], augmentation)
    assert new_train == [
        {"input": [[5]], "output": [[4]]},
        {"input": [[0], [9]], "output": [[0], [8]]},
        {"input": [[7], [7]], "output": [[0], [6]]},
    ]
    assert test_input == [[8], [9]]
    assert test_output == [[6], [7]]
    assert invert_grid(test_output, augmentation) == [[3, 4]]
    assert augment_examples(train, [[1]], None, augmentation)[2] is None
    assert augment_examples(train, [[1]], [[2]], {"index": 0}) == (train, [[1]], [[2]])


@pytest.mark.parametrize("augmentation,message", [
    ("not json", "not valid JSON"),
    ({"dihedral": 1}, "'index'"),
    ({"index": 1, "dihedral": 8, "colors": list(range(10))}, "dihedral"),
    ({"index": 1, "dihedral": 1, "colors": [0] * 10}, "permutation of 0-9"),
])
def test_malformed_augmentations_raise(augmentation, message):
    with pytest.raises(ValueError, match=message):
        invert_grid(GRID, augmentation)


def test_train_order_must_match_the_examples():
    with pytest.raises(ValueError, match="train_order"):
        augment_examples([{"input": [[1]], "output": [[1]]}], [[1]], None,
                         {"index": 1, "dihedral": 0, "colors": list(range(10)), "train_order": [0, 1]})
