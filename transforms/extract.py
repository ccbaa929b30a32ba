"""Activation extraction: a DoFn that holds the hooked JAX Qwen, loaded once per worker process.

The accelerator is kept busy by dispatching batch n before fetching batch n-1: JAX dispatch is asynchronous, so
while the host strips padding from, encodes and writes the previous batch, the device computes the next one.

With --generate (ExtractConfig.generate) a batch's prompts are first continued by the model (transforms/answers.py,
which waits for the answers: the capture needs them), and the capture forward then runs over the final sequences,
prompt plus answer; the batch carries each sample's prediction row to the writer. The
model's side of each step (load for the local devices, prepare, dispatch, fetch) is model.handler's; the DoFn
only pipelines those calls and counts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.transforms import window
from apache_beam.utils import shared

from model.dtypes import to_storage, transfer_dtype
from model.hooks import hook_name
from transforms.answers import GenerateSettings, answer_batch, capture_batch
from transforms.elements import ExtractedBatch, Placement
from transforms.metrics import NAMESPACE, STATISTICS_CPU_COUNTER

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    dtype: str
    hooks: tuple[str, ...]
    layers: tuple[int, ...]
    storage_dtype: str
    attention: str = "auto"
    model_parallelism: int = 1
    progress_interval: float = 10.0
    # --generate: each batch's prompts are continued by the model first, then captured with their answers.
    generate: GenerateSettings | None = None
    # Where the statistics' passes over the values run (model.statistics.PLACES), or "off" (no statistics).
    statistics: str = "auto"


def real_token_index(placements: list[Placement], batch_shape) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of every real token, in sample order then position order."""
    rows, cols = [], []
    for _, row, start, length in placements:
        rows.append(np.full(length, row, dtype=np.int32))
        cols.append(np.arange(start, start + length, dtype=np.int32))
    if not rows:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    if rows.size and (rows.max() >= batch_shape[0] or cols.max() >= batch_shape[1]):
        raise ValueError(f"placements reach outside the batch of shape {batch_shape}")
    return rows, cols


# Beam counters of --generate runs (namespace arc_activations), summed into the run's summary.
GENERATION_COUNTERS = ("samples_generated", "generated_tokens", "generation_truncated", "predictions_unparsed",
                       "predictions_correct", "predictions_incorrect", "predictions_unknown")


def generation_counts(predictions) -> dict[str, int]:
    """The GENERATION_COUNTERS of some prediction rows: answers cut off by --max_new_tokens (a model that never
    stops), answers that did not parse, and the scored ones (unknown: no ground truth)."""
    from transforms.predictions import TRUNCATED

    return {
        "samples_generated": len(predictions),
        "generated_tokens": sum(len(row["token_ids"]) for row in predictions),
        "generation_truncated": sum(row["stop_reason"] == TRUNCATED for row in predictions),
        "predictions_unparsed": sum(row["grid"] is None for row in predictions),
        "predictions_correct": sum(row["correct"] is True for row in predictions),
        "predictions_incorrect": sum(row["correct"] is False for row in predictions),
        "predictions_unknown": sum(row["correct"] is None for row in predictions),
    }


class _ModelHandle:
    """Weak-referenceable holder so apache_beam.utils.shared can keep one model per worker process."""

    def __init__(self, config: ExtractConfig):
        import jax

        from model import CaptureSpec
        from model.handler import CaptureHandler

        self.handler = CaptureHandler(config.model, config.dtype, config.attention, config.model_parallelism)
        self.model = self.handler.load_model()
        mesh, devices = self.handler.mesh, jax.local_devices()
        self.load_seconds = self.handler.load_seconds
        self.mesh = mesh
        self.encoder = None
        if config.generate is not None:
            from transforms.grid_encoders import create_grid_encoder

            self.encoder = create_grid_encoder(config.generate.grid_encoder)
        self.statistics_on_device = False
        if config.statistics != "off" and hasattr(self.model, "reduce_statistics"):
            from model.statistics import on_device

            self.statistics_on_device = on_device(config.statistics, devices[0].platform)
        self.spec = CaptureSpec(
            hooks=config.hooks, layers=config.layers,
            out_dtype=transfer_dtype(config.dtype, config.storage_dtype))
        _LOG.info("loaded %s (%s) in %.1f s on %s", config.model, config.dtype, self.load_seconds, devices)


class ExtractActivations(beam.DoFn):
    """Batch -> ExtractedBatch (transforms.elements), one batch in flight on the device."""

    def __init__(self, config: ExtractConfig, shared_handle: shared.Shared | None = None):
        self._config = config
        self._shared = shared_handle or shared.Shared()
        self._batches = beam.metrics.Metrics.counter(NAMESPACE, "batches_extracted")
        self._tokens = beam.metrics.Metrics.counter(NAMESPACE, "tokens_extracted")
        self._compile = beam.metrics.Metrics.distribution(NAMESPACE, "first_batch_ms")
        self._generation = {name: beam.metrics.Metrics.counter(NAMESPACE, name) for name in GENERATION_COUNTERS}
        self._stats_cpu = beam.metrics.Metrics.counter(NAMESPACE, STATISTICS_CPU_COUNTER)

    def setup(self):
        config = self._config
        self._handle = self._shared.acquire(lambda: _ModelHandle(config), tag=repr(config))

    def start_bundle(self):
        self._pending = None
        self._started = getattr(self, "_started", None)
        self._done_tokens = getattr(self, "_done_tokens", 0)
        self._last_report = getattr(self, "_last_report", 0.0)

    def _answer(self, batch):
        """--generate: the batch of the prompts' final sequences (prompt + answer), with their prediction rows."""
        finals, predictions = answer_batch(self._handle.model, batch["samples"], self._config.generate,
                                           self._handle.encoder)
        answered = capture_batch(finals, self._config.generate)
        answered["predictions"] = predictions
        for name, value in generation_counts(predictions).items():
            self._generation[name].inc(value)
        return answered

    def _dispatch(self, batch):
        handle = self._handle
        if self._config.generate is not None:
            batch = self._answer(batch)
        arrays = [np.asarray(batch[k], dtype=np.int32) for k in ("tokens", "segment_ids", "positions")]
        # numpy in: the model checks the batch and detects right padding before placing it on the devices.
        outputs = handle.handler.dispatch(handle.model, handle.handler.prepare(handle.model, *arrays, handle.spec))
        rows, cols = real_token_index(batch["placements"], arrays[0].shape)
        reductions = None
        if handle.statistics_on_device:
            started = time.thread_time()
            mask = np.zeros(arrays[0].shape, dtype=bool)
            mask[rows, cols] = True
            reductions = handle.handler.dispatch_statistics(handle.model, outputs, self._keys(), mask)
            self._stats_cpu.inc(int((time.thread_time() - started) * 1e6))
        return batch, outputs, reductions, (rows, cols), time.perf_counter()

    def _keys(self):
        return [(hook, layer) for hook in self._config.hooks for layer in self._config.layers]

    def _collect(self, pending) -> ExtractedBatch:
        batch, outputs, reductions, (rows, cols), dispatched = pending
        keys = self._keys()
        activations = {key: to_storage(values, self._config.storage_dtype)[0]
                       for key, values in self._handle.handler.fetch(outputs, keys, rows, cols).items()}
        if self._started is None:
            self._started = dispatched
            self._compile.update(int((time.perf_counter() - dispatched) * 1000))
        self._batches.inc()
        self._tokens.inc(int(rows.size))
        self._done_tokens += int(rows.size)
        extracted = {
            "batch_id": batch["batch_id"],
            "samples": batch["samples"],
            "placements": batch["placements"],
            "activations": activations,
        }
        if "predictions" in batch:
            extracted["predictions"] = batch["predictions"]
        if reductions is not None:
            started = time.thread_time()
            extracted["statistics"] = self._handle.handler.fetch_statistics(reductions, keys, rows, cols)
            self._stats_cpu.inc(int((time.thread_time() - started) * 1e6))
        return extracted

    def _report(self, total_tokens):
        interval = self._config.progress_interval
        now = time.perf_counter()
        if not interval or now - self._last_report < interval or self._started is None:
            return
        self._last_report = now
        elapsed = max(now - self._started, 1e-9)
        rate = self._done_tokens / elapsed
        line = f"extract: {self._done_tokens:,} tokens, {rate:,.0f} tok/s"
        if total_tokens:
            left = max(total_tokens - self._done_tokens, 0)
            line += f", {100 * self._done_tokens / total_tokens:.1f}% of {total_tokens:,}"
            if rate > 0:
                line += f", ETA {time.strftime('%H:%M:%S', time.gmtime(left / rate))}"
        _LOG.warning(line)

    def process(self, batch, total_tokens=None):
        previous, self._pending = self._pending, self._dispatch(batch)
        if previous is not None:
            yield self._collect(previous)
        self._report(total_tokens)

    def finish_bundle(self):
        if self._pending is not None:
            pending, self._pending = self._pending, None
            yield window.GlobalWindows.windowed_value(self._collect(pending))
