"""Grid encoders: ARC grids to text and back, as ironbar/arc24 writes them, composable from a spec string.

Spec syntax (parsed by a small recursive-descent parser, never ``eval``)::

    spec      := encoder
    encoder   := NAME [ "(" [ argument ] ")" ]
    argument  := encoder | INTEGER | 'quoted' | "quoted" | bare symbol (for separation)

Names (short form, and arc24's class names as aliases)::

    minimal          MinimalGridEncoder()              12\\n34
    separation(S)    GridWithSeparationEncoder('S')    1|2\\n3|4
    code-block(E)    GridCodeBlockEncoder(E)           ```grid\\n...\\n```
    shape(E)         GridShapeEncoder(E)               ```grid shape: HxW\\n...\\n```   (H rows, W columns)
    row-number(E)    RowNumberEncoder(E)               1 12\\n2 34
    repeat(n)        RepeatNumberEncoder(n)            each cell written n times (default 3)
    replace(E)       ReplaceNumberEncoder(E)           digits 0-9 become ñ ò ÷ û ą ć ď ę Ě Ğ

The default is ``shape(row-number(minimal))`` (arc24's ``GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))``).

Besides ``to_text``/``to_grid`` every encoder has ``encode_with_cells(grid) -> (text, cells)``: ``cells`` is an
int32 array ``[n_cells, 5]`` of ``(char_start, char_end, row, col, color)`` in row-major order, the character
span of ``text`` that writes each grid cell. Tokenization uses it to label every cell token.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

DEFAULT_GRID_ENCODER = "shape(row-number(minimal))"

CELL_COLUMNS = ("char_start", "char_end", "row", "col", "color")
_ASCII_ZERO = ord("0")
_NEWLINE = ord("\n")


def grid_array(grid) -> np.ndarray:
    """The grid as a 2-D int array of colours 0-9, or a ValueError saying what is wrong with it."""
    try:
        array = np.asarray(grid)
    except ValueError as error:  # ragged rows
        raise ValueError(f"grid is not rectangular: {error}") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"grid must be a non-empty list of equal-length rows, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"grid cells must be ints 0-9, got dtype {array.dtype}")
    if array.min() < 0 or array.max() > 9:
        raise ValueError(f"grid cells must be ints 0-9, got values from {array.min()} to {array.max()}")
    return array


def _cell_table(array: np.ndarray, row_stride: int, col_stride: int, width: int) -> np.ndarray:
    """Cells of a layout where cell (r, c) starts at r * row_stride + c * col_stride and spans `width` chars."""
    height, columns = array.shape
    rows = np.repeat(np.arange(height, dtype=np.int32), columns)
    cols = np.tile(np.arange(columns, dtype=np.int32), height)
    starts = rows * row_stride + cols * col_stride
    return np.stack([starts, starts + width, rows, cols, array.reshape(-1).astype(np.int32)], axis=1)


class GridEncoder(ABC):
    """Grid <-> text. Subclasses implement ``encode_with_cells`` and ``to_grid``; ``spec`` is the canonical string."""

    @property
    @abstractmethod
    def spec(self) -> str:
        ...

    @abstractmethod
    def encode_with_cells(self, grid) -> tuple[str, np.ndarray]:
        ...

    @abstractmethod
    def to_grid(self, text: str) -> list[list[int]]:
        ...

    def to_text(self, grid) -> str:
        return self.encode_with_cells(grid)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GridEncoder) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class MinimalGridEncoder(GridEncoder):
    spec = "minimal"

    def encode_with_cells(self, grid):
        array = grid_array(grid)
        height, width = array.shape
        # One byte per cell plus a newline per row, written in one numpy pass: this is on the hot path.
        buffer = np.full((height, width + 1), _NEWLINE, dtype=np.uint8)
        buffer[:, :width] = array + _ASCII_ZERO
        text = buffer.tobytes()[:-1].decode("ascii")
        return text, _cell_table(array, width + 1, 1, 1)

    def to_grid(self, text):
        return [[int(x) for x in line] for line in text.strip().splitlines()]


class GridWithSeparationEncoder(GridEncoder):
    def __init__(self, split_symbol: str):
        if not split_symbol:
            raise ValueError("separation(S) needs a non-empty separator symbol S, e.g. separation(|)")
        if any(ch.isdigit() for ch in split_symbol) or split_symbol.splitlines() != [split_symbol]:
            raise ValueError(
                f"separation symbol {split_symbol!r} must not contain digits or line breaks: "
                "the grid could not be read back")
        self.split_symbol = split_symbol

    @property
    def spec(self):
        if any(ch in self.split_symbol for ch in "()'\" "):
            return f"separation({self.split_symbol!r})"
        return f"separation({self.split_symbol})"

    def encode_with_cells(self, grid):
        array = grid_array(grid)
        separator = self.split_symbol
        text = "\n".join(separator.join(map(str, row)) for row in array.tolist())
        width = array.shape[1]
        stride = 1 + len(separator)
        return text, _cell_table(array, width * stride - len(separator) + 1, stride, 1)

    def to_grid(self, text):
        return [[int(x) for x in line.split(self.split_symbol)] for line in text.strip().splitlines()]


class RepeatNumberEncoder(GridEncoder):
    def __init__(self, n: int = 3):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"repeat(n) needs a positive integer n, got {n!r}")
        self.n = n

    @property
    def spec(self):
        return f"repeat({self.n})"

    def encode_with_cells(self, grid):
        array = grid_array(grid)
        n = self.n
        text = "\n".join("".join(str(x) * n for x in row) for row in array.tolist())
        return text, _cell_table(array, array.shape[1] * n + 1, n, n)

    def to_grid(self, text):
        return [[int(x) for x in line[:: self.n]] for line in text.strip().splitlines()]


class _WrappingEncoder(GridEncoder):
    short_name = ""

    def __init__(self, base_encoder: GridEncoder):
        if not isinstance(base_encoder, GridEncoder):
            raise ValueError(f"{self.short_name}(E) wraps a grid encoder, got {base_encoder!r}")
        self.encoder = base_encoder

    @property
    def spec(self):
        return f"{self.short_name}({self.encoder.spec})"


class GridCodeBlockEncoder(_WrappingEncoder):
    short_name = "code-block"

    def encode_with_cells(self, grid):
        inner, cells = self.encoder.encode_with_cells(grid)
        prefix = "```grid\n"
        cells = cells.copy()
        cells[:, :2] += len(prefix)
        return f"{prefix}{inner}\n```", cells

    def to_grid(self, text):
        return self.encoder.to_grid(text.split("```grid\n")[1].split("\n```")[0])


class GridShapeEncoder(_WrappingEncoder):
    short_name = "shape"

    def encode_with_cells(self, grid):
        inner, cells = self.encoder.encode_with_cells(grid)
        prefix = f"```grid shape: {len(grid)}x{len(grid[0])}\n"
        cells = cells.copy()
        cells[:, :2] += len(prefix)
        return f"{prefix}{inner}\n```", cells

    def to_grid(self, text):
        grid_lines = []
        inside = False
        for line in text.splitlines():
            if line.startswith("```grid shape:"):
                inside = True
            elif inside:
                if line.startswith("```"):
                    break
                grid_lines.append(line)
        return self.encoder.to_grid("\n".join(grid_lines))


class RowNumberEncoder(_WrappingEncoder):
    short_name = "row-number"

    def encode_with_cells(self, grid):
        inner, cells = self.encoder.encode_with_cells(grid)
        lines = inner.split("\n")
        prefixes = [f"{index + 1} " for index in range(len(lines))]
        # arc24 strips the joined text; only trailing whitespace of the last line can go (it starts with a digit).
        text = "\n".join(prefix + line for prefix, line in zip(prefixes, lines)).rstrip()
        line_starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
        shift = np.cumsum([len(prefix) for prefix in prefixes])
        line_of_cell = np.searchsorted(line_starts, cells[:, 0], side="right") - 1
        cells = cells.copy()
        cells[:, :2] += shift[line_of_cell][:, None].astype(np.int32)
        return text, cells

    def to_grid(self, text):
        return self.encoder.to_grid("".join(line.split(" ", 1)[1] + "\n" for line in text.splitlines()))


class ReplaceNumberEncoder(_WrappingEncoder):
    short_name = "replace"
    symbols = ("ñ", "ò", "÷", "û", "ą", "ć", "ď", "ę", "Ě", "Ğ")
    _to_symbols = str.maketrans({str(digit): symbol for digit, symbol in enumerate(symbols)})
    _to_digits = str.maketrans({symbol: str(digit) for digit, symbol in enumerate(symbols)})

    def encode_with_cells(self, grid):
        # One character for one character, so the cell spans of the base encoder stay valid.
        inner, cells = self.encoder.encode_with_cells(grid)
        return inner.translate(self._to_symbols), cells

    def to_grid(self, text):
        return self.encoder.to_grid(text.translate(self._to_digits))


# name -> (class, argument kind). Argument kinds: none, encoder, int (optional), symbol (required).
_ENCODERS = {
    "minimal": (MinimalGridEncoder, "none"),
    "separation": (GridWithSeparationEncoder, "symbol"),
    "code-block": (GridCodeBlockEncoder, "encoder"),
    "shape": (GridShapeEncoder, "encoder"),
    "row-number": (RowNumberEncoder, "encoder"),
    "repeat": (RepeatNumberEncoder, "int"),
    "replace": (ReplaceNumberEncoder, "encoder"),
}
_ARC24_ALIASES = {
    "MinimalGridEncoder": "minimal",
    "GridWithSeparationEncoder": "separation",
    "GridCodeBlockEncoder": "code-block",
    "GridShapeEncoder": "shape",
    "RowNumberEncoder": "row-number",
    "RepeatNumberEncoder": "repeat",
    "ReplaceNumberEncoder": "replace",
}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class _SpecParser:
    def __init__(self, spec: str):
        self.spec = spec
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> ValueError:
        pos = self.pos if pos is None else pos
        known = ", ".join(list(_ENCODERS) + list(_ARC24_ALIASES))
        return ValueError(
            f"grid encoder {self.spec!r}: {message} at position {pos} (here: {self.spec[pos:pos + 20]!r}). "
            f"Known encoders: {known}; e.g. {DEFAULT_GRID_ENCODER!r}.")

    def skip_spaces(self):
        while self.pos < len(self.spec) and self.spec[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_spaces()
        return self.spec[self.pos] if self.pos < len(self.spec) else ""

    def expect(self, char: str):
        if self.peek() != char:
            found = repr(self.spec[self.pos]) if self.pos < len(self.spec) else "the end"
            raise self.error(f"expected {char!r}, found {found}")
        self.pos += 1

    def parse(self) -> GridEncoder:
        encoder = self.encoder()
        if self.peek():
            raise self.error("unexpected text after the encoder")
        return encoder

    def name(self) -> str:
        self.skip_spaces()
        start = self.pos
        while self.pos < len(self.spec) and self.spec[self.pos] in _NAME_CHARS:
            self.pos += 1
        if start == self.pos:
            raise self.error("expected an encoder name")
        return self.spec[start:self.pos]

    def encoder(self) -> GridEncoder:
        start = self.pos
        name = self.name()
        canonical = _ARC24_ALIASES.get(name, name)
        if canonical not in _ENCODERS:
            raise self.error(f"unknown encoder {name!r}", start)
        cls, kind = _ENCODERS[canonical]
        has_parens = self.peek() == "("
        if has_parens:
            self.pos += 1
        if kind == "none":
            args = []
        elif kind == "encoder":
            if not has_parens:
                raise self.error(f"{name} needs an encoder argument, e.g. {canonical}(minimal)")
            args = [self.encoder()]
        elif kind == "int":
            args = [self.integer()] if has_parens and self.peek() != ")" else []
        else:
            if not has_parens:
                raise self.error(f"{name} needs a separator argument, e.g. {canonical}(|)")
            args = [self.symbol()]
        if has_parens:
            self.expect(")")
        try:
            return cls(*args)
        except ValueError as error:
            raise self.error(str(error), start) from None

    def integer(self) -> int:
        self.skip_spaces()
        start = self.pos
        while self.pos < len(self.spec) and self.spec[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.error("expected an integer")
        return int(self.spec[start:self.pos])

    def symbol(self) -> str:
        if self.pos < len(self.spec) and self.spec[self.pos].isspace():
            # A bare separator may itself be a space: separation( ) means ' '.
            end = self.spec.find(")", self.pos)
            if end > self.pos and not self.spec[self.pos:end].strip():
                text, self.pos = self.spec[self.pos:end], end
                return text
        quote = self.peek()
        if quote in ("'", '"'):
            end = self.spec.find(quote, self.pos + 1)
            if end < 0:
                raise self.error("unterminated quoted separator")
            text, self.pos = self.spec[self.pos + 1:end], end + 1
            return text
        start = self.pos
        while self.pos < len(self.spec) and self.spec[self.pos] not in "()'\"":
            self.pos += 1
        text = self.spec[start:self.pos].strip()
        if not text:
            raise self.error("expected a separator symbol")
        return text


def create_grid_encoder(spec: str | GridEncoder = DEFAULT_GRID_ENCODER) -> GridEncoder:
    """Parses an encoder spec such as ``shape(row-number(minimal))`` or arc24's
    ``GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))``. Raises ValueError naming the spec and position."""
    if isinstance(spec, GridEncoder):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"grid encoder spec must be a str, got {type(spec).__name__}")
    return _SpecParser(spec).parse()


def grid_from_cells(cells: np.ndarray, shape: Sequence[int]) -> list[list[int]]:
    """Rebuilds a grid from an ``encode_with_cells`` table (for checks)."""
    grid = np.full(tuple(shape), -1, dtype=np.int32)
    grid[cells[:, 2], cells[:, 3]] = cells[:, 4]
    return grid.tolist()
