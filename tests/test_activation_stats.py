"""transforms/activation_stats.py against numpy float64 on the concatenated data; merges in any order."""
import itertools
import math
import sys

import ml_dtypes
import numpy as np
import pytest

from transforms import activation_stats as S
from transforms import stats_kernel
from transforms.annotations import PART_NAMES

D = 24


def make_shard(rng, n, first_sample, dtype=ml_dtypes.bfloat16):
    values = rng.standard_normal((n, D)).astype(np.float32) * rng.lognormal(0, 1, D).astype(np.float32)
    values[:, 3] += 40.0  # a massive dimension with a large mean
    values[0] *= 30.0     # an attention-sink-like token
    lengths = [n // 2, n - n // 2]
    sample_index = np.repeat([0, 1], lengths)
    cols = {
        "part": rng.integers(0, len(PART_NAMES), n),
        "row": np.where(rng.random(n) < 0.5, rng.integers(0, 5, n), -1),
        "col": rng.integers(0, 7, n),
        "color": rng.integers(-1, 10, n),
        "position": np.concatenate([np.arange(k) for k in lengths]),
        "token_id": rng.integers(0, 1000, n),
    }
    cols["col"] = np.where(cols["row"] >= 0, cols["col"], -1)
    ids = [f"s{first_sample}", f"s{first_sample + 1}"]
    return values.astype(dtype), cols, sample_index, ids


def shard_stats(shard, **kw):
    values, cols, sample_index, ids = shard
    return S.compute(values, hook="resid_post", layer=3, sample_index=sample_index, sample_ids=ids,
                     storage_dtype="bfloat16", **cols, **kw)


@pytest.fixture(scope="module")
def shards():
    rng = np.random.default_rng(7)
    return [make_shard(rng, n, 2 * i) for i, n in enumerate((300, 1, 517, 64))]


def reference(shards):
    x = np.concatenate([s[0] for s in shards]).astype(np.float64)
    cols = {k: np.concatenate([s[1][k] for s in shards]) for k in shards[0][1]}
    ids = np.concatenate([np.array(s[3])[s[2]] for s in shards])
    return x, cols, ids


def check_against_reference(stats, shards):
    x, cols, ids = reference(shards)
    n = len(x)
    assert stats.tokens == n and stats.shards == len(shards)
    np.testing.assert_allclose(stats.dim_sum, x.sum(0), rtol=1e-9)
    np.testing.assert_allclose(stats.dim_sumsq, (x * x).sum(0), rtol=1e-9)
    assert np.array_equal(stats.dim_min, x.min(0)) and np.array_equal(stats.dim_max, x.max(0))
    np.testing.assert_allclose(stats.dim_mean(), x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.dim_var(), x.var(0), rtol=1e-9)
    norms = np.linalg.norm(x, axis=1)
    assert stats.norm_count == n
    assert math.isclose(stats.norm_sum, norms.sum(), rel_tol=1e-9)
    assert math.isclose(stats.norm_sumsq, (norms ** 2).sum(), rel_tol=1e-9)
    assert stats.norm_min == norms.min() and stats.norm_max == norms.max()
    expected_hist = np.zeros(S.NUM_BINS, np.int64)
    expected_hist[0] = (norms == 0).sum()
    expected_hist[1] = ((norms > 0) & (norms < S.EDGES[0])).sum()
    expected_hist[2:-1] = np.histogram(norms, bins=S.EDGES)[0]
    expected_hist[-1] = (norms >= S.EDGES[-1]).sum()
    assert np.array_equal(stats.histogram, expected_hist)
    assert math.isclose(stats.saelens_scale(), math.sqrt(D) / norms.mean(), rel_tol=1e-9)
    order = sorted(range(n), key=lambda i: (-norms[i], ids[i], cols["position"][i]))[:S.TOP_K]
    assert [(t.sample_id, t.position, t.token_id) for t in stats.top] == [
        (ids[i], int(cols["position"][i]), int(cols["token_id"][i])) for i in order]
    for code, name in enumerate(PART_NAMES):
        mask = cols["part"] == code
        if mask.any():
            assert stats.by_part[name].tokens == mask.sum()
            assert math.isclose(stats.by_part[name].mean_norm, norms[mask].mean(), rel_tol=1e-9)
        else:
            assert name not in stats.by_part
    cells = {(r, c) for r, c in zip(cols["row"], cols["col"]) if r >= 0}
    assert set(stats.by_cell) == {f"{r},{c}" for r, c in cells}
    for r, c in cells:
        mask = (cols["row"] == r) & (cols["col"] == c)
        group = stats.by_cell[f"{r},{c}"]
        assert group.tokens == mask.sum() and math.isclose(group.mean_norm, norms[mask].mean(), rel_tol=1e-9)
    for color in range(10):
        mask = cols["color"] == color
        assert stats.by_color[str(color)].tokens == mask.sum()
        assert math.isclose(stats.by_color[str(color)].norm_sum, norms[mask].sum(), rel_tol=1e-9)


def assert_same(a, b, exact_sums=False):
    for name in ("tokens", "shards", "non_finite", "norm_count", "norm_min", "norm_max", "norm_non_finite"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("dim_min", "dim_max", "dim_non_finite", "histogram"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    rtol = 0 if exact_sums else 1e-12
    np.testing.assert_allclose(a.dim_sum, b.dim_sum, rtol=rtol)
    np.testing.assert_allclose(a.dim_sumsq, b.dim_sumsq, rtol=rtol)
    assert a.top == b.top
    assert set(a.by_part) == set(b.by_part) and set(a.by_cell) == set(b.by_cell)
    for key in a.by_cell:
        assert a.by_cell[key].tokens == b.by_cell[key].tokens
        assert math.isclose(a.by_cell[key].norm_sum, b.by_cell[key].norm_sum, rel_tol=rtol)


def test_one_shard_equals_numpy_float64(shards):
    check_against_reference(shard_stats(shards[0]), shards[:1])


def test_merged_shards_equal_numpy_float64_on_the_concatenation(shards):
    merged = S.merge_all(shard_stats(s) for s in shards)[("resid_post", 3)]
    check_against_reference(merged, shards)


def test_merge_is_order_independent(shards):
    parts = [shard_stats(s) for s in shards]
    results = []
    for order in itertools.permutations(range(len(parts))):
        results.append(S.merge_all(parts[i] for i in order)[("resid_post", 3)])
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
    for other in results[1:] + [tree]:
        assert_same(results[0], other)


def test_json_round_trip_is_lossless(shards):
    stats = S.merge_all(shard_stats(s) for s in shards)[("resid_post", 3)]
    data = S.dumps(S.document([stats], shard="h000-ab"))
    header, (back,) = S.loads(data)
    assert header["shard"] == "h000-ab"
    assert_same(stats, back, exact_sums=True)
    assert back.norm_sum == stats.norm_sum and back.norm_sumsq == stats.norm_sumsq
    assert S.dumps(S.document([back], shard="h000-ab")) == data


def test_documents_are_strict_json_with_the_json_modules_numbers(shards):
    """dumps (orjson) gives strict JSON that the json module reads to the same document; a float NaN that skipped
    _float is refused, as the json module refuses it, not written as null; a None is null either way."""
    import json

    doc = S.document(S.merge_all(shard_stats(s) for s in shards).values(), shard="h000-0")
    data = S.dumps(doc)
    assert json.loads(data) == json.loads(json.dumps(doc, sort_keys=True, allow_nan=False))
    assert data == S.dumps(json.loads(data)) and b" " not in data[:200]
    with pytest.raises(ValueError, match="not JSON compliant"):
        S.dumps({**doc, "stray": float("nan")})
    assert json.loads(S.dumps({**doc, "none": None}))["none"] is None
    with pytest.raises(ValueError, match="somewhere.json: not JSON"):
        S.loads(b'{"schema_version": 1, "x": NaN}', "somewhere.json")


def test_non_finite_values_are_counted_and_left_out():
    rng = np.random.default_rng(1)
    values, cols, sample_index, ids = make_shard(rng, 50, 0, dtype=np.float16)
    values[5, 2] = np.inf
    values[9, 0] = -np.inf
    values[9, 7] = np.nan
    stats = S.compute(values, hook="mlp_out", layer=0, sample_index=sample_index, sample_ids=ids,
                      storage_dtype="float16", float16_overflow=2, **cols)
    assert stats.non_finite == 3 and stats.float16_overflow == 2 and stats.norm_non_finite == 2
    assert stats.dim_non_finite[2] == 1 and stats.dim_non_finite[0] == 1 and stats.dim_non_finite.sum() == 3
    x = values.astype(np.float64)
    good = np.isfinite(x)
    np.testing.assert_allclose(stats.dim_sum, np.where(good, x, 0).sum(0), rtol=1e-9)
    assert stats.dim_max[2] == np.where(good, x, -np.inf)[:, 2].max()
    rows = good.all(1)
    norms = np.linalg.norm(x[rows], axis=1)
    assert stats.norm_count == 48 and math.isclose(stats.norm_sum, norms.sum(), rel_tol=1e-9)
    assert stats.histogram.sum() == 48
    np.testing.assert_allclose(stats.dim_mean()[2], np.where(good, x, 0)[:, 2].sum() / 49, rtol=1e-9)
    _, (back,) = S.loads(S.dumps(S.document([stats])))
    assert_same(stats, back, exact_sums=True)


def test_zero_tokens_and_zero_norms():
    empty = S.compute(np.zeros((0, 4), np.float32), hook="resid_pre", layer=1, part=np.zeros(0), row=np.zeros(0),
                      col=np.zeros(0), color=np.zeros(0), position=np.zeros(0), token_id=np.zeros(0),
                      sample_index=np.zeros(0, int), sample_ids=[], storage_dtype="float32")
    assert empty.tokens == 0 and empty.mean_norm() is None and empty.saelens_scale() is None
    zeros = S.compute(np.zeros((3, 4), np.float32), hook="resid_pre", layer=1, part=np.zeros(3, int),
                      row=-np.ones(3, int), col=-np.ones(3, int), color=-np.ones(3, int), position=np.arange(3),
                      token_id=np.arange(3), sample_index=np.zeros(3, int), sample_ids=["a"], storage_dtype="float32")
    assert zeros.histogram[S.ZERO_BIN] == 3 and zeros.by_cell == {} and zeros.by_color == {}
    assert [t.position for t in zeros.top] == [0, 1, 2]  # ties broken by sample then position
    merged = empty.merge(zeros)
    assert merged.tokens == 3 and merged.norm_min == 0.0


def test_histogram_edges_are_exact_and_log_spaced():
    edges = S.histogram_edges()
    assert np.all(np.diff(edges) > 0)
    octaves = edges[::S.BINS_PER_OCTAVE]
    assert np.array_equal(octaves, np.ldexp(1.0, np.arange(S.MIN_OCTAVE, S.MAX_OCTAVE + 1)))
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, 2 ** (1 / S.BINS_PER_OCTAVE), rtol=1e-12)


def test_percentiles_from_the_histogram_are_within_one_bin(shards):
    stats = S.merge_all(shard_stats(s) for s in shards)[("resid_post", 3)]
    norms = np.linalg.norm(reference(shards)[0], axis=1)
    for q in (1, 50, 99):
        ratio = stats.norm_percentile(q) / np.percentile(norms, q)
        assert 2 ** (-1 / S.BINS_PER_OCTAVE) <= ratio <= 2 ** (1 / S.BINS_PER_OCTAVE), q


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="column row"):
        S.compute(np.zeros((2, 3), np.float32), hook="resid_post", layer=0, part=np.zeros(2, int),
                  row=np.zeros(3, int), col=np.zeros(2, int), color=np.zeros(2, int), position=np.zeros(2, int),
                  token_id=np.zeros(2, int), sample_index=np.zeros(2, int), sample_ids=["a"], storage_dtype="float32")
    with pytest.raises(ValueError, match="stats/x.json: schema_version"):
        S.loads(b'{"schema_version": 99}', "stats/x.json")
    a = S.LayerStats("resid_post", 0, 4, "bfloat16")
    with pytest.raises(ValueError, match="do not merge"):
        a.merge(S.LayerStats("resid_post", 0, 4, "float32"))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("width", [24, 896])
def test_compiled_and_numpy_paths_agree(dtype, width, monkeypatch):
    """The compiled pass (transforms.stats_kernel) and the numpy pass give the same statistics: norms, extrema,
    histogram and top-k bit for bit, sums to float64 rounding; non-finite values take the masked path in both."""
    if stats_kernel.load() is None:
        pytest.skip("no C compiler: only the numpy path runs here")
    monkeypatch.setattr(sys.modules[__name__], "D", width)
    rng = np.random.default_rng(width)
    clean = make_shard(rng, 300, 0, dtype=dtype)
    dirty = make_shard(rng, 40, 2, dtype=dtype)
    dirty[0][3, 1], dirty[0][7, 0] = np.nan, np.inf
    for shard in (clean, dirty):
        fast = shard_stats(shard)
        with monkeypatch.context() as patch:
            patch.setattr(stats_kernel, "load", lambda: None)
            slow = shard_stats(shard)
        assert_same(fast, slow)
        assert fast.non_finite == slow.non_finite and np.array_equal(fast.dim_non_finite, slow.dim_non_finite)
    assert shard_stats(dirty).non_finite == 2
