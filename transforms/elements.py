"""The elements that travel between the batching, extraction and writing transforms, as types.

`Batch`, `ExtractedBatch` and `TokenizedSample` are TypedDicts: at run time they are plain dicts of primitives
and numpy arrays, so Beam's default coder encodes them without pickling a user class, the extracted batch's
size-aware coder (transforms.coders) reads them as before, and code that indexes them by key keeps working.
`Placement` is a NamedTuple: a tuple to every reader that unpacks it, with names for those that do not.

No Beam, JAX or torch here: the model, the transforms and the benchmarks import it freely.
"""
from __future__ import annotations

from typing import NamedTuple, NotRequired, TypedDict

import numpy as np

# An output column key: (short hook name, layer), e.g. ("resid_post", 12).
HookLayer = tuple[str, int]


class Placement(NamedTuple):
    """Where the sample `samples[sample_index]` of a batch sits: `length` tokens of row `row` from `start`."""
    sample_index: int
    row: int
    start: int
    length: int


class Annotations(TypedDict):
    """Per-token annotations, each an array aligned with `token_ids` (codes: transforms.annotations)."""
    part: np.ndarray           # int8, PART_CODES
    example_index: np.ndarray  # int16, train example index in the prompt, -1 elsewhere
    row: np.ndarray            # int16, grid cell of a cell token, -1 elsewhere
    col: np.ndarray            # int16
    color: np.ndarray          # int8, 0-9 for a cell token, -1 elsewhere


class TokenizedSample(TypedDict):
    """One sample after format and tokenize: what batching consumes (transforms.tokenize)."""
    sample_id: str       # f"{record_id}/t{test_index}/a{aug_index}": stable and unique
    dataset: str
    task_id: str
    test_index: int
    augmentation: str    # JSON (docs/design.md, conventions)
    prompt: str          # the rendered text
    token_ids: np.ndarray  # int32 [n]
    annotations: Annotations
    test_output: NotRequired[list | None]  # --prompt_mode=inference: the augmented-frame ground truth, or None


class Batch(TypedDict):
    """A fixed-shape batch (transforms.batching). `placements[i]` describes `samples[i]`; samples are ordered by
    (row, start), so `array[segment_ids > 0]` of a [B, L, ...] array is in sample order, then position order."""
    batch_id: str                 # deterministic from its content (sha1 of its sample ids)
    tokens: np.ndarray            # int32 [B, L]
    segment_ids: np.ndarray       # int32 [B, L]: 0 = padding, 1.. = sample within the row
    positions: np.ndarray         # int32 [B, L]: restart at 0 for each sample; 0 on padding
    placements: list[Placement]
    samples: list[TokenizedSample]


class ExtractedBatch(TypedDict):
    """A batch after extraction (transforms.extract): the batch's samples and placements, and per (hook, layer)
    the [n_real_tokens, d_model] activations in the storage dtype, rows in sample order then position order,
    padding removed."""
    batch_id: str
    samples: list[TokenizedSample]
    placements: list[Placement]
    activations: dict[HookLayer, np.ndarray]
    # --generate: one prediction row per sample (transforms.predictions), committed with the shard.
    predictions: NotRequired[list[dict]]
    # Statistics' reductions made on the device (model.statistics.REDUCTION_FIELDS per (hook, layer), per-token
    # fields in the activations' row order); absent when the writer computes them.
    statistics: NotRequired[dict[HookLayer, dict[str, np.ndarray]]]
