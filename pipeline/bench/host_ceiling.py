"""`python -m pipeline.bench --host_ceiling`: how fast the host side of the pipeline can go, with no device at all.

The real pipeline runs (`pipeline.run.main` on the local runner: read, validate, expand, tokenize, pack, the real
`ExtractActivations` bookkeeping, the real shard writer), except that the model's forward is replaced by
`SyntheticActivations`: for each requested hook it returns a [batch, length, d_model] view of one fixed random
buffer, in the dtype the extractor asks for, already in host memory. Everything a GPU host does after the copy to
host (the gather of real tokens, the storage conversion, Beam's per-element work and coders, Parquet encoding,
sha256, the renames) is timed as it is; what the device would do (the forward and the device-to-host copy) costs
nothing. The rate it reaches is therefore the ceiling the host sets on any accelerator.

The swap sits at the one place the pipeline gets its model (`pipeline.bench.weights.serving`): it is replaced
for the duration of the run only, inside this process, and nothing in the product path knows of it.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.bench.end_to_end import release_pipeline_model, run_and_sync
from pipeline.bench.settings import HOOK
from pipeline.bench.weights import serving

MODES = ("one", "all")
# on: the statistics' passes over the values on the device (--statistics_on=device; here the source's tables,
# below), as on a GPU host; host: the shard writer's compiled pass; numpy: the writer's numpy pass; off: none.
STATISTICS_SETTINGS = ("on", "off", "host", "numpy")
# Rows per block of the source's precomputed statistics tables.
_TABLE_ROWS = 64
# Rows the views of successive layers and batches are shifted by, so that no two files hold the same bytes.
_SHIFT_ROWS = 61
_SHIFTS = 16


def add_flags(group) -> None:
    from pipeline.options import _positive_int, whole_number

    group.add_argument("--host_ceiling", action="store_true",
                       help="Run only the host-ceiling path: the real pipeline on real ARC prompts with the "
                            "model's forward replaced by a device-free source of activations (d_model of "
                            "--host_model, bf16), one layer and/or all layers (--layers), plus the disk test.")
    group.add_argument("--host_model", default=None,
                       help="Geometry whose activation shape the source produces (default qwen2.5-0.5b; "
                            "--smoke: tiny).")
    group.add_argument("--host_dataset", default="arc-agi-1",
                       help="Pipeline --dataset of the host-ceiling runs (arc-agi-1: train and eval).")
    group.add_argument("--host_augmentations", type=whole_number("host_augmentations", 0), default=0,
                       help="Pipeline --augmentations of the one-layer run (more input for a longer run).")
    for name, default, text in (
            ("host_batch_size", None, "--batch_size of the one-layer run (default 8; --smoke: 1)."),
            ("host_max_seq_len", 8192, "--max_seq_len of both runs."),
            ("host_all_layers_batch_size", 1, "--batch_size of the all-layer run (each batch is every layer's "
                                              "worth)."),
            ("host_all_layers_samples", None, "--max_samples of the all-layer run, which bounds the bytes it "
                                              "writes (default 40; --smoke: 4)."),
            ("host_writer_threads", None, "--writer_threads (default: the pipeline's own default).")):
        group.add_argument(f"--{name}", type=_positive_int(name), default=default, help="Pipeline " + text)
    group.add_argument("--host_writer_memory_gib", type=float, default=2.0,
                       help="Pipeline --writer_memory_gib: extracted batches that may wait for the writers.")
    group.add_argument("--host_statistics", default="on",
                       help="Per-shard statistics in the runs: on (their passes over the values on the device, "
                            "as a GPU host runs them: --statistics_on=device, served by the device-free source), "
                            "host (the shard writer's compiled pass), numpy (the writer's numpy pass), off, or a "
                            "list (off,on,host) to run each mode once per setting, alternately; off sets "
                            "ARC_ACTIVATIONS_STATISTICS=off for the run, to measure what the statistics cost.")
    group.add_argument("--host_repeats", type=_positive_int("host_repeats"), default=1,
                       help="Rounds of the runs of each mode (with --host_statistics=off,on the order of the "
                            "settings alternates between rounds); the summary takes medians.")
    group.add_argument("--host_warmup", type=int, default=0,
                       help="Runs of each mode made first and left out of the results and medians (the first "
                            "run in a process also pays the process's first allocations and imports).")
    group.add_argument("--host_cprofile", action="store_true",
                       help="Also profile each run with cProfile (the main thread, where Beam runs the DoFns) "
                            "and record the top functions; profiling slows the run, so take rates from a run "
                            "without it.")


@dataclasses.dataclass(frozen=True)
class HostSettings:
    model: str
    dataset: str
    modes: tuple[str, ...]
    augmentations: int
    batch_size: int
    max_seq_len: int
    all_layers_batch_size: int
    all_layers_samples: int
    one_layer_samples: Optional[int]
    writer_threads: Optional[int]
    writer_memory_gib: float
    cprofile: bool
    statistics: tuple[str, ...] = ("on",)
    repeats: int = 1
    warmup: int = 0


def host_settings(parser, args) -> Optional[HostSettings]:
    if not args.host_ceiling:
        return None
    from model.config import QWEN25_GEOMETRIES

    model = args.host_model or ("tiny" if args.smoke else "qwen2.5-0.5b")
    if model not in QWEN25_GEOMETRIES:
        parser.error(f"--host_model: unknown geometry {model!r}; choose among {', '.join(QWEN25_GEOMETRIES)}")
    modes = tuple(m.strip() for m in (args.layers or "one,all").split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--layers: {args.layers!r} is not a layer selection; use one, all or one,all")
    if args.host_warmup < 0:
        parser.error(f"--host_warmup must be 0 or more, got {args.host_warmup}")
    if args.host_writer_memory_gib <= 0:
        parser.error(f"--host_writer_memory_gib must be positive, got {args.host_writer_memory_gib}")
    statistics = tuple(v.strip() for v in args.host_statistics.split(",") if v.strip())
    if not statistics or any(v not in STATISTICS_SETTINGS for v in statistics):
        parser.error(f"--host_statistics: {args.host_statistics!r}: use on, off, host, numpy or a list such as "
                     "off,on")
    return HostSettings(
        model=model, dataset=args.host_dataset, modes=modes, augmentations=args.host_augmentations,
        batch_size=args.host_batch_size or (1 if args.smoke else 8), max_seq_len=args.host_max_seq_len,
        all_layers_batch_size=args.host_all_layers_batch_size,
        all_layers_samples=args.host_all_layers_samples or (4 if args.smoke else 40),
        one_layer_samples=4 if args.smoke else None, writer_threads=args.host_writer_threads,
        writer_memory_gib=args.host_writer_memory_gib, cprofile=args.host_cprofile, statistics=statistics,
        repeats=args.host_repeats, warmup=args.host_warmup)


class _HostArray(np.ndarray):
    """A numpy view that answers `copy_to_host_async` (as a jax.Array does) with nothing: it is on the host."""

    def copy_to_host_async(self):
        return None


class SyntheticActivations:
    """Stands in for `HookedQwen` inside the pipeline: `prepare`, `run` and `capture` have its signatures;
    `capture` returns, per requested hook, a view of a fixed random buffer of the real shape and dtype, and
    records when it was called."""

    def __init__(self, config, seed: int = 0):
        self.config = config
        self._seed = seed
        self._buffers: dict = {}
        self._tables: dict = {}
        self._starts: dict = {}  # output name -> first buffer row of its view in the last capture
        self.calls = 0
        self.token_positions = 0
        self.first_call: Optional[float] = None
        self.last_call: Optional[float] = None
        # CPU seconds of the whole process (every thread) and of the calling thread, at the first and last call.
        self.process_cpu_at_first: Optional[float] = None
        self.thread_cpu: list[float] = []

    def buffer(self, dtype: np.dtype, rows: int) -> np.ndarray:
        """The random values batches of `rows` token positions are cut from, made on first use, with the tables
        `reduce_statistics` answers from."""
        needed = rows + _SHIFT_ROWS * _SHIFTS * (self.config.num_hidden_layers + 1)
        buffer = self._buffers.get(dtype)
        if buffer is None or len(buffer) < needed:
            rng = np.random.default_rng(self._seed)
            values = rng.standard_normal((needed, self.config.hidden_size), dtype=np.float32)
            buffer = self._buffers[dtype] = values.astype(dtype)
            self._tables[dtype] = _StatisticsTables(buffer)
        return buffer

    def prepare(self, tokens, segment_ids, positions, spec, right_padded=None) -> tuple[tuple, dict]:
        """HookedQwen.prepare's signature (the extractor's model.handler calls it); nothing to place."""
        return (tokens, segment_ids, positions), {"spec": spec, "right_padded": right_padded}

    def run(self, args, statics) -> dict:
        return self.capture(*args, **statics)

    def capture(self, tokens, segment_ids, positions, spec, right_padded=None) -> dict:
        from model.dtypes import storage_numpy_dtype
        from model.hooks import hook_name

        if spec.logits or spec.final_norm:
            raise ValueError("SyntheticActivations produces block hooks only, not logits or the final norm")
        now = time.time()
        if self.first_call is None:
            self.first_call, self.process_cpu_at_first = now, time.process_time()
            self.thread_cpu = [time.thread_time()] * 2
        self.last_call = now
        self.thread_cpu[1] = time.thread_time()
        batch, length = np.shape(tokens)
        rows = batch * length
        buffer = self.buffer(storage_numpy_dtype(spec.out_dtype or "float32"), rows)
        out = {}
        for index, (hook, layer) in enumerate((h, l) for h in spec.hooks for l in spec.layers):
            start = _SHIFT_ROWS * ((self.calls + index) % _SHIFTS + _SHIFTS * layer)
            view = buffer[start:start + rows].reshape(batch, length, -1)
            out[hook_name(layer, hook)] = view.view(_HostArray)
            self._starts[hook_name(layer, hook)] = (buffer.dtype, start)
        self.calls += 1
        self.token_positions += rows
        return out


    def reduce_statistics(self, outputs: dict, mask: np.ndarray) -> dict:
        """HookedQwen.reduce_statistics' answer for the last capture's views at about what a device's reductions
        cost the host (nothing but the answer), from tables made before the clock starts (`_StatisticsTables`).
        Norms, extrema and counts are exact; the sums come from differences of float64 running sums, within
        `pipeline.stats`'s tolerance of a direct pass."""
        batch, length = mask.shape
        edges = np.flatnonzero(np.diff(np.concatenate([np.zeros((batch, 1), np.int8), mask.view(np.int8),
                                                       np.zeros((batch, 1), np.int8)], axis=1).ravel()))
        # Runs of real tokens as [first, last) offsets into the flattened batch: each row framed by a zero on
        # either side, a run starts and ends where the framed rows' values change.
        offsets = edges - 2 * (edges // (length + 2))
        runs = offsets[0::2], offsets[1::2]
        out = {}
        for name in outputs:
            dtype, start = self._starts[name]
            tables = self._tables[dtype]
            out[name] = tables.reduce(start + runs[0], start + runs[1])
            out[name]["row_sumsq"] = tables.row_sumsq[start:start + batch * length].reshape(batch, length)
        return out


class _StatisticsTables:
    """What `SyntheticActivations.reduce_statistics` answers from, for one buffer: per-row float64 sums of squares
    (numpy's order, as the device computes them), running sums of the values and of their squares, the values as
    float32, and minima and maxima of blocks of rows in a sparse table (any run of blocks in two lookups)."""

    def __init__(self, buffer: np.ndarray):
        from transforms.activation_stats import host_reductions

        rows, d = buffer.shape
        self.d = d
        self.values = buffer.astype(np.float32)
        self.row_sumsq = host_reductions(buffer)["row_sumsq"]
        wide = self.values.astype(np.float64)
        self.running = np.zeros((rows + 1, d))
        self.running_sq = np.zeros((rows + 1, d))
        np.cumsum(wide, axis=0, out=self.running[1:])
        np.cumsum(wide * wide, axis=0, out=self.running_sq[1:])
        del wide
        blocks = rows // _TABLE_ROWS
        shaped = self.values[:blocks * _TABLE_ROWS].reshape(blocks, _TABLE_ROWS, d)
        self.low, self.high = [shaped.min(1)], [shaped.max(1)]
        span = 1
        while 2 * span <= blocks:
            self.low.append(np.minimum(self.low[-1][:-span], self.low[-1][span:]))
            self.high.append(np.maximum(self.high[-1][:-span], self.high[-1][span:]))
            span *= 2

    def reduce(self, firsts: np.ndarray, lasts: np.ndarray) -> dict:
        """The reductions over the rows [first, last) of each run."""
        total = (self.running[lasts] - self.running[firsts]).sum(0)
        squares = (self.running_sq[lasts] - self.running_sq[firsts]).sum(0)
        low, high = np.full(self.d, np.inf, np.float32), np.full(self.d, -np.inf, np.float32)
        for first, last in zip(firsts.tolist(), lasts.tolist()):
            block_first = -(-first // _TABLE_ROWS)
            block_last = last // _TABLE_ROWS
            if block_last > block_first:
                level = (block_last - block_first).bit_length() - 1
                for table, into, pick in ((self.low, low, np.minimum), (self.high, high, np.maximum)):
                    pick(into, pick(table[level][block_first], table[level][block_last - (1 << level)]), out=into)
                pieces = ((first, block_first * _TABLE_ROWS), (block_last * _TABLE_ROWS, last))
            else:
                pieces = ((first, last),)
            for a, b in pieces:
                if b > a:
                    np.minimum(low, self.values[a:b].min(0), out=low)
                    np.maximum(high, self.values[a:b].max(0), out=high)
        return {"dim_sum": total, "dim_sumsq": squares, "dim_min": low.astype(np.float64),
                "dim_max": high.astype(np.float64), "dim_non_finite": np.zeros(self.d, np.int64)}


def _pipeline_argv(host: HostSettings, mode: str, output: Path, statistics_on: str = "device") -> list[str]:
    argv = ["--runner=DirectRunner", f"--model=random:{host.model}", f"--dataset={host.dataset}",
            f"--output={output}", f"--hooks={HOOK}", "--dtype=bfloat16", f"--max_seq_len={host.max_seq_len}",
            "--progress_interval=0", f"--writer_memory_gib={host.writer_memory_gib}",
            f"--statistics_on={statistics_on}"]
    if mode == "one":
        argv += ["--layers=" + str(_config(host).num_hidden_layers // 2), f"--batch_size={host.batch_size}",
                 f"--augmentations={host.augmentations}"]
        if host.one_layer_samples:
            argv.append(f"--max_samples={host.one_layer_samples}")
    else:
        argv += ["--layers=all", f"--batch_size={host.all_layers_batch_size}",
                 f"--max_samples={host.all_layers_samples}"]
    if host.writer_threads:
        argv.append(f"--writer_threads={host.writer_threads}")
    return argv


def _config(host: HostSettings):
    from model.config import QWEN25_GEOMETRIES

    return QWEN25_GEOMETRIES[host.model]


def _top_functions(profiler, path: Path, count: int = 25) -> list[str]:
    """Writes the profile to `path` (pstats format) and returns its top functions by own time."""
    import io
    import pstats

    profiler.dump_stats(str(path))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(count)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line.rstrip() for line in lines[start:] if line.strip()]


def _phases(started: float, source: SyntheticActivations, result: dict) -> dict:
    """Seconds of each phase of the run, from the source's first call and the shard commits (wall clock)."""
    ended = started + result["main_s"]
    first, last = result["first_commit"], result["last_commit"]
    return {
        "start_read_tokenize_pack": source.first_call - started,
        "first_batch_to_first_commit": first - source.first_call,
        "extract_and_write_first_to_last_commit": last - first,
        "manifest_and_teardown": ended - last,
        "flush_fsync_output": result["sync_s"],
    }


class CollectorClock:
    """CPU seconds and count of Python's garbage collections per generation while it is entered (gc.callbacks; a
    collection runs on the thread whose allocation set it off, so thread CPU time measures it), each with the
    wall time it ended. The statistics' counter does not see collections their allocations set off elsewhere;
    this does, for every setting."""

    def __init__(self):
        self.ended: list[tuple[float, int, float]] = []  # (time.time(), generation, CPU seconds)
        self._started = {}

    def _callback(self, phase: str, info: dict):
        if phase == "start":
            self._started[threading.get_ident()] = time.thread_time()
        else:
            started = self._started.pop(threading.get_ident(), None)
            if started is not None:
                self.ended.append((time.time(), info["generation"], time.thread_time() - started))

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self, since: float, process_s: float) -> dict:
        """The collections that ended after `since` (time.time()), against the process's CPU seconds then."""
        seconds, collections = [0.0, 0.0, 0.0], [0, 0, 0]
        for ended, generation, cpu in self.ended:
            if ended >= since:
                seconds[generation] += cpu
                collections[generation] += 1
        return {"gc_s": sum(seconds), "gc_full_s": seconds[2], "gc_collections": collections,
                "gc_share": sum(seconds) / process_s if process_s > 0 else None}


def measure_mode(run, host: HostSettings, mode: str, statistics_on: str = "device") -> dict:
    """One pipeline run of the host ceiling (`mode` one or all layers) with its rates, phases and targets;
    `statistics_on` is the pipeline's --statistics_on."""
    config = _config(host)
    output = run.work / f"host-ceiling-{mode}"
    shutil.rmtree(output, ignore_errors=True)
    source = SyntheticActivations(config, run.settings.seed)
    argv = _pipeline_argv(host, mode, output, statistics_on)
    import cProfile

    from model.dtypes import storage_numpy_dtype

    # Made before the clock starts, so that no phase of the run counts the random draws.
    source.buffer(storage_numpy_dtype("bfloat16"),
                  host.max_seq_len * (host.batch_size if mode == "one" else host.all_layers_batch_size))

    profiler = cProfile.Profile() if host.cprofile else None
    print(f"[host ceiling] {mode} layer{'s' if mode == 'all' else ''}: python -m pipeline.run {' '.join(argv)}",
          flush=True)
    started = time.time()
    try:
        with serving(source), CollectorClock() as collector:
            result = run_and_sync(argv, output, profiler)
        result["cpu"] = _cpu(source, result, time.process_time())
        result["cpu"].update(_statistics_cpu(output, result["cpu"]["process_s"]))
        result["cpu"].update(collector.summary(source.first_call, result["cpu"]["process_s"]))
    finally:
        release_pipeline_model()
        shutil.rmtree(output, ignore_errors=True)
    layers = config.num_hidden_layers if mode == "all" else 1
    result.update({
        "mode": mode, "layers": layers, "d_model": config.hidden_size, "source_calls": source.calls,
        "source_token_positions": source.token_positions, "phases_s": _phases(started, source, result),
        "bytes_per_value": (result["activation_bytes"] / (result["tokens"] * layers * config.hidden_size)
                            if result["tokens"] else None),
        "cpu_count": os.cpu_count(),
    })
    if profiler is not None:
        path = run.settings.output_dir / f"host-ceiling-{mode}.pstats"
        result["cprofile"] = {"path": str(path), "top_by_own_time": _top_functions(profiler, path)}
    result.update(_verdict(mode, result, run.results.get("disk")))
    return result


# One layer: durable tok/s; all layers: the share of the disk's bandwidth. See docs/benchmarks.md.
ONE_LAYER_TARGET_TOK_S = 400_000
ALL_LAYERS_TARGET_DISK_SHARE = 0.7
ARITHMETIC_CORES = 16


def _cpu(source: SyntheticActivations, result: dict, process_cpu_now: float) -> dict:
    """CPU seconds behind the extract-and-write part of the run: the whole process's (every thread) from the
    first batch to the end of the flush, and the Beam thread's between the first and last batch (the serial part,
    which more cores do not shorten). Rates per CPU second stand for what one core does on a machine whose other
    jobs take the rest."""
    process_s = process_cpu_now - source.process_cpu_at_first
    thread_s = source.thread_cpu[1] - source.thread_cpu[0]
    between = result["tokens"] * (source.calls - 1) / max(source.calls, 1)
    return {"process_s": process_s, "beam_thread_s": thread_s,
            "tok_per_process_cpu_s": result["tokens"] / process_s if process_s > 0 else None,
            "tok_per_beam_thread_cpu_s": between / thread_s if thread_s > 0 else None}


def _statistics_cpu(output: Path, process_s: float) -> dict:
    """The CPU seconds the run's statistics took on the host (the pipeline's statistics_cpu_us counter, from its
    run record), and their share of the process's CPU."""
    import json

    from transforms.output_format import RUNS_DIR
    from transforms.metrics import STATISTICS_CPU_COUNTER

    micros = sum(json.loads(path.read_text()).get("run_counters", {}).get(STATISTICS_CPU_COUNTER, 0)
                 for path in (output / RUNS_DIR).glob("*.json"))
    return {"statistics_s": micros / 1e6, "statistics_share": micros / 1e6 / process_s if process_s > 0 else None}


def _verdict(mode: str, result: dict, disk: Optional[dict]) -> dict:
    per_core = result["cpu"]["tok_per_process_cpu_s"]
    serial = result["cpu"]["tok_per_beam_thread_cpu_s"]
    arithmetic = per_core * ARITHMETIC_CORES if per_core else None
    if arithmetic and serial:
        arithmetic = min(arithmetic, serial)
    out = {"per_core_tok_s": per_core, "arithmetic_16_cores_tok_s": arithmetic,
           "vs_disk": result["bytes_per_s"] / disk["bytes_per_s"] if disk and result["bytes_per_s"] else None}
    if mode == "one":
        out["target"] = f"durable tok/s >= {ONE_LAYER_TARGET_TOK_S}"
        out["passed"] = None if not result["tok_s"] else result["tok_s"] >= ONE_LAYER_TARGET_TOK_S
    else:
        out["target"] = f"durable bytes/s >= {ALL_LAYERS_TARGET_DISK_SHARE} x the disk's"
        out["passed"] = None if out["vs_disk"] is None else out["vs_disk"] >= ALL_LAYERS_TARGET_DISK_SHARE
    return out


def _with_statistics(setting: str, function, *args):
    """function(*args, statistics_on=...) with the statistics `setting` (STATISTICS_SETTINGS), the environment
    restored afterwards."""
    from transforms.stats_kernel import KERNEL_ENV
    from transforms.write import STATISTICS_ENV

    values = {STATISTICS_ENV: "off" if setting == "off" else "on", KERNEL_ENV: "numpy" if setting == "numpy" else ""}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        result = function(*args, statistics_on="device" if setting == "on" else "host")
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if result is not None:
        result["statistics"] = setting
    return result


def _statistics_summary(runs: dict) -> dict:
    """Per mode and statistics setting: medians of the durable rate and of tokens per process CPU second, and
    the ratio of "on" to "off" (what the statistics leave of the rate)."""
    import statistics as st

    summary = {}
    for run in (r for r in runs.values() if r):
        entry = summary.setdefault(run["mode"], {}).setdefault(
            run["statistics"], {"tok_s": [], "per_core": [], "statistics_share": []})
        entry["tok_s"].append(run["tok_s"])
        entry["per_core"].append(run["per_core_tok_s"])
        entry["statistics_share"].append(run["cpu"].get("statistics_share") or 0.0)
    for settings in summary.values():
        for entry in settings.values():
            entry["median_tok_s"], entry["median_per_core"] = st.median(entry["tok_s"]), st.median(entry["per_core"])
        for on in ("on", "host", "numpy"):
            if {on, "off"} <= set(settings):
                settings[f"rate_{on}_vs_off"] = settings[on]["median_tok_s"] / settings["off"]["median_tok_s"]
                settings[f"per_core_{on}_vs_off"] = (settings[on]["median_per_core"]
                                                     / settings["off"]["median_per_core"])
    return summary


def measure_host_ceiling(run) -> dict:
    host: HostSettings = run.settings.host_ceiling
    runs = {}
    plain = host.statistics == ("on",) and host.repeats == 1
    for mode in host.modes:
        for warmup in range(host.warmup):
            run.attempt({"host_ceiling": f"{mode} warm-up #{warmup + 1}"}, "host ceiling warm-up", _with_statistics,
                        host.statistics[warmup % len(host.statistics)], measure_mode, run, host, mode)
        for round_ in range(host.repeats):
            for setting in (host.statistics if round_ % 2 == 0 else host.statistics[::-1]):
                key = mode if plain else f"{mode} stats={setting} #{round_ + 1}"
                runs[key] = run.attempt({"host_ceiling": key}, "host ceiling", _with_statistics, setting,
                                        measure_mode, run, host, mode)
    return {"settings": dataclasses.asdict(host), "runs": runs, "statistics": _statistics_summary(runs),
            "source": "SyntheticActivations: views of one fixed random buffer (seeded), no device"}


def format_host_ceiling(ceiling: dict) -> list[str]:
    from statistics import median as st_median

    from pipeline.bench.report import aligned, si

    headers = ("host ceiling", "tokens", "shards", "durable tok/s", "durable B/s", "% disk", "B/value",
               "per core", "16-core arith.", "target")
    rows = []
    for key, r in ceiling["runs"].items():
        if not r:
            continue
        verdict = "not measured" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        rows.append((key.replace(r["mode"], f"{r['mode']} layer{'s' if r['mode'] == 'all' else ''}", 1), si(r["tokens"]), str(r["shards"]),
                     si(r["tok_s"]), si(r["bytes_per_s"], "B"),
                     "-" if r["vs_disk"] is None else f"{100 * r['vs_disk']:.1f}%",
                     "-" if r["bytes_per_value"] is None else f"{r['bytes_per_value']:.3f}",
                     si(r["per_core_tok_s"]), si(r["arithmetic_16_cores_tok_s"]), f"{verdict} ({r['target']})"))
    lines = aligned(headers, rows)
    for mode, settings in ceiling.get("statistics", {}).items():
        for setting, entry in settings.items():
            if isinstance(entry, dict) and entry.get("statistics_share"):
                lines.append(f"host ceiling {mode}: statistics {setting}: "
                             f"{100 * st_median(entry['statistics_share']):.2f}% of the process's CPU (median)")
        for on in ("on", "host", "numpy"):
            if f"rate_{on}_vs_off" in settings:
                lines.append(f"host ceiling {mode}: statistics {on} / off: durable rate "
                             f"x{settings[f'rate_{on}_vs_off']:.3f}, tokens per process CPU second "
                             f"x{settings[f'per_core_{on}_vs_off']:.3f} (medians)")
    for mode, r in ceiling["runs"].items():
        if r:
            phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["phases_s"].items())
            lines.append(f"host ceiling {mode}: {phases}")
            cpu = r["cpu"]
            lines.append(f"host ceiling {mode}: CPU {cpu['process_s']:.1f} s in the process, "
                         f"{cpu['beam_thread_s']:.1f} s in the Beam thread "
                         f"({si(cpu['tok_per_beam_thread_cpu_s'])} tok per CPU second there), "
                         f"{cpu.get('statistics_s', 0):.2f} s in the statistics "
                         f"({100 * (cpu.get('statistics_share') or 0):.1f}% of the process's), "
                         f"{cpu.get('gc_s', 0):.2f} s in garbage collections ({cpu.get('gc_full_s', 0):.2f} s in "
                         f"{(cpu.get('gc_collections') or [0, 0, 0])[2]} full ones)")
    lines.append("host ceiling: durable = tokens of shards after the first over first-to-last commit plus the "
                 "fsync of the output; per core = tokens per CPU second of the process from the first batch to the "
                 "flush; 16-core arith. = per core x 16, at most the Beam thread's tokens per CPU second "
                 "(arithmetic, not measured).")
    return lines
