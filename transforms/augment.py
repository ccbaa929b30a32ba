"""ARC task augmentation as ironbar/arc24 does it, made deterministic and invertible.

An augmentation is, in arc24's order: a dihedral transform (optional horizontal flip, then k quarter turns with
``np.rot90``), a colour permutation (colour 0 kept with probability 0.9, else all ten colours permuted), and a
permutation of the train examples. The same transform applies to every grid of the task.

It is drawn from a numpy Generator seeded with sha256 of ``f"{seed}/{sample_id}"`` (never Python's ``hash()``,
which changes between processes), so any worker reproduces it. Each sample records it as JSON (docs/design.md)::

    {"index": 0}                                                    no augmentation
    {"index": k, "dihedral": d, "colors": [10 ints], "train_order": [...]}

with ``d = 4 * hflip + n_rot90`` (arc24's ``product([False, True], [0, 1, 2, 3])`` order), ``colors[old] = new``,
and ``train_order[i]`` the original index of the i-th train example shown. ``invert_grid`` undoes it exactly.
"""
from __future__ import annotations

import hashlib
import json
from itertools import product
from typing import Any

import numpy as np

# index d -> (hflip, n_rot90), in arc24's order.
DIHEDRAL_TRANSFORMS: tuple[tuple[bool, int], ...] = tuple(product((False, True), range(4)))
NUM_COLORS = 10
CHANGE_BACKGROUND_PROBABILITY = 0.1
NO_AUGMENTATION: dict = {"index": 0}


def augmentation_rng(seed: int | str, sample_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{sample_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def random_augmentation(seed: int | str, sample_id: str, index: int, num_train: int) -> dict:
    """The augmentation number ``index`` (>= 1) of a sample, drawn deterministically from seed and sample id."""
    if index == 0:
        return dict(NO_AUGMENTATION)
    rng = augmentation_rng(seed, sample_id)
    dihedral = int(rng.integers(len(DIHEDRAL_TRANSFORMS)))
    if rng.random() < CHANGE_BACKGROUND_PROBABILITY:
        colors = rng.permutation(NUM_COLORS)
    else:
        colors = np.concatenate([[0], 1 + rng.permutation(NUM_COLORS - 1)])
    train_order = rng.permutation(num_train)
    return {
        "index": int(index),
        "dihedral": dihedral,
        "colors": [int(c) for c in colors],
        "train_order": [int(i) for i in train_order],
    }


def parse_augmentation(augmentation: str | dict) -> dict:
    """The augmentation dict from its JSON (or the dict itself), checked, with a clear error if malformed."""
    if isinstance(augmentation, str):
        try:
            augmentation = json.loads(augmentation)
        except json.JSONDecodeError as error:
            raise ValueError(f"augmentation is not valid JSON ({error}): {augmentation[:200]!r}") from None
    if not isinstance(augmentation, dict) or "index" not in augmentation:
        raise ValueError(f"augmentation must be a dict with an 'index' key, got {augmentation!r}")
    if augmentation["index"] == 0:
        return augmentation
    dihedral = augmentation.get("dihedral")
    if not isinstance(dihedral, int) or not 0 <= dihedral < len(DIHEDRAL_TRANSFORMS):
        raise ValueError(f"augmentation 'dihedral' must be an int 0-7, got {dihedral!r}")
    colors = augmentation.get("colors")
    if not isinstance(colors, list) or sorted(colors) != list(range(NUM_COLORS)):
        raise ValueError(f"augmentation 'colors' must be a permutation of 0-9, got {colors!r}")
    return augmentation


def is_identity(augmentation: str | dict) -> bool:
    return parse_augmentation(augmentation)["index"] == 0


def dihedral_transform(array: np.ndarray, dihedral: int) -> np.ndarray:
    hflip, n_rot90 = DIHEDRAL_TRANSFORMS[dihedral]
    if hflip:
        array = np.flip(array, axis=1)
    return np.rot90(array, k=n_rot90)


def invert_dihedral(array: np.ndarray, dihedral: int) -> np.ndarray:
    hflip, n_rot90 = DIHEDRAL_TRANSFORMS[dihedral]
    array = np.rot90(array, k=-n_rot90)
    if hflip:
        array = np.flip(array, axis=1)
    return array


def apply_to_grid(grid, augmentation: str | dict) -> list[list[int]]:
    """One grid through the geometric and colour parts of the augmentation."""
    augmentation = parse_augmentation(augmentation)
    if augmentation["index"] == 0:
        return [list(row) for row in grid]
    array = np.asarray(grid, dtype=np.int64)
    array = np.asarray(augmentation["colors"], dtype=np.int64)[array]
    return dihedral_transform(array, augmentation["dihedral"]).tolist()


def invert_grid(grid, augmentation: str | dict) -> list[list[int]]:
    """Undoes ``apply_to_grid``: maps a grid seen (or predicted) in augmented space back to the original task."""
    augmentation = parse_augmentation(augmentation)
    if augmentation["index"] == 0:
        return [list(row) for row in grid]
    array = invert_dihedral(np.asarray(grid, dtype=np.int64), augmentation["dihedral"])
    inverse_colors = np.argsort(np.asarray(augmentation["colors"], dtype=np.int64))
    return inverse_colors[array].tolist()


def augment_examples(
    train: list[dict[str, Any]], test_input, test_output, augmentation: str | dict
) -> tuple[list[dict[str, Any]], list[list[int]], list[list[int]] | None]:
    """Applies the augmentation to every grid of a sample and reorders its train examples."""
    augmentation = parse_augmentation(augmentation)
    if augmentation["index"] == 0:
        return list(train), test_input, test_output
    order = augmentation.get("train_order")
    if not isinstance(order, list) or sorted(order) != list(range(len(train))):
        raise ValueError(
            f"augmentation 'train_order' {order!r} is not a permutation of the {len(train)} train examples")
    new_train = [
        {"input": apply_to_grid(train[i]["input"], augmentation),
         "output": apply_to_grid(train[i]["output"], augmentation)}
        for i in order
    ]
    new_output = None if test_output is None else apply_to_grid(test_output, augmentation)
    return new_train, apply_to_grid(test_input, augmentation), new_output
