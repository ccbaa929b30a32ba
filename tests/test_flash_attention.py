"""The blockwise (flash) attention of the xla path against the dense path it replaces: property tests over packed
and right-padded rows, block sizes and lengths the block does not divide, GQA, bfloat16; which key blocks it
visits; its memory; and transformers parity with several blocks per row."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from model.flash_attention import first_key_blocks, flash_attention
from model.hooks import HOOKS, CaptureSpec
from model.torch_reference import compare, load_torch_model, pack_right_padded, pack_rows, torch_hooks


def dense_attention(q, k, v, segment_ids):
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=(same & causal)[:, None], implementation="xla")


# (length, block, (heads, kv_heads)): each compiles once (seconds on shared cores), then hypothesis varies the
# layouts and values freely. Lengths 37 and 9 are not multiples of their blocks; 1 is a single token.
GEOMETRIES = ((37, 3, (4, 2)), (37, 8, (6, 2)), (37, 16, (4, 4)), (32, 8, (3, 1)), (9, 16, (2, 2)), (1, 4, (4, 2)))
ROWS = 3
_flash = jax.jit(flash_attention, static_argnames="block")
_dense = jax.jit(dense_attention)


@st.composite
def layouts(draw, length):
    """segment_ids [ROWS, length]: each row packed with several sequences (ids 1, 2, ...) then padding, or
    right-padded with one sequence, or full."""
    segment_ids = np.zeros((ROWS, length), np.int32)
    for row in range(ROWS):
        start, sequence = 0, 1
        packed = draw(st.booleans())
        while start < length:
            n = draw(st.integers(1, length - start))
            segment_ids[row, start:start + n] = sequence
            start, sequence = start + n, sequence + 1
            if not packed or draw(st.integers(0, 3)) == 0:
                break
    return segment_ids


def _qkv(seed, rows, length, heads, kv_heads, head_dim=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(rows, length, heads, head_dim))
    k, v = (rng.normal(size=(rows, length, kv_heads, head_dim)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@st.composite
def cases(draw):
    length, block, heads = draw(st.sampled_from(GEOMETRIES))
    return draw(layouts(length)), block, heads


@settings(max_examples=40)
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_flash_equals_dense_on_real_tokens_and_padding_stays_finite(case, seed):
    segment_ids, block, heads = case
    q, k, v = _qkv(seed, *segment_ids.shape, *heads)
    got = np.asarray(_flash(q, k, v, jnp.asarray(segment_ids), block=block))
    want = np.asarray(_dense(q, k, v, jnp.asarray(segment_ids)))
    real = segment_ids > 0
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=2e-6)


def test_bfloat16_stays_within_bfloat16_rounding_of_dense():
    segment_ids = np.zeros((2, 100), np.int32)
    segment_ids[0, :30], segment_ids[0, 30:90], segment_ids[1, :77] = 1, 2, 1
    q, k, v = _qkv(0, 2, 100, 14, 2, head_dim=64, dtype=jnp.bfloat16)
    got = np.asarray(flash_attention(q, k, v, jnp.asarray(segment_ids), block=32), np.float32)
    want = np.asarray(dense_attention(q, k, v, jnp.asarray(segment_ids)), np.float32)
    real = segment_ids > 0
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < 1e-2


def test_key_blocks_start_at_the_first_block_of_the_query_blocks_sequences():
    # Row 0: sequences of 10 and 10 tokens then padding; row 1: one sequence of 3 then padding; blocks of 8.
    segment_ids = np.zeros((2, 32), np.int32)
    segment_ids[0, :10], segment_ids[0, 10:20], segment_ids[1, :3] = 1, 2, 1
    lo = np.asarray(first_key_blocks(jnp.asarray(segment_ids), 8))
    # Block 2 holds only sequence 2, which starts in block 1; padding-only blocks see their own block.
    np.testing.assert_array_equal(lo, [[0, 0, 1, 3], [0, 1, 2, 3]])
    # Non-contiguous ids are still correct: the interval test never skips a block holding a shared sequence.
    scattered = np.array([[1, 2, 1, 2, 3, 1, 0, 3]], np.int32)
    np.testing.assert_array_equal(np.asarray(first_key_blocks(jnp.asarray(scattered), 2)), [[0, 0, 0, 2]])
    q, k, v = _qkv(1, 1, 8, 4, 2)
    real = scattered > 0
    np.testing.assert_allclose(np.asarray(flash_attention(q, k, v, jnp.asarray(scattered), block=2))[real],
                               np.asarray(dense_attention(q, k, v, jnp.asarray(scattered)))[real], rtol=1e-5,
                               atol=2e-6)


def _temp_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_workspace_grows_linearly_with_length_not_quadratically():
    """XLA's own buffer assignment: the dense path's temporaries grow as L^2, the flash path's as L."""
    heads, kv_heads, head_dim, block = 4, 2, 16, 128

    def shapes(length):
        return (((1, length, heads, head_dim), jnp.float32), ((1, length, kv_heads, head_dim), jnp.float32),
                ((1, length, kv_heads, head_dim), jnp.float32), ((1, length), jnp.int32))

    flash = [_temp_bytes(lambda q, k, v, s: flash_attention(q, k, v, s, block=block), *shapes(n))
             for n in (2048, 4096)]
    dense = [_temp_bytes(dense_attention, *shapes(n)) for n in (2048, 4096)]
    assert dense[1] > 3.5 * dense[0] and dense[1] > heads * 4096 * 4096 * 4
    assert flash[1] < 2.5 * flash[0]
    # The largest live tile is heads x block x block float32, plus q, k, v and the output of one row.
    assert flash[1] < 8 * (heads * block * block * 4 + 4096 * (heads + 2 * kv_heads) * head_dim * 4)


def test_auto_picks_the_flash_path_off_accelerators_and_dense_stays_available():
    from model.qwen2 import ATTENTION_IMPLEMENTATIONS, resolve_attention

    assert resolve_attention("auto", "bfloat16") == "xla"
    assert resolve_attention("xla_dense", "float32") == "xla_dense"
    assert {"xla", "xla_dense"} <= set(ATTENTION_IMPLEMENTATIONS)


def test_several_blocks_per_row_match_transformers_at_every_hook(tiny_checkpoint, monkeypatch):
    """Rows of 18 tokens in blocks of 5: four query blocks, the last one partly padding added by the kernel."""
    from model import load_model
    from model import qwen2

    monkeypatch.setattr(qwen2, "FLASH_BLOCK", 5)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 151643, size=n).astype(np.int32) for n in (5, 9, 3, 10, 7, 1, 18)]
    reference = torch_hooks(load_torch_model(tiny_checkpoint, "float32"), sequences)
    model = load_model(str(tiny_checkpoint), dtype="float32", attention="xla")
    dense = load_model(str(tiny_checkpoint), dtype="float32", attention="xla_dense")
    spec = CaptureSpec(hooks=HOOKS, layers=tuple(range(model.config.num_hidden_layers)), final_norm=True)
    layouts = ((pack_right_padded([sequences[i] for i in (0, 3, 6)], 18), [0, 3, 6]),
               (pack_rows([[sequences[0], sequences[1], sequences[2]], [sequences[3], sequences[4]],
                           [sequences[5]]], 18), [0, 1, 2, 3, 4, 5]))
    for (tokens, segment_ids, positions, placements), order in layouts:
        out = model.capture(tokens, segment_ids, positions, spec)
        errors = compare(out, [reference[i] for i in order], placements)
        assert max(errors.values()) <= 1e-5, errors
        want = {k: np.asarray(v) for k, v in dense.capture(tokens, segment_ids, positions, spec).items()}
        errors = compare(out, [{k: v[row, start:start + n] for k, v in want.items()}
                               for row, start, n in placements], placements)
        assert max(errors.values()) <= 1e-5, errors
