"""The extracted-batch coder: pickle round trip, and a size estimate that does not pickle the activations."""
import pickle

import apache_beam as beam
import ml_dtypes
import numpy as np

from transforms.coders import ExtractedBatchCoder, ExtractedBatchHint, extracted_batch_size
from transforms.elements import ExtractedBatch, Placement


def _extracted(tokens=512, d_model=64, layers=(0, 3)):
    rng = np.random.default_rng(0)
    activations = {("resid_post", layer): rng.standard_normal((tokens, d_model), np.float32).astype(ml_dtypes.bfloat16)
                   for layer in layers}
    samples = [{"sample_id": "s0", "token_ids": np.arange(tokens, dtype=np.int32)}]
    return ExtractedBatch(batch_id="00ab", samples=samples, placements=[Placement(0, 0, 0, tokens)],
                          activations=activations)


def test_round_trip_is_exact():
    coder = ExtractedBatchCoder()
    value = _extracted()
    back = coder.decode(coder.encode(value))
    assert back["batch_id"] == value["batch_id"] and back["placements"] == value["placements"]
    assert back["placements"][0].length == value["placements"][0].length  # still a Placement
    for key, array in value["activations"].items():
        assert back["activations"][key].dtype == array.dtype
        assert np.array_equal(back["activations"][key].view(np.uint16), array.view(np.uint16))


def test_size_estimate_is_close_without_pickling_the_arrays(monkeypatch):
    value = _extracted()
    actual = len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    pickled = []
    real_dumps = pickle.dumps
    monkeypatch.setattr(pickle, "dumps", lambda obj, *a, **k: pickled.append(obj) or real_dumps(obj, *a, **k))
    estimate = ExtractedBatchCoder().get_impl().estimate_size(value)
    assert abs(estimate - actual) < 0.01 * actual
    assert all("activations" not in obj for obj in pickled if isinstance(obj, dict))
    assert extracted_batch_size(value) <= estimate


def test_the_hint_selects_the_coder():
    assert isinstance(beam.coders.registry.get_coder(ExtractedBatchHint), ExtractedBatchCoder)


def test_default_coder_keeps_placements():
    """A Batch crossing a stage boundary with Beam's default coder comes back with its placements typed."""
    coder = beam.coders.registry.get_coder(object)
    batch = {"batch_id": "00ab", "tokens": np.zeros((1, 4), np.int32), "placements": [Placement(0, 0, 1, 3)]}
    back = coder.decode(coder.encode(batch))
    assert back["placements"] == [(0, 0, 1, 3)] and back["placements"][0].start == 1
