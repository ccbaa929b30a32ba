"""SAELens end to end: a TopKTrainingSAE trained by SAELens's own SAETrainer on batches that ds.torch_iterable draws
from an output the real pipeline wrote; and the stats.json scale that spares SAELens its norm estimate."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from pipeline.dataset import open_activations
from pipeline.saelens import STATS_NAME, saelens_scaling_factor
from tests.pipeline_output import LAYER, pipeline_output

HOOK = "resid_post"
BATCH = 128


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_checkpoint):
    return pipeline_output(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(autouse=True)
def quiet_trainer(monkeypatch):
    import torch

    monkeypatch.setenv("WANDB_MODE", "disabled")
    # A tiny SAE's ops last microseconds: torch's intra-op thread pool only adds waits, many on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer_for(ds, provider, steps: int, **sae_options):
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=ds.d_model, d_sae=4 * ds.d_model, k=8, **sae_options))
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=1e-3, lr_end=1e-3,
                           device="cpu", logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=8)
    return SAETrainer(cfg, sae, provider)


def unexplained_variance(sae, x) -> float:
    import torch

    with torch.no_grad():
        error = ((sae(x) - x) ** 2).sum()
        return float(error / ((x - x.mean(0)) ** 2).sum())


def test_topk_sae_trains_from_torch_iterable(output):
    import torch

    torch.manual_seed(0)
    ds = open_activations(str(output))
    loader = torch.utils.data.DataLoader(ds.torch_iterable(HOOK, LAYER, BATCH, seed=0, epochs=None),
                                         batch_size=None)
    seen = []

    def provider():
        for batch in loader:
            seen.append(tuple(batch.shape))
            yield batch

    trainer = trainer_for(ds, provider(), steps=300, normalize_activations="expected_average_only_in")
    losses = []
    step = trainer.step

    def recording_step(batch):
        out = step(batch)
        losses.append(float(out.losses["mse_loss"].detach()))
        return out

    trainer.step = recording_step
    x = torch.from_numpy(ds.to_numpy(HOOK, LAYER, dtype="float32"))
    before = unexplained_variance(trainer.sae, x)
    sae = trainer.fit()
    after = unexplained_variance(sae, x)  # fit() folds SAELens's scale into the weights: raw inputs again

    assert len(losses) == 300 and set(seen) == {(BATCH, ds.d_model)}
    assert len(seen) == 300 + 8  # the training steps plus SAELens's own norm estimate
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    assert after < 0.5 * before and after < 0.6, (before, after)


def write_stats(root, ds, hook, layer) -> float:
    """A stats.json record as the statistics writer lays it out (norm.sum, norm.count per hook and layer)."""
    norms = np.linalg.norm(ds.to_numpy(hook, layer, dtype="float32").astype(np.float64), axis=1)
    record = {"hook": hook, "layer": layer, "d_model": ds.d_model, "storage_dtype": ds.storage_dtype,
              "tokens": len(norms), "norm": {"count": len(norms), "sum": float(norms.sum()),
                                             "sumsq": float((norms ** 2).sum())}}
    (root / STATS_NAME).write_text(json.dumps({"schema_version": 1, "layers": [record]}))
    return float(norms.mean())


def test_scaling_factor_from_stats_spares_the_estimate(output, tmp_path):
    import torch

    written = open_activations(str(output))  # the pipeline's own stats.json
    norms = np.linalg.norm(written.to_numpy(HOOK, LAYER, dtype="float32").astype(np.float64), axis=1)
    assert saelens_scaling_factor(written, HOOK, LAYER) == pytest.approx(
        math.sqrt(written.d_model) / norms.mean(), rel=1e-9)
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / STATS_NAME).unlink()
    ds = open_activations(str(copy))
    assert saelens_scaling_factor(ds, HOOK, LAYER) is None  # no statistics: None
    mean = write_stats(copy, ds, HOOK, LAYER)
    factor = saelens_scaling_factor(ds, HOOK, LAYER)
    assert factor == pytest.approx(math.sqrt(ds.d_model) / mean, rel=1e-12)
    assert saelens_scaling_factor(ds, "mlp_out", LAYER) is None  # no record for that hook

    pulled = []

    def provider():
        for batch in torch.utils.data.DataLoader(ds.torch_iterable(HOOK, LAYER, BATCH, epochs=None),
                                                 batch_size=None):
            pulled.append(1)
            yield batch

    trainer = trainer_for(ds, provider(), steps=3, normalize_activations="expected_average_only_in")
    trainer.activation_scaler.scaling_factor = factor
    trainer.fit()
    assert len(pulled) == 3  # SAELens drew no batch to estimate the norm

    (copy / STATS_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="stats.json is not valid JSON"):
        saelens_scaling_factor(ds, HOOK, LAYER)
    (copy / STATS_NAME).write_text(json.dumps({"layers": [{"hook": HOOK, "layer": LAYER, "norm": {"count": 0}}]}))
    with pytest.raises(ValueError, match="norm.sum"):
        saelens_scaling_factor(ds, HOOK, LAYER)
    with pytest.raises(ValueError, match="has no activations for hook='attn_out'"):
        saelens_scaling_factor(ds, "attn_out", LAYER)
