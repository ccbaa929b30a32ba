"""`python -m pipeline.run`: options -> Beam graph -> per-layer Parquet shards, a manifest and a summary.

Graph: read -> [host share] -> validate (dead letter) -> expand samples -> [first --max_samples] -> [resume filter]
-> format + tokenize (dead letter) -> fixed-shape batches -> extract (JAX Qwen, one model per worker process)
-> write shards.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline.options import ExtractOptions, OptionError, storage_dtype
from pipeline.storage import use_storage_emulator_if_configured

_LOG = logging.getLogger("pipeline.run")

LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")


def worker_prefix(opts: ExtractOptions) -> str:
    return f"h{opts.host_index:03d}"


def local_runner(options: PipelineOptions):
    """The in-process portable runner behind --runner=DirectRunner, without Beam 2.77's first try of Prism
    (which downloads a binary from GitHub and stalls offline). It honours --direct_num_workers and
    --direct_running_mode like the DirectRunner does."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def resolve_capture(opts: ExtractOptions):
    """Hooks and layers checked against the model's config before any worker starts."""
    from model import load_config
    from model.hooks import parse_hooks, parse_layers

    config = load_config(opts.model)
    hooks = parse_hooks(opts.hooks)
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    return config, hooks, layers


def resolve_inputs(opts: ExtractOptions):
    """The dataset, grid encoder and prompt version, checked before any graph is built, so a mistake is one clear
    line rather than a traceback from inside a transform."""
    from transforms.datasets import DatasetUnavailableError, resolve_dataset
    from transforms.grid_encoders import create_grid_encoder
    from transforms.prompts import PROMPT_VERSIONS

    if opts.prompt_version not in PROMPT_VERSIONS:
        raise OptionError(f"--prompt_version={opts.prompt_version!r} is not one of {', '.join(PROMPT_VERSIONS)}")
    try:
        create_grid_encoder(opts.grid_encoder)
    except ValueError as err:
        raise OptionError(f"--grid_encoder: {err}") from None
    try:
        return resolve_dataset(opts.dataset)
    except DatasetUnavailableError as err:
        raise OptionError(str(err)) from None


def check_resume_matches(opts: ExtractOptions, shards: dict, hooks, layers) -> None:
    """A resumed run must write what the committed shards hold: one format, dtypes, hooks and layers per output
    (a dataset of mixed column types cannot be read as one table)."""
    from transforms.write import FORMAT_VERSION, KEY_FORMAT_VERSION, KEY_STORAGE_DTYPE

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


def prepare_output(opts: ExtractOptions, hooks=(), layers=()) -> set[str]:
    """Checks the output root; with --resume returns the committed sample ids and removes this host's
    uncommitted files, without it refuses to mix two runs in one output."""
    from transforms.write import clean_uncommitted, committed_sample_ids, committed_shards, remove_dead_letters

    prefix = worker_prefix(opts)
    done = committed_sample_ids(opts.output)
    if done and not opts.resume:
        raise OptionError(
            f"--output={opts.output} already holds {len(done):,} committed samples from an earlier run: pass "
            "--resume to complete that run, or choose a new --output.")
    if done:
        check_resume_matches(opts, committed_shards(opts.output), hooks, layers)
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


def build_pipeline(p: beam.Pipeline, opts: ExtractOptions, *, hooks, layers, committed=frozenset(), dataset=None):
    """Adds the whole graph to `p`. Returns the PCollection of per-shard write summaries."""
    from transforms.batching import BatchSamples
    from transforms.coders import ExtractedBatchHint
    from transforms.extract import ExtractActivations, ExtractConfig
    from transforms.read import ReadTasks
    from transforms.samples import ExpandSamples
    from transforms.shares import TakeHostShare
    from transforms.tokenize import TokenizeSamples
    from transforms.validate import ValidateTasks
    from transforms.write import WriteDeadLetters, WriteShards

    read = p | "Read" >> ReadTasks(dataset or opts.dataset, max_train_examples=opts.max_train_examples,
                                   max_records=opts.max_samples, validate=False)
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
        prompt_mode=opts.prompt_mode, max_seq_len=opts.max_seq_len)
    total_tokens = (
        tokenized.samples
        | "CountTokens" >> beam.Map(lambda s: len(s["token_ids"]))
        | "SumTokens" >> beam.CombineGlobally(sum))
    batches = tokenized.samples | "Batch" >> BatchSamples(
        batch_size=opts.batch_size, max_seq_len=opts.max_seq_len, num_groups=opts.pack_groups,
        packing=opts.packing, total_tokens=total_tokens)
    config = ExtractConfig(
        model=opts.model, dtype=opts.dtype, hooks=tuple(hooks), layers=tuple(layers),
        storage_dtype=storage_dtype(opts), attention=opts.attention,
        model_parallelism=opts.model_parallelism, progress_interval=opts.progress_interval)
    # The hint selects a coder that sizes these large elements without pickling them (transforms/coders.py).
    extracted = batches | "Extract" >> beam.ParDo(
        ExtractActivations(config), total_tokens=beam.pvalue.AsSingleton(total_tokens)
    ).with_output_types(ExtractedBatchHint)
    summaries = extracted | "Write" >> WriteShards(
        output_root=opts.output, worker_prefix=worker_prefix(opts), model_name=opts.model,
        compute_dtype=opts.dtype, storage_dtype=storage_dtype(opts), threads=opts.writer_threads,
        memory_bytes=None if opts.writer_memory_gib is None else max(1, int(opts.writer_memory_gib * (1 << 30))))
    dead = (read.dead_letter, checked.dead_letter, tokenized.dead_letter) | "AllDeadLetters" >> beam.Flatten()
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

    from apache_beam.options.pipeline_options import _BeamArgumentParser

    class _RaisingParser(_BeamArgumentParser):
        def error(self, message):
            raise OptionError(message)

    parser = _RaisingParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
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
        problems = unknown_flags(argv)
    except OptionError as err:
        problems = [str(err)]
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print("see python -m pipeline.run --help", file=sys.stderr)
        return 2
    options = PipelineOptions(argv)
    opts = options.view_as(ExtractOptions)
    try:
        opts.validate_extract()
        model_config, hooks, layers = resolve_capture(opts)
        dataset = resolve_inputs(opts)
        dry_run = options.view_as(beam.options.pipeline_options.TestOptions).dry_run
        committed = set() if dry_run else prepare_output(opts, hooks, layers)
    except (OptionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    runner_name = options.view_as(StandardOptions).runner
    runner = local_runner(options) if runner_name in LOCAL_RUNNERS else None
    if runner is not None and options.view_as(DirectOptions).direct_num_workers == 0:
        options.view_as(DirectOptions).direct_num_workers = 1
    started = _dt.datetime.now(_dt.timezone.utc)
    clock = time.perf_counter()
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(pipeline, opts, hooks=hooks, layers=layers, committed=committed, dataset=dataset)
    result = pipeline.run()
    state = result.wait_until_finish()
    if dry_run:
        print("dry run: the job was built and not submitted")
        return 0
    seconds = time.perf_counter() - clock
    run_counts = counters(result)

    from pipeline.manifest import rebuild_manifest, write_host_run
    from transforms.write import remove_stray_temp_files

    if opts.num_hosts == 1:  # with several hosts another one may be mid-write
        for path in remove_stray_temp_files(opts.output):
            _LOG.warning("removed a temporary file left by a failed attempt: %s", path)

    from model import describe_spec

    model_source = describe_spec(opts.model)
    run_info = {
        "model": {**model_source, "config": model_config.to_dict()},
        "tokenizer": model_source["tokenizer"],
        "options": {k: v for k, v in opts.get_all_options(drop_default=False).items()
                    if isinstance(v, (str, int, float, bool, type(None), list))},
        "hooks": list(hooks), "layers": list(layers),
        "compute_dtype": opts.dtype, "storage_dtype": storage_dtype(opts),
        "run_counters": run_counts,
        "software": software_versions(),
        "started": started.isoformat(), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "state": str(state), "host": worker_prefix(opts), "num_hosts": opts.num_hosts,
    }
    write_host_run(opts.output, worker_prefix(opts), run_info)
    manifest = rebuild_manifest(opts.output)
    counts = manifest.get("counts", {})
    tokens = counts.get("tokens", run_counts.get("tokens_extracted", 0))
    print(json.dumps({
        "output": opts.output,
        "records_read": run_counts.get("records_read", 0),
        "records_valid": run_counts.get("records_valid", 0),
        "records_rejected": run_counts.get("records_rejected", 0),
        "samples_written": counts.get("samples", 0),
        "samples_rejected": run_counts.get("samples_rejected", 0),
        "tokens": tokens,
        "batches": run_counts.get("batches", 0),
        "padding_fraction": round(run_counts.get("padding_tokens", 0) / max(
            run_counts.get("padding_tokens", 0) + run_counts.get("real_tokens", 0), 1), 4),
        "float16_overflow": run_counts.get("float16_overflow", 0),
        "bytes_written": run_counts.get("bytes_written", 0),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(run_counts.get("tokens_extracted", 0) / max(seconds, 1e-9), 1),
    }, indent=1))
    if run_counts.get("float16_overflow"):
        _LOG.warning("%d activation values overflowed float16 and are stored as inf: use --activation_dtype=float32 "
                     "for exact values", run_counts["float16_overflow"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
