"""`python -m pipeline.run`: options -> Beam graph -> per-layer Parquet shards, a manifest and a summary.

Graph: read -> [host share] -> validate (dead letter) -> expand samples -> [first --max_samples] -> [resume filter]
-> format + tokenize (dead letter) -> fixed-shape batches -> extract (JAX Qwen, one model per worker process;
with --generate each batch's prompts are first continued by the model) -> write shards (and predictions). The
local runner runs it in waves of the input, each as a front (read -> tokenize) and a back (batch -> write)
pipeline (pipeline/waves.py), so its memory does not grow with the input.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import identity as identity_lib
from pipeline.beam_compat import flag_parser, local_runner
from pipeline.options import ExtractOptions, OptionError, storage_dtype
from pipeline.storage import use_storage_emulator_if_configured

_LOG = logging.getLogger("pipeline.run")

LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")


def worker_prefix(opts: ExtractOptions) -> str:
    return f"h{opts.host_index:03d}"


def resolve_capture(opts: ExtractOptions):
    """Hooks and layers checked against the model's config before any worker starts."""
    from model import load_config
    from model.hooks import parse_hooks, parse_layers

    config = load_config(opts.model)
    hooks = parse_hooks(opts.hooks)
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    return config, hooks, layers


def check_memory(options: PipelineOptions, opts: ExtractOptions, config, hooks, layers,
                 max_new_tokens: int | None = None) -> None:
    """The largest bucket against this host's device memory, before any data is read, with --generate's KV
    cache when `max_new_tokens` (the resolved answer budget) is given. Local runners only: a launcher's memory says
    nothing of a Dataflow worker's."""
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return
    from model.dtypes import transfer_dtype
    from model.memory import check_run_memory

    check_run_memory(config, hooks, layers, batch_size=opts.batch_size, max_seq_len=opts.max_seq_len,
                     dtype=opts.dtype, out_dtype=transfer_dtype(opts.dtype, storage_dtype(opts)),
                     attention=opts.attention, model_parallelism=opts.model_parallelism,
                     max_new_tokens=max_new_tokens)


def checked_grid_encoder(opts: ExtractOptions):
    """The encoder --grid_encoder names, or one OptionError line."""
    from transforms.grid_encoders import create_grid_encoder

    try:
        return create_grid_encoder(opts.grid_encoder)
    except ValueError as err:
        raise OptionError(f"--grid_encoder: {err}") from None


def resolve_inputs(opts: ExtractOptions):
    """The dataset, grid encoder and prompt version, checked before any graph is built, so a mistake is one clear
    line rather than a traceback from inside a transform."""
    from transforms.datasets import DatasetUnavailableError, resolve_dataset
    from transforms.prompts import PROMPT_VERSIONS

    if opts.prompt_version not in PROMPT_VERSIONS:
        raise OptionError(f"--prompt_version={opts.prompt_version!r} is not one of {', '.join(PROMPT_VERSIONS)}")
    checked_grid_encoder(opts)
    try:
        return resolve_dataset(opts.dataset)
    except DatasetUnavailableError as err:
        raise OptionError(str(err)) from None


def resolve_max_new_tokens(opts: ExtractOptions) -> int | None:
    """--generate's answer budget: --max_new_tokens, or enough for a 30x30 answer grid in the grid encoder plus
    margin (model/generate.py); None without --generate. Checked against --max_seq_len here, before any data
    and before the memory check, which counts the KV cache it sizes."""
    if not opts.generate:
        return None
    budget = opts.max_new_tokens
    if budget is None:
        from model.generate import default_max_new_tokens
        from transforms.tokenize import cached_tokenizer

        budget = default_max_new_tokens(cached_tokenizer(opts.model), checked_grid_encoder(opts))
    if budget >= opts.max_seq_len:
        raise OptionError(
            f"--generate: the default answer budget of {budget} tokens (a 30x30 grid in --grid_encoder="
            f"{opts.grid_encoder}) leaves no room for a prompt in --max_seq_len={opts.max_seq_len}: raise "
            "--max_seq_len or pass a smaller --max_new_tokens.")
    return budget


def check_resume_matches(opts: ExtractOptions, shards: dict, hooks, layers) -> None:
    """A resumed run must write what the committed shards hold: one format, dtypes, hooks and layers per output
    (a dataset of mixed column types cannot be read as one table)."""
    from transforms.output_format import FORMAT_VERSION, KEY_FORMAT_VERSION, KEY_STORAGE_DTYPE

    want = {KEY_FORMAT_VERSION: str(FORMAT_VERSION), KEY_STORAGE_DTYPE: storage_dtype(opts), "dtype": opts.dtype}
    flags = {KEY_FORMAT_VERSION: "the writer's format version", KEY_STORAGE_DTYPE: "--activation_dtype",
             "dtype": "--dtype"}
    captures = {(str(hook), int(layer)) for hook in hooks for layer in layers}
    for shard in sorted(shards):
        metadata = shards[shard]
        where = f"{opts.output.rstrip('/')}/{metadata['path']}"
        for key, value in want.items():
            if metadata.get(key) != value:
                raise OptionError(
                    f"--resume: {where} was written with {key}={metadata.get(key)!r} but this run would write "
                    f"{key}={value!r}: pass the earlier run's {flags[key]} (its options are in "
                    f"{opts.output.rstrip('/')}/_runs/), or write to a new --output.")
        held = {(f["hook"], int(f["layer"])) for f in metadata["files"]}
        if held != captures:
            raise OptionError(
                f"--resume: {where} holds hooks and layers {sorted(held)} but this run captures "
                f"{sorted(captures)}: pass the earlier run's --hooks and --layers, or write to a new --output.")


def check_output_location(opts: ExtractOptions) -> None:
    """Refuses an --output that cannot hold a dataset before any model is loaded or data read; creates nothing."""
    if opts.output.startswith("gs://"):
        return  # taking the lease is the first write: it fails with the bucket's own error
    path = os.path.abspath(os.path.expanduser(opts.output))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"--output={opts.output}: {path} is a file, not a directory: choose a directory (new or "
                          "holding an earlier run of this pipeline).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"--output={opts.output}: cannot write in {existing} (not a writable directory): fix its "
                          "permissions, or choose another --output.")


def check_identity_file(opts: ExtractOptions, identity: dict, has_commits: bool) -> None:
    """OUTPUT/_identity.json is written once, by the first run; every later run (any host) must match it. A
    differing one is replaced only when nothing was committed under it and no other host holds a lease."""
    from pipeline.lease import exclusive_store, live_leases

    path = f"{opts.output.rstrip('/')}/{identity_lib.IDENTITY_FILE}"
    store = exclusive_store(path)
    data = identity_lib.encode(identity).encode()
    if store.create(data):
        return
    recorded, token = store.read()
    recorded = identity_lib.decode(recorded.decode()) if recorded else None
    message = identity_lib.mismatch_message(path, recorded or {}, identity)
    if message is None:
        return
    others = {share: holder for share, holder in live_leases(opts.output).items() if share != worker_prefix(opts)}
    if has_commits or others:
        raise OptionError(message if has_commits else
                          f"{message} (hosts {', '.join(sorted(others))} are running with it now)")
    _LOG.warning("replacing %s: no shard was committed under it and no other host is running", path)
    store.replace(data, token)


def prepare_output(opts: ExtractOptions, hooks=(), layers=(), identity: dict | None = None) -> set[str]:
    """Checks the output root (under this host's lease); with --resume returns the committed sample ids and
    removes this host's uncommitted files, without it refuses to mix two runs in one output."""
    from transforms.output_format import KEY_IDENTITY
    from transforms.write import clean_uncommitted, committed_sample_ids, committed_shards, remove_dead_letters

    prefix = worker_prefix(opts)
    done = committed_sample_ids(opts.output)
    if done and not opts.resume:
        raise OptionError(
            f"--output={opts.output} already holds {len(done):,} committed samples from an earlier run: pass "
            "--resume to complete that run, or choose a new --output.")
    shards = committed_shards(opts.output) if done else {}
    if identity is not None:
        legacy = {shard: meta for shard, meta in shards.items() if not meta.get(KEY_IDENTITY)}
        for recorded, names in identity_lib.group_by_identity(shards).items():
            if recorded is not None:
                message = identity_lib.mismatch_message(
                    f"{opts.output.rstrip('/')}/samples/{names[0]}.parquet (and {len(names) - 1} more)",
                    identity_lib.decode(recorded), identity)
                if message:
                    raise OptionError(f"--resume: {message}")
        if legacy:
            _LOG.warning("%d committed shards predate run identities: only their format, dtypes, hooks and layers "
                         "can be checked", len(legacy))
            check_resume_matches(opts, legacy, hooks, layers)
        check_identity_file(opts, identity, bool(shards))
    elif shards:
        check_resume_matches(opts, shards, hooks, layers)
    # This host's files without a commit marker are from a killed attempt: never part of the output.
    removed = clean_uncommitted(opts.output, prefix)
    if removed:
        _LOG.warning("removed %d uncommitted files of host %s left by an earlier attempt", len(removed), prefix)
    if opts.resume:
        _LOG.warning("resume: %d samples already committed under %s", len(done), opts.output)
    remove_dead_letters(opts.output, prefix)
    return done


class _SkipCommitted(beam.DoFn):
    def __init__(self, committed: frozenset[str]):
        self._committed = committed
        from transforms.metrics import NAMESPACE

        self._skipped = beam.metrics.Metrics.counter(NAMESPACE, "samples_already_committed")

    def process(self, sample):
        if sample["sample_id"] in self._committed:
            self._skipped.inc()
            return
        yield sample


def generate_settings(opts: ExtractOptions, max_new_tokens: int | None):
    """What the extract step needs to generate (None without --generate)."""
    if not opts.generate:
        return None
    from transforms.answers import GenerateSettings

    return GenerateSettings(max_new_tokens=int(max_new_tokens or resolve_max_new_tokens(opts)),
                            grid_encoder=opts.grid_encoder, batch_size=opts.batch_size, max_seq_len=opts.max_seq_len)


def build_front(p: beam.Pipeline, opts: ExtractOptions, *, committed=frozenset(), dataset=None, read=None,
                max_new_tokens: int | None = None):
    """read -> [host share] -> validate -> expand -> [first --max_samples] -> [skip committed] -> tokenize.
    Returns (tokenized samples, dead letters). `read` replaces the whole-input reader (the local runner's waves
    pass one that reads a slice); `max_new_tokens` is --generate's resolved answer budget (room left in a row)."""
    from transforms.read import ReadTasks
    from transforms.samples import ExpandSamples
    from transforms.shares import TakeHostShare
    from transforms.tokenize import TokenizeSamples
    from transforms.validate import ValidateTasks

    read = p | "Read" >> (read or ReadTasks(dataset or opts.dataset, max_train_examples=opts.max_train_examples,
                                            max_records=opts.max_samples, validate=False))
    records = read.records
    if opts.num_hosts > 1:
        records = records | "HostShare" >> TakeHostShare(opts.host_index, opts.num_hosts)
    checked = records | "Validate" >> ValidateTasks()
    samples = checked.valid | "Expand" >> ExpandSamples(opts.augmentations, opts.seed)
    if opts.max_samples:
        # records were already cut to max_samples; a task with several test inputs or augmentations gives more
        samples = (samples
                   | "FirstSamples" >> beam.combiners.Top.Smallest(opts.max_samples, key=lambda s: s["sample_id"])
                   | "Unlist" >> beam.FlatMap(lambda chosen: chosen))
    if committed:
        samples = samples | "SkipCommitted" >> beam.ParDo(_SkipCommitted(frozenset(committed)))
    tokenized = samples | "Tokenize" >> TokenizeSamples(
        tokenizer_source=opts.model, grid_encoder=opts.grid_encoder, prompt_version=opts.prompt_version,
        prompt_mode=opts.prompt_mode, max_seq_len=opts.max_seq_len,
        max_new_tokens=int(max_new_tokens or 0) if opts.generate else 0)
    dead = (read.dead_letter, checked.dead_letter, tokenized.dead_letter) | "AllDeadLetters" >> beam.Flatten()
    return tokenized.samples, dead


def extract_config(opts: ExtractOptions, hooks, layers, max_new_tokens: int | None = None):
    """The extractor's config, built in one place: the model the waves preload and each wave's Extract must carry
    the same config (it is the shared model's tag), or the model is loaded a second time."""
    from transforms.extract import ExtractConfig
    from transforms.write import statistics_enabled

    return ExtractConfig(
        model=opts.model, dtype=opts.dtype, hooks=tuple(hooks), layers=tuple(layers),
        storage_dtype=storage_dtype(opts), attention=opts.attention,
        model_parallelism=opts.model_parallelism, progress_interval=opts.progress_interval,
        generate=generate_settings(opts, max_new_tokens),
        statistics=opts.statistics_on if statistics_enabled() else "off")


def build_back(samples, opts: ExtractOptions, *, hooks, layers, identity: dict | None = None, shared_handle=None,
               max_new_tokens: int | None = None):
    """Tokenized samples -> fixed-shape batches -> extract -> write shards. Returns the per-shard write
    summaries. `shared_handle` (a beam.utils.shared.Shared) lets successive pipelines share one loaded model."""
    from transforms.batching import BatchSamples
    from transforms.coders import ExtractedBatchHint
    from transforms.extract import ExtractActivations
    from transforms.write import WriteShards

    total_tokens = (
        samples
        | "CountTokens" >> beam.Map(lambda s: len(s["token_ids"]))
        | "SumTokens" >> beam.CombineGlobally(sum))
    batches = samples | "Batch" >> BatchSamples(
        batch_size=opts.batch_size, max_seq_len=opts.max_seq_len, num_groups=opts.pack_groups,
        # Generation takes one prompt per row, so a batch holds at most batch_size samples.
        packing="rows" if opts.generate else opts.packing, total_tokens=total_tokens)
    config = extract_config(opts, hooks, layers, max_new_tokens)
    # The hint selects a coder that sizes these large elements without pickling them (transforms/coders.py).
    extracted = batches | "Extract" >> beam.ParDo(
        ExtractActivations(config, shared_handle), total_tokens=beam.pvalue.AsSingleton(total_tokens)
    ).with_output_types(ExtractedBatchHint)
    return extracted | "Write" >> WriteShards(
        output_root=opts.output, worker_prefix=worker_prefix(opts), model_name=opts.model,
        compute_dtype=opts.dtype, storage_dtype=storage_dtype(opts), threads=opts.writer_threads,
        memory_bytes=None if opts.writer_memory_gib is None else max(1, int(opts.writer_memory_gib * (1 << 30))),
        identity=None if identity is None else identity_lib.encode(identity),
        activation_compression=opts.activation_compression)


def build_pipeline(p: beam.Pipeline, opts: ExtractOptions, *, hooks, layers, committed=frozenset(), dataset=None,
                   identity: dict | None = None, max_new_tokens: int | None = None):
    """Adds the whole graph to `p`. Returns the PCollection of per-shard write summaries. `identity` (the run
    identity) is recorded in every commit marker; `max_new_tokens` is --generate's resolved answer budget."""
    from transforms.write import WriteDeadLetters

    samples, dead = build_front(p, opts, committed=committed, dataset=dataset, max_new_tokens=max_new_tokens)
    summaries = build_back(samples, opts, hooks=hooks, layers=layers, identity=identity,
                           max_new_tokens=max_new_tokens)
    dead | "WriteDeadLetters" >> WriteDeadLetters(opts.output, worker_prefix(opts))
    return summaries


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("apache_beam", "jax", "jaxlib", "flax", "transformers", "tokenizers", "pyarrow", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing optional package is recorded as absent, not fatal
            versions[name] = None
    return versions


def counters(result) -> dict[str, int]:
    from transforms.metrics import NAMESPACE

    out: dict[str, int] = {}
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except Exception as err:  # some runners cannot report metrics; the manifest still counts files
        _LOG.warning("metrics unavailable from the runner: %s", err)
        return out
    for counter in query["counters"]:
        name = counter.key.metric.name
        out[name] = out.get(name, 0) + int(counter.committed or counter.attempted or 0)
    return out


def unknown_flags(argv: list[str]) -> list[str]:
    """Flags no PipelineOptions class knows, each with a suggestion: Beam only warns about them, which would let
    a typo such as --layer=3 silently fall back to a default."""
    import difflib

    parser = flag_parser(OptionError)
    _, unknown = parser.parse_known_args(argv)
    known = [flag for action in parser._actions for flag in action.option_strings]
    problems = []
    for arg in unknown:
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}")
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return problems


def print_help() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description="Extract Qwen2/Qwen2.5 activations on ARC-AGI tasks or text into per-hook, per-layer Parquet.",
        epilog="Every Apache Beam pipeline option is accepted too (--runner, --direct_num_workers, --project, "
               "--region, --temp_location, --sdk_container_image, ...). --runner=DirectRunner runs in-process "
               "without downloading anything. See README.md and docs/format.md.")
    ExtractOptions._add_argparse_args(parser)
    parser.print_help()


def parse_options(argv: list[str]) -> PipelineOptions:
    """Beam options from the command line, refusing unknown flags (OptionError names each)."""
    try:
        problems = unknown_flags(argv)
    except OptionError as err:
        problems = [str(err)]
    if problems:
        raise OptionError("; ".join(problems) + " (see python -m pipeline.run --help)")
    return PipelineOptions(argv)


@dataclasses.dataclass
class RunPlan:
    """What the checks before the graph resolved: the model's geometry, what to capture, the input."""
    opts: ExtractOptions
    model_config: object
    hooks: tuple
    layers: tuple
    dataset: object
    dry_run: bool
    max_new_tokens: int | None = None


def check_before_graph(options: PipelineOptions) -> RunPlan:
    """Every check that needs no data and no model weights, so a mistake is one line before anything runs."""
    opts = options.view_as(ExtractOptions)
    opts.validate_extract()
    check_output_location(opts)
    model_config, hooks, layers = resolve_capture(opts)
    max_new_tokens = resolve_max_new_tokens(opts)
    check_memory(options, opts, model_config, hooks, layers, max_new_tokens)
    dataset = resolve_inputs(opts)
    from pipeline.waves import check_wave_options

    check_wave_options(options, opts, dataset)
    dry_run = options.view_as(beam.options.pipeline_options.TestOptions).dry_run
    return RunPlan(opts, model_config, tuple(hooks), tuple(layers), dataset, dry_run, max_new_tokens)


def execute(options: PipelineOptions, plan: RunPlan, committed: set[str], identity: dict | None):
    """Builds and runs the graph; returns (final state, Beam counters, seconds)."""
    runner_name = options.view_as(StandardOptions).runner
    runner = local_runner(options) if runner_name in LOCAL_RUNNERS else None
    if runner is not None and options.view_as(DirectOptions).direct_num_workers == 0:
        options.view_as(DirectOptions).direct_num_workers = 1
    from pipeline.waves import run_in_waves, use_waves

    if use_waves(options, plan.opts, plan.dataset):
        return run_in_waves(options, plan, committed, identity)
    clock = time.perf_counter()
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(pipeline, plan.opts, hooks=plan.hooks, layers=plan.layers, committed=committed,
                   dataset=plan.dataset, identity=identity, max_new_tokens=plan.max_new_tokens)
    result = pipeline.run()
    state = result.wait_until_finish()
    return state, counters(result), time.perf_counter() - clock


def record_run(plan: RunPlan, state, run_counts: dict, started: _dt.datetime) -> dict:
    """Writes this host's run record and rebuilds the manifest; returns the manifest."""
    from model import describe_spec
    from pipeline.manifest import rebuild_manifest, write_host_run
    from transforms.write import remove_stray_temp_files

    opts = plan.opts
    if opts.num_hosts == 1:  # with several hosts another one may be mid-write
        for path in remove_stray_temp_files(opts.output):
            _LOG.warning("removed a temporary file left by a failed attempt: %s", path)
    model_source = describe_spec(opts.model)
    run_info = {
        "model": {**model_source, "config": plan.model_config.to_dict()},
        "tokenizer": model_source["tokenizer"],
        "options": {k: v for k, v in opts.get_all_options(drop_default=False).items()
                    if isinstance(v, (str, int, float, bool, type(None), list))},
        "hooks": list(plan.hooks), "layers": list(plan.layers),
        "compute_dtype": opts.dtype, "storage_dtype": storage_dtype(opts),
        "run_counters": run_counts,
        "software": software_versions(),
        "started": started.isoformat(), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "state": str(state), "host": worker_prefix(opts), "num_hosts": opts.num_hosts,
        "max_new_tokens": plan.max_new_tokens,
    }
    write_host_run(opts.output, worker_prefix(opts), run_info)
    return rebuild_manifest(opts.output)


def summary(opts: ExtractOptions, manifest: dict, run_counts: dict, seconds: float) -> dict:
    counts = manifest.get("counts", {})
    real, padding = run_counts.get("real_tokens", 0), run_counts.get("padding_tokens", 0)
    return {
        "output": opts.output,
        "records_read": run_counts.get("records_read", 0),
        "records_valid": run_counts.get("records_valid", 0),
        "records_rejected": run_counts.get("records_rejected", 0),
        "samples_written": counts.get("samples", 0),
        "samples_rejected": run_counts.get("samples_rejected", 0),
        "tokens": counts.get("tokens", run_counts.get("tokens_extracted", 0)),
        "batches": run_counts.get("batches", 0),
        "padding_fraction": round(padding / max(padding + real, 1), 4),
        "float16_overflow": run_counts.get("float16_overflow", 0),
        "bytes_written": run_counts.get("bytes_written", 0),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(run_counts.get("tokens_extracted", 0) / max(seconds, 1e-9), 1),
        **generation_summary(opts, manifest, run_counts),
    }


def generation_summary(opts: ExtractOptions, manifest: dict, run_counts: dict) -> dict:
    """--generate's lines of the summary: this run's answers (Beam counters) and the output's accuracy."""
    if not opts.generate:
        return {}
    from transforms.extract import GENERATION_COUNTERS

    out = {name: run_counts.get(name, 0) for name in GENERATION_COUNTERS}
    out["accuracy"] = (manifest.get("predictions") or {}).get("accuracy")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    use_storage_emulator_if_configured()
    if "--help" in argv or "-h" in argv:
        print_help()
        return 0
    try:
        options = parse_options(argv)
        plan = check_before_graph(options)
    except (OptionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    opts = plan.opts
    if plan.dry_run:
        execute(options, plan, set(), None)
        print("dry run: the job was built and not submitted")
        return 0

    from pipeline.lease import Lease, LeaseHeld
    from transforms.output_format import FORMAT_VERSION

    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        lease = Lease(opts.output, worker_prefix(opts), opts.lease_timeout).acquire()
    except LeaseHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        try:
            identity = identity_lib.run_identity(opts, plan.hooks, plan.layers, storage_dtype=storage_dtype(opts),
                                                 format_version=FORMAT_VERSION, max_new_tokens=plan.max_new_tokens)
            committed = prepare_output(opts, plan.hooks, plan.layers, identity)
        except (OptionError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        state, run_counts, seconds = execute(options, plan, committed, identity)
        if lease.lost:
            print(f"error: {lease.lost} while this run was writing: check the output with python -m "
                  "pipeline.verify and finish it with --resume from one place", file=sys.stderr)
            return 1
        manifest = record_run(plan, state, run_counts, started)
    finally:
        lease.release()
    print(json.dumps(summary(opts, manifest, run_counts, seconds), indent=1))
    if run_counts.get("float16_overflow"):
        _LOG.warning("%d activation values overflowed float16 and are stored as inf: use --activation_dtype=float32 "
                     "for exact values", run_counts["float16_overflow"])
    return 0


if __name__ == "__main__":
    from pipeline.errors import run_main

    sys.exit(run_main(main))
