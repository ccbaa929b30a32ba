"""Our JAX Qwen2 against transformers' PyTorch Qwen2 (CPU) on tiny random checkpoints written by save_pretrained:
every hook point at every layer, final norm and logits, tied and untied (sharded) checkpoints, right-padded and
packed batches, each sequence compared with transformers running it alone."""
import numpy as np
import pytest

from model.hooks import HOOKS, CaptureSpec
from model.torch_reference import compare, load_torch_model, pack_right_padded, pack_rows, torch_hooks

FLOAT32_BOUND = 1e-5
# Documented in docs/model.md ("bfloat16 error"): measured at most 2.4e-2 on these checkpoints, the same size as
# transformers' own bfloat16 error against its float32.
BFLOAT16_BOUND = 5e-2

LENGTH = 16
SEQUENCE_LENGTHS = (5, 9, 3, 12, 7, 1, 4, 16)


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 151643, size=n).astype(np.int32) for n in SEQUENCE_LENGTHS]


def _batches(sequences):
    padded = pack_right_padded(sequences[:4], LENGTH)
    # Rows of two, two and three sequences, one of them a single token, and one row with no padding at all.
    packed_rows = [[sequences[0], sequences[1]], [sequences[2], sequences[3]], [sequences[4], sequences[5],
                   sequences[6]], [sequences[7]]]
    packed = pack_rows(packed_rows, LENGTH)
    order = [0, 1, 2, 3, 4, 5, 6, 7]
    return {"padded": (padded, [0, 1, 2, 3]), "packed": (packed, order)}


@pytest.fixture(scope="module", params=["tied", "untied"])
def case(request, tiny_checkpoint, tiny_checkpoint_untied, sequences):
    from model import load_model

    directory = tiny_checkpoint if request.param == "tied" else tiny_checkpoint_untied
    reference = torch_hooks(load_torch_model(directory, "float32"), sequences)
    return {
        "name": request.param,
        "directory": directory,
        "reference": reference,
        "float32": load_model(str(directory), dtype="float32", attention="xla"),
    }


def _full_spec(model, out_dtype=None):
    layers = tuple(range(model.config.num_hidden_layers))
    return CaptureSpec(hooks=HOOKS, layers=layers, logits=True, final_norm=True, out_dtype=out_dtype)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_float32_matches_transformers_at_every_hook(case, sequences, layout):
    model = case["float32"]
    (tokens, segment_ids, positions, placements), order = _batches(sequences)[layout]
    spec = _full_spec(model)
    out = model.capture(tokens, segment_ids, positions, spec)
    assert set(out) == set(spec.output_names())
    errors = compare(out, [case["reference"][i] for i in order], placements)
    expected_names = {f"blocks.{l}.hook_{h}" for l in range(model.config.num_hidden_layers) for h in HOOKS}
    assert expected_names | {"ln_final.hook_normalized", "logits"} == set(errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FLOAT32_BOUND, f"{case['name']} {layout}: {worst} relative error {errors[worst]:.2e}"


def test_untied_checkpoint_is_really_sharded_and_untied(tiny_checkpoint_untied, case):
    assert (tiny_checkpoint_untied / "model.safetensors.index.json").is_file()
    if case["name"] == "untied":
        params = case["float32"].params
        assert "lm_head" in params
        assert not np.array_equal(np.asarray(params["lm_head"]), np.asarray(params["embed"]))


def test_resid_post_of_last_layer_is_not_the_final_hidden_state(case, sequences):
    """transformers' output_hidden_states ends with the final norm's output; resid_post is before it."""
    import torch

    torch_model = load_torch_model(case["directory"], "float32")
    with torch.no_grad():
        hidden = torch_model(input_ids=torch.as_tensor(sequences[1][None].astype(np.int64)),
                             output_hidden_states=True).hidden_states
    last = torch_model.config.num_hidden_layers - 1
    reference = case["reference"][1]
    assert not np.allclose(hidden[-1][0].numpy(), reference[f"blocks.{last}.hook_resid_post"], atol=1e-3)
    gain = torch_model.model.norm.weight.detach().numpy()
    np.testing.assert_allclose(hidden[-1][0].numpy(), reference["ln_final.hook_normalized"] * gain,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_error_is_within_the_documented_bound(case, sequences):
    from model import load_model

    model = load_model(str(case["directory"]), dtype="bfloat16", attention="xla")
    assert model.params["layers"]["q_w"].dtype == np.dtype("bfloat16")
    (tokens, segment_ids, positions, placements), order = _batches(sequences)["packed"]
    out = model.capture(tokens, segment_ids, positions, _full_spec(model))
    assert all(v.dtype == np.dtype("bfloat16") for v in out.values())
    errors = compare(out, [case["reference"][i] for i in order], placements)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= BFLOAT16_BOUND, f"{case['name']}: {worst} bfloat16 relative error {errors[worst]:.2e}"
    # Not trivially exact either: bfloat16 really was used.
    assert errors[worst] > 1e-4


def test_bfloat16_checkpoint_loads_exactly(tmp_path_factory, sequences):
    """Released Qwen2.5 weights are stored in bfloat16: they must load (upcast exactly to float32) and match
    transformers upcasting the same file."""
    from model import load_model
    from tests.checkpoints import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bf16"), torch_dtype="bfloat16", seed=2)
    reference = torch_hooks(load_torch_model(directory, "float32"), sequences[:4])
    model = load_model(str(directory), dtype="float32", attention="xla")
    tokens, segment_ids, positions, placements = pack_right_padded(sequences[:4], LENGTH)
    errors = compare(model.capture(tokens, segment_ids, positions, _full_spec(model)), reference, placements)
    assert max(errors.values()) <= FLOAT32_BOUND, errors
    half = load_model(str(directory), dtype="bfloat16", attention="xla")
    np.testing.assert_array_equal(np.asarray(half.params["layers"]["gate_w"]).astype(np.float32),
                                  np.asarray(model.params["layers"]["gate_w"]))
