"""SAELens glue that needs neither SAELens nor torch to import: the activation scale SAELens would otherwise
estimate.

SAELens's `normalize_activations="expected_average_only_in"` multiplies every input by sqrt(d_in) / (mean L2 norm
of a token's activation) and, before training, estimates that mean from `n_batches_for_norm_estimate` batches of
the data provider. When the output carries statistics (`OUTPUT/stats.json`, one record per hook and layer with the
sum and count of the token norms), the exact value over every committed token is known already:

    trainer = SAETrainer(cfg, sae, provider)
    factor = saelens_scaling_factor(ds, "resid_post", 6)
    if factor is not None:
        trainer.activation_scaler.scaling_factor = factor   # SAETrainer.fit() then skips its estimate
"""
from __future__ import annotations

import json
import math
import warnings

STATS_NAME = "stats.json"

__all__ = ["saelens_scaling_factor", "mean_token_norm", "STATS_NAME"]


def _stats_record(ds, hook: str, layer: int) -> dict | None:
    """The stats.json record of a hook and layer, or None when the output has no stats.json or no such record."""
    hook, layer = ds.check_pair(hook, layer)
    store = ds._store
    if not store.exists(STATS_NAME):
        return None
    where = store.path(STATS_NAME)
    try:
        doc = json.loads(store.read_bytes(STATS_NAME))
    except ValueError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); rebuild it with python -m pipeline.manifest "
                         f"{ds.output}") from None
    records = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{where} has no 'layers' list of per-hook-and-layer records: not a statistics file "
                         "this reader knows")
    for record in records:
        if isinstance(record, dict) and record.get("hook") == hook and str(record.get("layer")) == str(layer):
            return record
    return None


def mean_token_norm(ds, hook: str, layer: int) -> float | None:
    """Mean L2 norm of a token's stored activation over the tokens stats.json counted (`norm.sum / norm.count`),
    or None when the output has no statistics for this hook and layer."""
    record = _stats_record(ds, hook, layer)
    if record is None:
        return None
    where = f"{ds._store.path(STATS_NAME)} record hook={hook} layer={layer}"
    try:
        total, count = float(record["norm"]["sum"]), int(record["norm"]["count"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: no usable norm.sum / norm.count ({err!r})") from None
    if count <= 0 or not math.isfinite(total) or total <= 0:
        raise ValueError(f"{where}: norm.sum={total} over norm.count={count} tokens gives no positive mean norm")
    tokens = record.get("tokens")
    if tokens is not None and int(tokens) != ds.num_tokens(hook, layer):
        warnings.warn(f"{where} counts {tokens} tokens, the committed files {ds.num_tokens(hook, layer)}: the "
                      "statistics describe another set of shards (a run still going?); the mean norm is theirs",
                      stacklevel=2)
    return total / count


def saelens_scaling_factor(ds, hook: str, layer: int) -> float | None:
    """sqrt(d_model) / mean token norm, the factor SAELens's `expected_average_only_in` normalisation applies, from
    stats.json; None when the output has no statistics (SAELens then estimates it itself)."""
    mean = mean_token_norm(ds, hook, layer)
    return None if mean is None else math.sqrt(ds.d_model) / mean
