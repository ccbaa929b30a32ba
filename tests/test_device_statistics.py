"""The statistics' passes over the values made on the device beside the capture (model.statistics), against the
writer's host pass: norms, extrema, histograms, top tokens and counts bit for bit, sums to float64 rounding, with
padding, NaN, inf and every storage dtype; the writer using them; and --statistics_on end to end."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from model import statistics as device_stats
from pipeline import stats as pipeline_stats
from tests.test_write import make_batch
from transforms import activation_stats as S
from transforms.extract import real_token_index
from transforms.write import ShardWriter, activation_table, committed_shards


def _padded(batch, values: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray, tuple]:
    """values [n_real, d] scattered into the batch's [B, L, d] (padding = `fill`), the real-token mask and index."""
    shape = np.shape(batch["tokens"])
    rows, cols = real_token_index(batch["placements"], shape)
    full = np.full(shape + (values.shape[1],), fill, dtype=values.dtype)
    full[rows, cols] = values
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return full, mask, (rows, cols)


def _both(batch, values: np.ndarray, storage_dtype: str, fill: float = 3.0e4):
    """(host statistics, statistics from the device's reductions) of one activation file."""
    table = activation_table(batch["samples"], batch["placements"], values, "resid_post", 3, storage_dtype)
    host = S.from_arrow(table, "resid_post", 3, storage_dtype)
    full, mask, (rows, cols) = _padded(batch, values, fill)
    reductions = device_stats.reduce_outputs({"blocks.3.hook_resid_post": full}, mask)
    on_host = device_stats.to_host(reductions["blocks.3.hook_resid_post"], rows, cols)
    return host, S.from_arrow(table, "resid_post", 3, storage_dtype, reductions=on_host)


def _values(n: int, d: int, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.standard_t(4, (n, d)) * rng.lognormal(0, 2, d)).astype(np.float32)
    return values.astype(dtype)


@pytest.mark.parametrize("d", [5, 24, 130, 896])
@pytest.mark.parametrize("dtype,storage", [(ml_dtypes.bfloat16, "bfloat16"), (np.float16, "float16"),
                                           (np.float32, "float32"), (ml_dtypes.bfloat16, "float32")])
def test_device_reductions_give_the_hosts_statistics(d, dtype, storage):
    batch = make_batch("dev", (5, 9, 3, 11), batch_size=2)
    n = sum(p[3] for p in batch["placements"])
    host, device = _both(batch, _values(n, d, dtype, seed=d), storage)
    assert host.tokens == device.tokens == n
    assert pipeline_stats.compare({host.key: host}, {device.key: device}) == []
    # The parts compared exactly above, once more by hand: every token's norm lands in the same bin.
    np.testing.assert_array_equal(host.histogram, device.histogram)
    assert (host.norm_min, host.norm_max) == (device.norm_min, device.norm_max)
    np.testing.assert_allclose(device.dim_sum, host.dim_sum, rtol=1e-12, atol=1e-300)


def test_non_finite_values_are_counted_and_left_out_as_on_the_host():
    batch = make_batch("nan", (6, 4, 8), batch_size=2)
    n = sum(p[3] for p in batch["placements"])
    values = _values(n, 24, np.float16, seed=3)
    values[2, 5], values[7, 0], values[7, 1], values[11, 23] = np.nan, np.inf, -np.inf, np.inf
    # Padding holds NaN: outside the mask, it must not count.
    host, device = _both(batch, values, "float16", fill=np.nan)
    assert host.non_finite == device.non_finite == 4 and device.norm_non_finite == 3
    np.testing.assert_array_equal(host.dim_non_finite, device.dim_non_finite)
    assert pipeline_stats.compare({host.key: host}, {device.key: device}) == []


def test_the_writer_takes_the_devices_reductions_and_checks_them(tmp_path):
    batch = make_batch("w", (5, 9, 3))
    n = sum(p[3] for p in batch["placements"])
    values = _values(n, 16, ml_dtypes.bfloat16)
    full, mask, (rows, cols) = _padded(batch, values, 0.0)
    name = "blocks.1.hook_resid_post"
    reductions = device_stats.to_host(device_stats.reduce_outputs({name: full}, mask)[name], rows, cols)
    on_host = S.host_reductions(values)  # what the benchmarks stand in for the device with
    for field in device_stats.REDUCTION_FIELDS:
        if field in ("dim_sum", "dim_sumsq"):
            np.testing.assert_allclose(on_host[field], reductions[field], rtol=1e-12, atol=1e-300)
        else:
            np.testing.assert_array_equal(on_host[field], reductions[field], err_msg=field)
    marked = dict(reductions, dim_sum=reductions["dim_sum"] + 1000.0)  # proof that these are what it stores
    root = str(tmp_path / "out")
    ShardWriter(root, "h000", "random:tiny", "bfloat16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"], {("resid_post", 1): values},
        reductions={("resid_post", 1): marked})
    (marker,) = committed_shards(root).values()
    (stored,) = pipeline_stats.read_shard_stats(root, S.marker_entry(marker))
    np.testing.assert_array_equal(stored.dim_sum, marked["dim_sum"])
    bad = dict(reductions, row_sumsq=reductions["row_sumsq"][:-1])
    with pytest.raises(ValueError, match=r"resid_post/1: the device's row_sumsq has shape \(16,\), expected \(17,\)"):
        ShardWriter(str(tmp_path / "other"), "h000", "random:tiny", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], {("resid_post", 1): values},
            reductions={("resid_post", 1): bad})


def test_where_the_statistics_run():
    assert device_stats.on_device("auto", "gpu") and device_stats.on_device("auto", "cuda")
    assert not device_stats.on_device("auto", "cpu") and not device_stats.on_device("auto", "tpu")
    assert device_stats.on_device("device", "cpu") and not device_stats.on_device("host", "gpu")
    with pytest.raises(ValueError, match="tpu devices have no float64.*--statistics_on=auto or host"):
        device_stats.on_device("device", "tpu")
    with pytest.raises(ValueError, match="expected one of auto, device, host"):
        device_stats.on_device("gpu", "gpu")
    with pytest.raises(ValueError, match="the mask"):
        device_stats.reduce_outputs({"x": np.zeros((2, 3, 4), np.float32)}, np.ones((2, 4), bool))


def test_statistics_on_the_device_end_to_end_and_resumed_on_the_host(tiny_checkpoint, tmp_path):
    """A run with the reductions on the device, resumed with them on the host: one output whose statistics equal
    numpy's and the recomputation's."""
    import os

    from tests.arc_fixtures import write_challenges
    from tests.stats_reference import check_stats_against_numpy
    from tests.test_end_to_end import run_here

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=4, bad=False)
    output = tmp_path / "out"
    common = [f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=0,1",
              "--hooks=resid_post,mlp_out", "--batch_size=2", "--max_seq_len=2048", "--progress_interval=0"]
    run_here(*common, "--max_samples=2", "--statistics_on=device")
    run_here(*common, "--resume", "--statistics_on=host")
    stored = pipeline_stats.read_stats(str(output))
    assert check_stats_against_numpy(str(output), stored) > 0
    assert pipeline_stats.main([str(output)]) == 0
    assert len(os.listdir(output / "stats")) == len(os.listdir(output / "samples")) >= 2
