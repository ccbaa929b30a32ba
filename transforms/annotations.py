"""Per-token annotations: which part of the prompt a token belongs to, its train example, and its grid cell.

Labels are first put on characters (prompt parts and grid cells are character spans), then carried to tokens
through the fast tokenizer's offsets, with numpy only (this is the hot path):

* part and example index: those of the token's first character. Everything outside a labelled span is
  ``chat_markup`` (special tokens, role names and the newlines around them).
* row, col, colour: those of the first grid cell the token overlaps. A cell written as one character (every
  encoder but ``repeat``/``replace``) is one token with the Qwen tokenizer; a cell split over several byte-level
  tokens labels each of them; a token merging several cells (``replace``'s letters can merge) carries the first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

PART_CODES: dict[str, int] = {
    "chat_markup": 0,
    "system": 1,
    "instructions": 2,
    "example_input": 3,
    "example_output": 4,
    "test_input": 5,
    "answer": 6,
    "text": 7,
    # Tokens the model wrote itself after an inference prompt (pipeline.run --generate); appended last so that
    # the codes of earlier outputs keep their meaning.
    "generated": 8,
}
PART_NAMES: tuple[str, ...] = tuple(sorted(PART_CODES, key=PART_CODES.get))

ANNOTATION_DTYPES: dict[str, type] = {
    "part": np.int8,
    "example_index": np.int16,
    "row": np.int16,
    "col": np.int16,
    "color": np.int8,
}


@dataclass(frozen=True)
class CharLabels:
    """Character-level labels of a rendered prompt."""
    part: np.ndarray            # int8 [n_chars]
    example_index: np.ndarray   # int16 [n_chars]
    next_cell_char: np.ndarray  # int32 [n_chars + 1]: first position >= i that writes a cell (n_chars if none)
    cell_of_char: np.ndarray    # int32 [n_chars + 1]: row of `cells` written at position i, -1 elsewhere
    cells: np.ndarray           # int32 [n_cells, 5]: char_start, char_end, row, col, color


def label_characters(n_chars: int, spans: Iterable[tuple[int, int, int, int]], cells: np.ndarray) -> CharLabels:
    """``spans``: ``(start, end, part_code, example_index)``; ``cells``: absolute ``encode_with_cells`` rows."""
    part = np.zeros(n_chars, dtype=np.int8)
    example_index = np.full(n_chars, -1, dtype=np.int16)
    for start, end, code, index in spans:
        part[start:end] = code
        example_index[start:end] = index
    cell_of_char = np.full(n_chars + 1, -1, dtype=np.int32)
    if len(cells):
        widths = cells[:, 1] - cells[:, 0]
        if np.all(widths == 1):
            cell_of_char[cells[:, 0]] = np.arange(len(cells), dtype=np.int32)
        else:
            owner = np.repeat(np.arange(len(cells), dtype=np.int32), widths)
            first = np.repeat(cells[:, 0] - np.cumsum(widths) + widths, widths)
            cell_of_char[first + np.arange(len(owner))] = owner
    positions = np.where(cell_of_char >= 0, np.arange(n_chars + 1, dtype=np.int32), n_chars)
    positions[n_chars] = n_chars
    next_cell_char = np.minimum.accumulate(positions[::-1])[::-1]
    return CharLabels(part, example_index, next_cell_char, cell_of_char, cells)


def annotate_tokens(offsets: np.ndarray, labels: CharLabels) -> dict[str, np.ndarray]:
    """Annotations for tokens with character ``offsets`` ``[n_tokens, 2]`` (start, end)."""
    n_chars = len(labels.part)
    starts = np.minimum(offsets[:, 0], max(n_chars - 1, 0))
    ends = offsets[:, 1]
    first_cell_char = labels.next_cell_char[offsets[:, 0]]
    cell = np.where(first_cell_char < ends, labels.cell_of_char[first_cell_char], -1)
    has_cell = cell >= 0
    cells = labels.cells if len(labels.cells) else np.full((1, 5), -1, dtype=np.int32)
    picked = cells[np.where(has_cell, cell, 0)]
    return {
        "part": labels.part[starts] if n_chars else np.zeros(len(offsets), np.int8),
        "example_index": labels.example_index[starts] if n_chars else np.full(len(offsets), -1, np.int16),
        "row": np.where(has_cell, picked[:, 2], -1).astype(np.int16),
        "col": np.where(has_cell, picked[:, 3], -1).astype(np.int16),
        "color": np.where(has_cell, picked[:, 4], -1).astype(np.int8),
    }


def text_annotations(n_tokens: int) -> dict[str, np.ndarray]:
    """Annotations of plain-text tokens: part ``text``, no example, no cell."""
    return {
        "part": np.full(n_tokens, PART_CODES["text"], dtype=np.int8),
        "example_index": np.full(n_tokens, -1, dtype=np.int16),
        "row": np.full(n_tokens, -1, dtype=np.int16),
        "col": np.full(n_tokens, -1, dtype=np.int16),
        "color": np.full(n_tokens, -1, dtype=np.int8),
    }


def part_names(codes: np.ndarray) -> np.ndarray:
    """Part codes to their names (what Parquet stores as a dictionary string column)."""
    return np.asarray(PART_NAMES, dtype=object)[np.asarray(codes, dtype=np.int64)]
