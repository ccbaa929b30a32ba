import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transforms.grid_encoders import (
    DEFAULT_GRID_ENCODER, GridShapeEncoder, MinimalGridEncoder, ReplaceNumberEncoder, RowNumberEncoder,
    create_grid_encoder, grid_from_cells,
)

GRID = [[1, 2, 3], [4, 5, 0]]  # 2 rows x 3 columns, so HxW order errors show

GOLDEN = {
    "minimal": "123\n450",
    "separation(|)": "1|2|3\n4|5|0",
    "code-block(minimal)": "```grid\n123\n450\n```",
    "shape(minimal)": "```grid shape: 2x3\n123\n450\n```",
    "row-number(minimal)": "1 123\n2 450",
    "repeat(2)": "112233\n445500",
    "repeat": "111222333\n444555000",
    "replace(minimal)": "ò÷û\nąćñ",
    "shape(row-number(minimal))": "```grid shape: 2x3\n1 123\n2 450\n```",
    "code-block(separation(|))": "```grid\n1|2|3\n4|5|0\n```",
    "shape(row-number(replace(minimal)))": "```grid shape: 2x3\n1 ò÷û\n2 ąćñ\n```",
    "replace(row-number(minimal))": "ò ò÷û\n÷ ąćñ",
    "shape(repeat(3))": "```grid shape: 2x3\n111222333\n444555000\n```",
}

ARC24_SPELLINGS = {
    "MinimalGridEncoder()": "minimal",
    "GridWithSeparationEncoder('|')": "separation(|)",
    "GridCodeBlockEncoder(MinimalGridEncoder())": "code-block(minimal)",
    "GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))": "shape(row-number(minimal))",
    "GridCodeBlockEncoder(RepeatNumberEncoder(3))": "code-block(repeat(3))",
    "RepeatNumberEncoder()": "repeat(3)",
    "GridShapeEncoder(RowNumberEncoder(ReplaceNumberEncoder(MinimalGridEncoder())))":
        "shape(row-number(replace(minimal)))",
    ' shape ( row-number ( minimal ) ) ': "shape(row-number(minimal))",
    'separation(" ")': "separation(' ')",
}


@pytest.mark.parametrize("spec,expected", list(GOLDEN.items()))
def test_golden_text_and_round_trip(spec, expected):
    encoder = create_grid_encoder(spec)
    assert encoder.to_text(GRID) == expected
    assert encoder.to_grid(expected) == GRID
    # The canonical spec parses back to the same encoder.
    assert create_grid_encoder(encoder.spec).to_text(GRID) == expected


@pytest.mark.parametrize("spelling,canonical", list(ARC24_SPELLINGS.items()))
def test_arc24_class_names_parse(spelling, canonical):
    assert create_grid_encoder(spelling).spec == canonical


def test_default_is_arc24_default():
    encoder = create_grid_encoder()
    assert DEFAULT_GRID_ENCODER == "shape(row-number(minimal))"
    assert isinstance(encoder, GridShapeEncoder)
    assert isinstance(encoder.encoder, RowNumberEncoder)
    assert isinstance(encoder.encoder.encoder, MinimalGridEncoder)


def test_replace_symbols_are_arc24s():
    assert ReplaceNumberEncoder.symbols == ("ñ", "ò", "÷", "û", "ą", "ć", "ď", "ę", "Ě", "Ğ")
    assert create_grid_encoder("replace(minimal)").to_text([list(range(10))]) == "ñò÷ûąćďęĚĞ"


def _arc24_row_numbers(text):
    # arc24's RowNumberEncoder.to_text, written out to check ours against it.
    out = ""
    for index, line in enumerate(text.splitlines()):
        out += f"{index + 1} {line}\n"
    return out.strip()


def test_row_number_matches_arc24_on_every_base():
    grid = np.arange(30).reshape(5, 6) % 10
    for base in ("minimal", "separation(|)", "repeat(2)", "code-block(minimal)", "replace(minimal)"):
        inner = create_grid_encoder(base).to_text(grid.tolist())
        assert create_grid_encoder(f"row-number({base})").to_text(grid.tolist()) == _arc24_row_numbers(inner)


def test_shape_to_grid_reads_a_model_response():
    # What arc24's parse_grid_from_response hands to_grid: the fence start plus the model's continuation.
    encoder = create_grid_encoder()
    assert encoder.to_grid("```grid shape: 2x3\n1 123\n2 450\n```\nextra words") == GRID


SPECS = list(GOLDEN) + ["row-number(code-block(separation(,)))", "replace(repeat(2))"]


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    grid=st.integers(1, 30).flatmap(lambda h: st.integers(1, 30).flatmap(
        lambda w: st.lists(st.lists(st.integers(0, 9), min_size=w, max_size=w), min_size=h, max_size=h))),
)
def test_cells_locate_every_cell_and_text_round_trips(spec, grid):
    encoder = create_grid_encoder(spec)
    text, cells = encoder.encode_with_cells(grid)
    assert encoder.to_grid(text) == grid
    assert cells.dtype == np.int32 and cells.shape == (len(grid) * len(grid[0]), 5)
    assert grid_from_cells(cells, (len(grid), len(grid[0]))) == grid
    digits_or_symbols = "0123456789" if "replace" not in spec else "".join(ReplaceNumberEncoder.symbols)
    for start, end, row, col, color in cells.tolist():
        written = text[start:end]
        assert written and set(written) == {digits_or_symbols[color]}, (spec, row, col, written)
    # Spans are disjoint and in row-major order.
    assert np.all(cells[1:, 0] >= cells[:-1, 1])


@pytest.mark.parametrize("spec,message", [
    ("shape(", "position 6"),
    ("shape(minimal", "expected ')'"),
    ("shape(minimal))", "unexpected text after the encoder at position 14"),
    ("foo(minimal)", "unknown encoder 'foo' at position 0"),
    ("shape(bar)", "unknown encoder 'bar' at position 6"),
    ("repeat(x)", "expected an integer at position 7"),
    ("repeat(0)", "positive integer"),
    ("separation(1)", "must not contain digits"),
    ("separation()", "expected a separator symbol"),
    ("shape", "shape needs an encoder argument"),
    ("__import__('os')", "unknown encoder '__import__'"),
    ("", "expected an encoder name at position 0"),
])
def test_bad_specs_name_the_string_and_position(spec, message):
    with pytest.raises(ValueError) as error:
        create_grid_encoder(spec)
    assert repr(spec) in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize("grid,message", [
    ([[1, 2], [3]], "not rectangular"),
    ([[1, 10]], "ints 0-9"),
    ([[1.5]], "ints 0-9"),
    ([], "non-empty"),
])
def test_bad_grids_raise(grid, message):
    with pytest.raises(ValueError, match=message):
        create_grid_encoder().encode_with_cells(grid)
