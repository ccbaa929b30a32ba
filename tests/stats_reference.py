"""Statistics of an output computed with plain numpy in float64 from its decoded activations, and a check of the
stored statistics (OUTPUT/stats.json) against them: every token counted once, sums to 1e-9, counts, extrema and
histograms exact."""
from __future__ import annotations

import io
import math
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import activation_stats as S
from transforms.write import activations_to_numpy, committed_shards, join


def decoded(output: str) -> dict:
    """(hook, layer) -> (float64 values, part names, sample ids, positions) over every committed shard."""
    pieces = defaultdict(list)
    for shard, marker in committed_shards(output).items():
        for entry in marker["files"]:
            with FileSystems.open(join(output, entry["path"])) as handle:
                table = pq.read_table(io.BytesIO(handle.read()))
            pieces[(entry["hook"], int(entry["layer"]))].append((
                activations_to_numpy(table).astype(np.float64), np.array(table["part"].to_pylist()),
                np.array(table["sample_id"].to_pylist()), table["position"].to_numpy()))
    return {key: tuple(np.concatenate(column) for column in zip(*parts)) for key, parts in pieces.items()}


def check_stats_against_numpy(output: str, stored: dict) -> int:
    """Asserts the stored {(hook, layer): LayerStats} equal numpy's; returns the tokens per hook and layer."""
    data = decoded(output)
    assert set(stored) == set(data), (sorted(stored), sorted(data))
    tokens = set()
    for key, (x, parts, ids, positions) in data.items():
        stats = stored[key]
        pairs = set(zip(ids.tolist(), positions.tolist()))
        assert len(pairs) == len(x), f"{key}: a token appears twice among the activation files"
        assert stats.tokens == len(x), (key, stats.tokens, len(x))
        tokens.add(len(x))
        np.testing.assert_allclose(stats.dim_sum, x.sum(0), rtol=1e-9, atol=1e-12 * np.abs(x).sum(0).max())
        np.testing.assert_allclose(stats.dim_sumsq, (x * x).sum(0), rtol=1e-9)
        assert np.array_equal(stats.dim_min, x.min(0)) and np.array_equal(stats.dim_max, x.max(0)), key
        norms = np.linalg.norm(x, axis=1)
        assert stats.norm_count == len(x) and stats.non_finite == 0
        assert math.isclose(stats.norm_sum, norms.sum(), rel_tol=1e-9)
        assert stats.norm_min == norms.min() and stats.norm_max == norms.max()
        hist = np.zeros(S.NUM_BINS, np.int64)
        hist[S.ZERO_BIN] = (norms == 0).sum()
        hist[S.UNDERFLOW_BIN] = ((norms > 0) & (norms < S.EDGES[0])).sum()
        hist[2:-1] = np.histogram(norms, bins=S.EDGES)[0]
        hist[-1] = (norms >= S.EDGES[-1]).sum()
        assert np.array_equal(stats.histogram, hist), key
        order = np.lexsort((positions, ids, -norms))[:S.TOP_K]
        assert [(t.sample_id, t.position) for t in stats.top] == [(ids[i], int(positions[i])) for i in order], key
        for name in set(parts.tolist()):
            mask = parts == name
            assert stats.by_part[name].tokens == mask.sum()
            assert math.isclose(stats.by_part[name].mean_norm, norms[mask].mean(), rel_tol=1e-9)
        assert sum(g.tokens for g in stats.by_part.values()) == len(x)
    assert len(tokens) == 1, f"hooks and layers disagree on the token count: {tokens}"
    return tokens.pop()
