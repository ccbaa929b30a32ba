"""The forward pass's own guarantees, on random weights of the tiny geometry: one compilation per bucket, early
stop, only the requested tensors, hook identities, padding isolation, random-weight determinism."""
import numpy as np
import pytest

from model.hooks import HOOKS, CaptureSpec
from model.torch_reference import pack_rows


@pytest.fixture(scope="module")
def tiny():
    from model import load_model

    return load_model("random:tiny", dtype="float32", attention="xla")


def _batch(seed, rows=2, length=12):
    rng = np.random.default_rng(seed)
    sequences = [[rng.integers(0, 151643, size=n) for n in (5, 4)], [rng.integers(0, 151643, size=9)]]
    return pack_rows(sequences[:rows], length)


def _count_scanned_layers(closed_jaxpr) -> int:
    """Layers applied = sum of the lengths of the top-level scans (one scan per run of layers)."""
    return sum(eqn.params["length"] for eqn in closed_jaxpr.jaxpr.eqns if eqn.primitive.name == "scan")


def _largest_dot_output(closed_jaxpr) -> int:
    sizes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                sizes.append(eqn.outvars[0].aval.shape[-1])
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    visit(inner)
    visit(closed_jaxpr.jaxpr)
    return max(sizes)


def test_second_batch_of_the_same_bucket_does_not_compile_again(tiny):
    spec = CaptureSpec(hooks=("resid_post",), layers=(1,))
    tokens, segment_ids, positions, _ = _batch(0)
    before_traces, before_cache = tiny.trace_count, tiny.compiled_count()
    first = tiny.capture(tokens, segment_ids, positions, spec)
    assert (tiny.trace_count, tiny.compiled_count()) == (before_traces + 1, before_cache + 1)
    tokens2, segment_ids2, positions2, _ = _batch(1)
    second = tiny.capture(tokens2, segment_ids2, positions2, spec)
    assert (tiny.trace_count, tiny.compiled_count()) == (before_traces + 1, before_cache + 1)
    assert not np.array_equal(np.asarray(first["blocks.1.hook_resid_post"]),
                              np.asarray(second["blocks.1.hook_resid_post"]))
    # An equal spec built separately shares the compilation; another length is another bucket.
    tiny.capture(tokens, segment_ids, positions, CaptureSpec(hooks=["resid_post"], layers=[1, 1]))
    assert tiny.trace_count == before_traces + 1
    tiny.capture(*_batch(0, length=16)[:3], spec)
    assert (tiny.trace_count, tiny.compiled_count()) == (before_traces + 2, before_cache + 2)


def test_forward_stops_after_the_deepest_requested_layer_and_skips_the_lm_head(tiny):
    tokens, segment_ids, positions, _ = _batch(0)
    layers = tiny.config.num_hidden_layers
    vocab = tiny.config.vocab_size
    for deepest in range(layers):
        jaxpr = tiny.make_jaxpr(tokens, segment_ids, positions, CaptureSpec(layers=(deepest,)))
        assert _count_scanned_layers(jaxpr) == deepest + 1
        assert _largest_dot_output(jaxpr) < vocab
    jaxpr = tiny.make_jaxpr(tokens, segment_ids, positions, CaptureSpec(layers=(0,), final_norm=True))
    assert _count_scanned_layers(jaxpr) == layers
    assert _largest_dot_output(jaxpr) < vocab
    jaxpr = tiny.make_jaxpr(tokens, segment_ids, positions, CaptureSpec(layers=(0,), logits=True))
    assert _largest_dot_output(jaxpr) == vocab


def test_layers_between_requested_ones_run_in_uncaptured_scans(tiny):
    from model.qwen2 import layer_runs

    assert layer_runs(CaptureSpec(layers=(1, 3)), 4) == [(0, 1, False), (1, 2, True), (2, 3, False), (3, 4, True)]
    assert layer_runs(CaptureSpec(layers=(0, 1, 2)), 4) == [(0, 3, True)]
    assert layer_runs(CaptureSpec(layers=(0,), logits=True), 4) == [(0, 1, True), (1, 4, False)]
    tokens, segment_ids, positions, _ = _batch(0)
    jaxpr = tiny.make_jaxpr(tokens, segment_ids, positions, CaptureSpec(layers=(1, 3)))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    # Uncaptured scans carry only the residual stream out; captured ones also stack the hook.
    assert [len(e.outvars) for e in scans] == [1, 2, 1, 2]


def test_returns_exactly_the_requested_tensors_in_the_requested_dtype(tiny):
    tokens, segment_ids, positions, _ = _batch(0)
    spec = CaptureSpec(hooks=("mlp_out", "resid_pre"), layers=(2, 0), out_dtype="float16")
    out = tiny.capture(tokens, segment_ids, positions, spec)
    assert sorted(out) == sorted(["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre",
                                  "blocks.2.hook_mlp_out"])
    assert spec.layers == (0, 2) and spec.hooks == ("resid_pre", "mlp_out")
    for value in out.values():
        assert value.shape == (2, 12, tiny.config.hidden_size) and value.dtype == np.float16
    out = tiny.capture(tokens, segment_ids, positions, CaptureSpec(layers=(), logits=True))
    assert list(out) == ["logits"] and out["logits"].shape == (2, 12, tiny.config.vocab_size)


def test_hook_points_add_up(tiny):
    tokens, segment_ids, positions, _ = _batch(0)
    out = {k: np.asarray(v) for k, v in tiny.capture(
        tokens, segment_ids, positions, CaptureSpec(hooks=HOOKS, layers=(0, 1, 2))).items()}
    for layer in range(3):
        name = f"blocks.{layer}.hook_"
        np.testing.assert_allclose(out[name + "resid_mid"], out[name + "resid_pre"] + out[name + "attn_out"],
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[name + "resid_post"], out[name + "resid_mid"] + out[name + "mlp_out"],
                                   rtol=1e-6, atol=1e-6)
    for layer in range(2):
        np.testing.assert_array_equal(out[f"blocks.{layer}.hook_resid_post"],
                                      out[f"blocks.{layer + 1}.hook_resid_pre"])
    # Activations change from layer to layer (the random geometry is not degenerate) and stay finite.
    assert np.abs(out["blocks.2.hook_resid_post"] - out["blocks.0.hook_resid_post"]).mean() > 0.1
    assert all(np.isfinite(v).all() for v in out.values())


def test_padding_and_other_sequences_do_not_leak_into_a_sequence(tiny):
    tokens, segment_ids, positions, placements = _batch(0)
    spec = CaptureSpec(hooks=("resid_post",), layers=(3,))
    base = np.asarray(tiny.capture(tokens, segment_ids, positions, spec)["blocks.3.hook_resid_post"])
    # Scramble the padding's token ids and positions: real tokens must not move by a single bit.
    noisy_tokens, noisy_positions = tokens.copy(), positions.copy()
    padding = segment_ids == 0
    noisy_tokens[padding] = 7
    noisy_positions[padding] = 3
    noisy = np.asarray(tiny.capture(noisy_tokens, segment_ids, noisy_positions, spec)["blocks.3.hook_resid_post"])
    np.testing.assert_array_equal(base[~padding], noisy[~padding])
    # The second sequence of row 0, run alone at the start of a row, gives the same activations.
    row, start, n = placements[1]
    alone = pack_rows([[tokens[row, start:start + n]], [tokens[1, :9]]], 12)
    alone_out = np.asarray(tiny.capture(*alone[:3], spec)["blocks.3.hook_resid_post"])
    np.testing.assert_allclose(alone_out[0, :n], base[row, start:start + n], rtol=1e-5, atol=1e-5)


def test_bad_token_ids_and_shapes_are_rejected(tiny):
    tokens, segment_ids, positions, _ = _batch(0)
    spec = CaptureSpec(layers=(0,))
    bad = tokens.copy()
    bad[1, 3] = tiny.config.vocab_size
    with pytest.raises(ValueError, match=r"token id 151936 at \[1, 3\].*0\.\.151935"):
        tiny.capture(bad, segment_ids, positions, spec)
    with pytest.raises(ValueError, match="segment_ids must be a \\[batch, length\\]"):
        tiny.capture(tokens, segment_ids[:, :5], positions, spec)
    with pytest.raises(ValueError, match="positions must hold integers"):
        tiny.capture(tokens, segment_ids, positions.astype(np.float32), spec)


def test_random_weights_are_deterministic_and_layer_prefixes_agree():
    from model.config import QWEN25_GEOMETRIES
    from model.weights import random_params

    config = QWEN25_GEOMETRIES["tiny"]
    full = random_params(config, seed=0, dtype="float32")
    again = random_params(config, seed=0, dtype="float32")
    cut = random_params(config.with_layers(2), seed=0, dtype="float32")
    other = random_params(config, seed=1, dtype="float32")
    half = random_params(config, seed=0, dtype="bfloat16")
    for name in ("q_w", "down_w", "k_b"):
        layer_values = np.asarray(full["layers"][name])
        np.testing.assert_array_equal(layer_values, np.asarray(again["layers"][name]))
        np.testing.assert_array_equal(layer_values[:2], np.asarray(cut["layers"][name]))
        assert not np.array_equal(layer_values, np.asarray(other["layers"][name]))
        np.testing.assert_array_equal(layer_values.astype("bfloat16"), np.asarray(half["layers"][name]))
    # Matrices scaled by 1/sqrt(fan_in), norms at one.
    assert abs(float(np.asarray(full["layers"]["gate_w"]).std()) - config.hidden_size ** -0.5) < 0.01
    np.testing.assert_array_equal(np.asarray(full["final_norm"]), 1.0)
    assert "lm_head" not in full  # the tiny geometry ties its embeddings


def test_random_spec_cuts_layers_and_brings_the_qwen25_tokenizer():
    from model import load_model

    model = load_model("random:tiny?layers=2&seed=3", dtype="bfloat16")
    assert model.config.num_hidden_layers == 2
    assert model.attention == "xla"  # CPU
    assert model.tokenizer.convert_ids_to_tokens(151644) == "<|im_start|>"
    description = model.describe()
    assert description["model"] == "random:tiny?layers=2&seed=3" and description["seed"] == 3
    assert description["config"]["num_hidden_layers"] == 2


def test_real_geometries_are_the_published_ones():
    from model.config import QWEN25_GEOMETRIES

    expected = {  # (d_model, layers, heads, kv heads, intermediate, vocab, tied)
        "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
        "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
        "qwen2.5-3b": (2048, 36, 16, 2, 11008, 151936, True),
        "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
        "qwen2.5-14b": (5120, 48, 40, 8, 13824, 152064, False),
        "qwen2.5-32b": (5120, 64, 40, 8, 27648, 152064, False),
        "qwen2.5-72b": (8192, 80, 64, 8, 29568, 152064, False),
    }
    for name, geometry in expected.items():
        c = QWEN25_GEOMETRIES[name]
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == geometry
        assert c.head_dim * c.num_attention_heads == c.hidden_size


def test_float32_compute_asks_for_full_precision_matmuls(tiny):
    tokens, segment_ids, positions, _ = _batch(0)
    text = str(tiny.make_jaxpr(tokens, segment_ids, positions, CaptureSpec(layers=(0,))))
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in text


def test_flops_count_matches_the_issue_figure_for_qwen25_05b():
    from model.config import QWEN25_GEOMETRIES
    from model.qwen2 import forward_flops

    config = QWEN25_GEOMETRIES["qwen2.5-0.5b"]
    per_token = forward_flops(config, 1, 2048, CaptureSpec(layers=(23,))) / 2048
    assert 0.79e9 < per_token < 0.82e9
    assert forward_flops(config, 1, 2048, CaptureSpec(layers=(11,))) < 0.51 * forward_flops(
        config, 1, 2048, CaptureSpec(layers=(23,)))
    with_head = forward_flops(config, 1, 2048, CaptureSpec(layers=(), logits=True)) / 2048
    assert with_head - per_token == pytest.approx(2 * 896 * 151936)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in __import__("jax").devices()), reason="needs a CUDA GPU")
def test_cudnn_attention_matches_xla_within_bfloat16_tolerance():
    from model import load_model
    from model.torch_reference import compare, pack_right_padded

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 151643, size=n) for n in (128, 77, 3, 100)]
    fused = load_model("random:qwen2.5-0.5b?layers=4", dtype="bfloat16", attention="cudnn")
    plain = load_model("random:qwen2.5-0.5b?layers=4", dtype="bfloat16", attention="xla")
    spec = CaptureSpec(hooks=("resid_post",), layers=(0, 3))
    for tokens, segment_ids, positions, placements in (
        pack_right_padded(sequences, 128),
        pack_rows([[sequences[1], sequences[2]], [sequences[3]], [sequences[0]], [sequences[2]] * 3], 128),
    ):
        want = {k: np.asarray(v, np.float32) for k, v in plain.capture(tokens, segment_ids, positions, spec).items()}
        got = fused.capture(tokens, segment_ids, positions, spec)
        references = [{k: v[row, start:start + n] for k, v in want.items()} for row, start, n in placements]
        errors = compare(got, references, placements)
        assert max(errors.values()) <= 5e-2, errors


def test_cudnn_call_arguments_give_the_reference_result_on_xla(tiny, monkeypatch):
    """The cuDNN branch's own arguments (sequence lengths for right-padded rows; is_causal plus a same-segment
    mask for packed rows), run by XLA's implementation of the same call on CPU: any mistake in what we pass
    shows here, before a GPU does. The GPU test above then checks the kernel itself."""
    import dataclasses

    import jax

    from model.torch_reference import compare, pack_right_padded

    original = jax.nn.dot_product_attention
    calls = []

    def on_xla(*args, implementation=None, **kwargs):
        calls.append((implementation, {k: v for k, v in kwargs.items() if v is not None and v is not False}))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
    as_cudnn = dataclasses.replace(tiny, attention="cudnn")
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 151643, size=n) for n in (16, 9, 1, 7)]
    spec = CaptureSpec(hooks=("attn_out", "resid_post"), layers=(0, 3))
    for batch, expected in ((pack_right_padded(sequences, 16), {"query_seq_lengths", "key_value_seq_lengths"}),
                            (pack_rows([[sequences[1], sequences[3]], [sequences[2]] * 3, [sequences[0]]], 16),
                             {"mask"})):
        tokens, segment_ids, positions, placements = batch
        calls.clear()
        got = as_cudnn.capture(tokens, segment_ids, positions, spec)
        assert calls and all(implementation == "cudnn" for implementation, _ in calls)
        assert {key for _, kwargs in calls for key in kwargs} == expected | {"is_causal"}
        want = {k: np.asarray(v) for k, v in tiny.capture(tokens, segment_ids, positions, spec).items()}
        references = [{k: v[row, start:start + n] for k, v in want.items()} for row, start, n in placements]
        errors = compare(got, references, placements)
        assert max(errors.values()) <= 1e-5, errors


def test_load_config_reads_the_geometry_without_weights(tiny_checkpoint_untied):
    from model import load_config

    assert load_config("random:qwen2.5-7b?layers=3").num_hidden_layers == 3
    config = load_config(str(tiny_checkpoint_untied))
    assert (config.num_hidden_layers, config.tie_word_embeddings, config.hidden_size) == (3, False, 64)


def test_splash_attention_matches_xla():
    """The TPU kernel (interpreted on CPU) on packed rows, including a row of one token and a full row."""
    from model import load_model
    from model.torch_reference import compare

    rng = np.random.default_rng(0)
    rows = [[rng.integers(0, 151643, size=n) for n in lengths] for lengths in ([50, 60], [128], [3, 4, 100], [1])]
    tokens, segment_ids, positions, placements = pack_rows(rows, 128)
    spec = CaptureSpec(hooks=("attn_out", "resid_post"), layers=(0, 3))
    plain = load_model("random:tiny", dtype="float32", attention="xla")
    splash = load_model("random:tiny", dtype="float32", attention="splash")
    assert splash.attention == "splash"
    want = {k: np.asarray(v) for k, v in plain.capture(tokens, segment_ids, positions, spec).items()}
    got = splash.capture(tokens, segment_ids, positions, spec)
    references = [{k: v[row, start:start + n] for k, v in want.items()} for row, start, n in placements]
    errors = compare(got, references, placements)
    assert max(errors.values()) <= 1e-5, errors
    # A length no splash tile divides runs the XLA path instead of failing.
    short = pack_rows([[rows[0][0][:7]]], 12)
    np.testing.assert_allclose(np.asarray(splash.capture(*short[:3], spec)["blocks.3.hook_resid_post"]),
                               np.asarray(plain.capture(*short[:3], spec)["blocks.3.hook_resid_post"]), rtol=1e-6)


def test_a_wrong_right_padded_hint_is_refused(tiny):
    tokens, segment_ids, positions, _ = _batch(0)  # row 0 holds two sequences
    with pytest.raises(ValueError, match="right_padded=True but some row holds several sequences"):
        tiny.capture(tokens, segment_ids, positions, CaptureSpec(layers=(0,)), right_padded=True)
