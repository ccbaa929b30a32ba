"""Runs the measurement paths case by case, model by model, and hands the results to the report.

Per geometry: (c) the baseline builds random weights and saves them as the checkpoint the others load, (a) ours
loads it, then (b) the pipeline loads it; each framework holds the weights once at a time. A path that fails on one
case is recorded and the run goes on."""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.bench import accelerator, report
from pipeline.bench.baseline import (TorchDevice, baseline_copy_and_write, baseline_forward, build_reference_model,
                                     choose_baseline_device)
from pipeline.bench.end_to_end import release_pipeline_model, run_pipeline
from pipeline.bench.inputs import capped_batches, disk_write_bandwidth, token_batches
from pipeline.bench.ours import agreement, ours_copy, ours_forward
from pipeline.bench.settings import HOOK, BenchError, Settings, batch_size_for, parse_settings
from pipeline.bench.timing import timed
from pipeline.bench.weights import Weights, checkpoint_weights, random_weights, seeded_weights


@dataclasses.dataclass
class Run:
    """What every path of one bench run shares."""
    settings: Settings
    work: Path
    dtype: str
    mesh: Any
    peak_tflops: Optional[float]
    baseline_device: Optional[str]
    results: dict

    def attempt(self, where: dict, path: str, function: Callable, *args):
        """function(*args), or None when it failed: the failure (an out-of-memory on a big case, say) is printed
        with its traceback and recorded under the case and in the results' errors, and the run goes on; main()
        then exits non-zero."""
        try:
            return function(*args)
        except Exception as err:  # recorded, printed and reflected in the exit code, never swallowed
            import traceback

            traceback.print_exc()
            message = f"{type(err).__name__}: {err}"
            self.results["errors"].append({**where, "path": path, "error": message})
            print(f"  ERROR in {path} of {where}: {message}", file=sys.stderr, flush=True)
            return None


class BatchCache:
    """Token batches per (batch size, length), made once and shared by every path and case of one geometry."""

    def __init__(self, settings: Settings):
        self._count = 1 + settings.warmup + settings.steps
        self._seed = settings.seed
        self._made: dict = {}

    def __call__(self, key: tuple[int, int]):
        if key not in self._made:
            self._made[key] = token_batches(self._count, *key, self._seed)
        return self._made[key]

    def clear(self):
        self._made.clear()


def _entries(run: Run, model_name: str, config) -> dict:
    """One result entry per case and length of this geometry, cheaper cases first, so that the process-wide
    device memory peak read after a case is mostly its own."""
    cases = sorted((c for c in run.settings.cases if c.model == model_name), key=lambda c: c.layers_mode != "one")
    entries = {}
    for case in cases:
        layers = case.layers(config.num_hidden_layers)
        for length in run.settings.lengths:
            batch_size = batch_size_for(run.settings, model_name, length)
            entries[(case, length)] = {
                "case": case.name, "model": model_name, "layers_mode": case.layers_mode,
                "layers": list(layers), "length": length, "batch_size": batch_size,
                "tokens_per_batch": batch_size * length, "dtype": run.dtype,
                "flops_per_token_forward": accelerator.flops_per_token(config, length, config.num_hidden_layers),
                "flops_per_token_capture": accelerator.flops_per_token(config, length, max(layers) + 1),
                "ours": None, "baseline": None, "pipeline": None, "agreement": None,
            }
    return entries


def _forward_and_copy(run: Run, entries: dict, batches: BatchCache, path: str, forward: Callable,
                      copy: Callable, report_line: Callable) -> None:
    """entry[path] = the path's forward of the entry's batch shape (measured once per shape: the cases sharing
    a shape differ only in what is copied) merged with copy(case, length, entry, batches)."""
    forwards: dict = {}

    def one_case(case, length, entry):
        key = (entry["batch_size"], length)
        if key not in forwards:
            forwards[key] = forward(batches(key))
        return {**forwards[key], **copy(case, length, entry, batches(key))}

    for (case, length), entry in entries.items():
        entry[path] = run.attempt({"case": entry["case"], "length": length}, path, one_case, case, length, entry)
        report_line(entry, length)


def _measure_baseline(run: Run, model_name: str, config, entries: dict, batches: BatchCache,
                      reference_rows: dict) -> Optional[Weights]:
    """(c) on every case; returns the weights it hands to the other paths, or None when it could not."""
    settings = run.settings
    print(f"[{model_name}] transformers baseline on {run.baseline_device} ({run.dtype})", flush=True)
    device = TorchDevice(run.baseline_device)

    def build():
        reference = build_reference_model(config, run.dtype, run.baseline_device, settings.seed)
        if settings.seeded_weights:
            return reference, seeded_weights(reference, model_name, config, run.dtype, settings.seed)
        return reference, checkpoint_weights(reference, run.work / f"checkpoint-{model_name}", settings.seed)

    built = run.attempt({"model": model_name}, "baseline model", build)
    if not built:
        return None
    reference, weights = built
    del built

    def copy(case, length, entry, data):
        write_batches = capped_batches(settings.steps, config, len(entry["layers"]), run.dtype,
                                       entry["tokens_per_batch"], settings.max_output_bytes)
        out_dir = run.work / "baseline-output"
        try:
            result = baseline_copy_and_write(reference, device, data, settings.warmup, entry["layers"],
                                             write_batches, out_dir, weights.source, run.dtype)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        reference_rows[(case, length)] = result.pop("_first_rows")
        return {**result, "device": run.baseline_device}

    def report_line(entry, length):
        b = entry["baseline"]
        if b:
            print(f"  {entry['case']} L={length}: forward {report.si(b['forward_tok_s'])} tok/s, "
                  f"+copy {report.si(b['copy_tok_s'])}, +write {report.si(b['write_tok_s'])}", flush=True)
        else:
            device.empty_cache()

    _forward_and_copy(run, entries, batches, "baseline",
                      lambda data: baseline_forward(reference, device, data, settings.warmup), copy, report_line)
    reference = None  # the closures above hold it: let the weights go before ours loads
    gc.collect()
    device.empty_cache()
    return weights


def _measure_ours(run: Run, model_name: str, weights: Weights, config, entries: dict, batches: BatchCache,
                  reference_rows: dict):
    """(a) on every case, checked against the baseline's first rows where the baseline ran. Returns the model
    (None when it could not load)."""
    settings = run.settings
    print(f"[{model_name}] ours: {weights.source!r}, dtype={run.dtype}", flush=True)
    ours, load_s = timed(lambda: run.attempt({"model": model_name}, "ours load_model", weights.load, run.dtype,
                                             run.mesh, settings.attention))
    if ours is None:
        return None

    def copy(case, length, entry, data):
        trace = accelerator.profiled(settings.profile_dir, f"ours-{case.model}-{case.layers_mode}-{length}")
        result = ours_copy(ours, data, settings.warmup, entry["layers"], run.dtype, trace)
        rows = result.pop("_first_rows")
        if (case, length) in reference_rows:
            entry["agreement"] = agreement(rows, reference_rows.pop((case, length)), config.num_hidden_layers,
                                           run.dtype)
        return {**result, "load_s": load_s, "device_memory": accelerator.device_memory()}

    def report_line(entry, length):
        o, agreed = entry["ours"], entry["agreement"]
        if agreed and not agreed["ok"]:
            print(f"  WARNING: ours and transformers disagree on {entry['case']} L={length} "
                  f"(max relative error {agreed['max_relative_error']:.3g} > {agreed['tolerance']}): they did "
                  "not run the same model, so the ratios of this case compare different things", flush=True)
        if o:
            o["forward_mfu"] = accelerator.mfu(o["forward_tok_s"], entry["flops_per_token_forward"],
                                               run.peak_tflops)
            o["copy_mfu"] = accelerator.mfu(o["copy_tok_s"], entry["flops_per_token_capture"], run.peak_tflops)
            print(f"  {entry['case']} L={length}: forward {report.si(o['forward_tok_s'])} tok/s, "
                  f"+copy {report.si(o['copy_tok_s'])}, compile {o['compile_s']:.1f} s", flush=True)

    _forward_and_copy(run, entries, batches, "ours",
                      lambda data: ours_forward(ours, data, settings.warmup), copy, report_line)
    return ours


def _pipeline_case(run: Run, weights: Weights, ours, config, case, length: int, entry: dict, tokenizer) -> dict:
    settings = run.settings
    num_batches = max(2, capped_batches(settings.pipeline_steps, config, len(entry["layers"]), run.dtype,
                                        entry["tokens_per_batch"], settings.max_output_bytes))
    print(f"[{case.model}] pipeline {entry['case']} L={length}: {num_batches} batches", flush=True)
    with weights.pipeline_context(ours):
        result = run_pipeline(weights.source, entry["layers"], length, entry["batch_size"], num_batches, run.dtype,
                              settings.attention, tokenizer, run.work, settings.seed,
                              accelerator.profiled(settings.profile_dir,
                                                   f"pipeline-{case.model}-{case.layers_mode}-{length}"),
                              settings.model_parallelism)
    result["mfu"] = accelerator.mfu(result["tok_s"], entry["flops_per_token_capture"], run.peak_tflops)
    result["bytes_per_value"] = (
        result["activation_bytes"] / (result["tokens"] * len(entry["layers"]) * config.hidden_size)
        if result["tokens"] else None)
    result["device_memory"] = accelerator.device_memory()
    return result


def _measure_pipeline(run: Run, weights: Weights, ours, config, entries: dict, tokenizer) -> None:
    """(b) on every case, one `pipeline.run.main` each, the model released in between."""
    for (case, length), entry in entries.items():
        entry["pipeline"] = run.attempt({"case": entry["case"], "length": length}, "pipeline", _pipeline_case,
                                        run, weights, ours, config, case, length, entry, tokenizer)
        r = entry["pipeline"]
        if r:
            print(f"  pipeline: {report.si(r['tok_s'])} tok/s ({r['rate_basis']}), "
                  f"{report.si(r['bytes_per_s'], 'B')}/s, end to end {report.si(r['end_to_end_tok_s'])} tok/s",
                  flush=True)
        release_pipeline_model()


def _measure_geometry(run: Run, model_name: str, tokenizer) -> None:
    from model.config import QWEN25_GEOMETRIES

    settings = run.settings
    config = QWEN25_GEOMETRIES[model_name]
    entries = _entries(run, model_name, config)
    batches = BatchCache(settings)
    weights = random_weights(model_name, settings.seed)
    reference_rows: dict = {}
    if run.baseline_device:
        weights = _measure_baseline(run, model_name, config, entries, batches, reference_rows) or weights
    ours = _measure_ours(run, model_name, weights, config, entries, batches, reference_rows)
    batches.clear()
    if not weights.in_memory:
        ours = None  # the pipeline loads its own copy: ours must not hold the device beside it
    weights.host_params = None
    accelerator.free_jax_memory()
    if not settings.skip_pipeline:
        _measure_pipeline(run, weights, ours, config, entries, tokenizer)
    ours = None
    accelerator.free_jax_memory()
    shutil.rmtree(run.work / f"checkpoint-{model_name}", ignore_errors=True)
    for entry in entries.values():
        entry["weights"] = weights.description
        entry["ratios"] = report.case_ratios(entry, run.results["disk"])
        run.results["cases"].append(entry)


def _start(settings: Settings, argv: list[str], work: Path) -> Run:
    """The run's shared state and the results skeleton: device, software, settings, what is skipped and why."""
    # Torch and JAX share the device in this process: JAX must not grab most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if settings.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    device = jax.devices()[0]
    dtype = settings.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    device_peak = settings.peak_tflops or accelerator.default_peak_tflops(device.device_kind, device.platform, dtype)
    peak_tflops = device_peak * jax.device_count() if device_peak else None
    from model.handler import local_mesh

    mesh = local_mesh(settings.model_parallelism)  # the extractor's mesh on this host
    skipped: list[str] = []
    baseline_device = None
    if settings.skip_baseline:
        skipped.append("baseline: --skip_baseline")
    elif settings.cases:
        baseline_device, reason = choose_baseline_device(settings.baseline_device, device.platform)
        if reason:
            skipped.append(f"baseline: {reason}")
    if settings.skip_pipeline:
        skipped.append("pipeline: --skip_pipeline")
    if peak_tflops is None and settings.cases:
        skipped.append(f"MFU: no peak rate known for {device.device_kind} in {dtype}; pass --peak_tflops")
    results: dict[str, Any] = {
        "schema": 1, "command": ["python", "-m", "pipeline.bench", *argv], "started": report.utc_now(),
        "smoke": settings.smoke, "device": accelerator.device_description(baseline_device),
        "software": report.software(), "git_commit": report.git_commit(),
        "settings": {"dtype": dtype, "peak_tflops": peak_tflops, "peak_tflops_per_device": device_peak,
                     "mesh": dict(mesh.shape) if mesh is not None else None,
                     "steps": settings.steps, "warmup": settings.warmup,
                     "pipeline_steps": settings.pipeline_steps, "lengths": settings.lengths,
                     "cases": [c.name for c in settings.cases], "hook": HOOK, "seed": settings.seed,
                     "attention": settings.attention, "max_output_bytes": settings.max_output_bytes,
                     "profile_dir": str(settings.profile_dir) if settings.profile_dir else None,
                     "profile": settings.profile, "weights": "seeded" if settings.seeded_weights else "checkpoint"},
        "disk": None, "cases": [], "targets": [], "skipped": skipped, "errors": [],
    }
    return Run(settings, work, dtype, mesh, peak_tflops, baseline_device, results)


def run_bench(settings: Settings, argv: list[str]) -> dict:
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    own_work = settings.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench-work-", dir=settings.output_dir)) if own_work else settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    run = _start(settings, argv, work)
    results = run.results
    try:
        if settings.skip_disk:
            results["skipped"].append("disk bandwidth: --skip_disk")
        else:
            results["disk"] = disk_write_bandwidth(work, settings.disk_test_bytes)
            print(f"disk: {report.si(results['disk']['bytes_per_s'], 'B')}/s sequential write into {work}",
                  flush=True)
        if settings.cases:
            from model.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
            for model_name in dict.fromkeys(c.model for c in settings.cases):
                _measure_geometry(run, model_name, tokenizer)
        if settings.host_ceiling is not None:
            from pipeline.bench.host_ceiling import measure_host_ceiling

            results["host_ceiling"] = measure_host_ceiling(run)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    import jax

    results["targets"] = report.check_targets(results["cases"], jax.devices()[0].device_kind)
    results["finished"] = report.utc_now()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    try:
        results = run_bench(settings, argv)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = report.write_results(results, settings.output_dir, settings.smoke)
    print(report.format_table(results))
    print(f"results: {path}")
    return 1 if results["errors"] else 0
