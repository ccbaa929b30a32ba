"""The bench's command line and the settings it resolves to: which cases, lengths, batch shapes and paths run."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from pipeline.options import _positive_int, add_device_args

# The default cases: (geometry, layer selection).
DEFAULT_CASES: tuple[tuple[str, str], ...] = (
    ("qwen2.5-0.5b", "one"),
    ("qwen2.5-0.5b", "all"),
    ("qwen2.5-7b", "one"),
)
DEFAULT_LENGTHS = (1024, 2048, 4096)
# Tokens per batch of each geometry, the batch shapes of the targets' reference table (docs/benchmarks.md).
DEFAULT_BATCH_TOKENS = {"qwen2.5-0.5b": 65536, "qwen2.5-7b": 16384}
FALLBACK_BATCH_TOKENS = 16384
HOOK = "resid_post"
# Random token ids stay below the special tokens (the first is <|endoftext|>), as real text does.
MAX_ORDINARY_TOKEN = 151643

# --profile=quick: what fits a short loan of one H100/H200 (docs/benchmarks.md).
QUICK_LENGTHS = (2048,)
QUICK_STEPS = 3
QUICK_WARMUP = 1
QUICK_DISK_MIB = 1024
QUICK_MAX_OUTPUT_GIB = 4.0

SMOKE_MODEL = "tiny"
SMOKE_LENGTHS = (64,)
SMOKE_BATCH_SIZE = 2


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message names the option or file and what to do."""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it is a value; the None defaults are explained in their help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench",
        description="Benchmark our JAX extractor, the whole Beam pipeline and the transformers baseline on the "
                    "same random weights and token batches, or (--host_ceiling) the pipeline's host side alone. "
                    "See docs/benchmarks.md.",
        formatter_class=_HelpFormatter)
    _add_case_flags(parser)
    _add_run_flags(parser)
    _add_path_flags(parser)
    from pipeline.bench.host_ceiling import add_flags

    add_flags(parser.add_argument_group("host ceiling (--host_ceiling)"))
    return parser


def _add_case_flags(parser) -> None:
    parser.add_argument("--models", default=None,
                        help="Comma list of geometries (model/config.py QWEN25_GEOMETRIES), default "
                             "qwen2.5-0.5b,qwen2.5-7b (--smoke: tiny).")
    parser.add_argument("--layers", default=None,
                        help="Comma list of layer selections: 'one' (the middle layer) and/or 'all'. Without "
                             "--models and --layers both given, only the three default cases run (0.5B one, "
                             "0.5B all, 7B one); naming both runs every combination. With --host_ceiling: "
                             "which of its runs (default one,all).")
    parser.add_argument("--lengths", default=None,
                        help=f"Comma list of sequence lengths, default {','.join(map(str, DEFAULT_LENGTHS))} "
                             f"(--smoke: {','.join(map(str, SMOKE_LENGTHS))}).")
    parser.add_argument("--batch_tokens", type=_positive_int("batch_tokens"), default=None,
                        help="Tokens per batch; the batch size is batch_tokens // length. Default per model: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH_TOKENS.items())
                             + f", others {FALLBACK_BATCH_TOKENS}.")
    parser.add_argument("--batch_size", type=_positive_int("batch_size"), default=None,
                        help="Rows per batch at every length (overrides --batch_tokens).")
    parser.add_argument("--steps", type=_positive_int("steps"), default=None,
                        help="Timed batches per measurement (default 10; --smoke: 2).")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Untimed batches before each measurement, after the compiling first call "
                             "(default 2; --smoke: 1).")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="Compute dtype of both frameworks; default bfloat16 on an accelerator, float32 on CPU.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and token batches.")


def _add_run_flags(parser) -> None:
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Peak dense TFLOP/s of one device for model FLOP utilisation; default from the "
                             "device kind for bf16 (H100 SXM 989, H200 989, A100 312, TPU v5e 197, ...), "
                             "none for CPU or float32.")
    parser.add_argument("--output_dir", default="bench-results",
                        help="Where the JSON results go (bench-<UTC time>.json).")
    parser.add_argument("--work_dir", default=None,
                        help="Scratch folder for the checkpoint, the disk test and the Parquet outputs; it must be "
                             "on the disk being measured. Default: a temporary folder inside --output_dir, "
                             "removed at the end.")
    parser.add_argument("--disk_test_mib", type=_positive_int("disk_test_mib"), default=None,
                        help="MiB written (then fsync'd) to measure the disk's sequential write bandwidth "
                             "(default 4096; --host_ceiling and --profile=quick: 1024; --smoke: 32).")
    parser.add_argument("--max_output_gib", type=float, default=None,
                        help="Cap on the estimated Parquet bytes of one pipeline or baseline-write run: fewer "
                             "batches are written when the cap would be passed (all-layer cases). Default 16 "
                             f"(--profile=quick: {QUICK_MAX_OUTPUT_GIB:g}).")
    parser.add_argument("--pipeline_steps", type=int, default=None,
                        help="Batches of text the pipeline run gets (default: twice --steps, at least 2 so a "
                             "steady rate between shard commits exists), fewer if --max_output_gib says so.")
    parser.add_argument("--profile_dir", default=None,
                        help="Also record a JAX profiler trace (TensorBoard / Perfetto) of our timed copy loop and "
                             "of each pipeline run under this folder. Tracing slows things down: profile in a "
                             "separate run from the one whose numbers you record.")
    # The pipeline's own definitions: ours and the pipeline run get the same kernel and mesh.
    add_device_args(parser)


def _add_path_flags(parser) -> None:
    parser.add_argument("--baseline_device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="Where the transformers baseline runs. auto: cuda when torch sees a GPU, CPU when "
                             "JAX also runs on CPU, else the baseline is skipped (e.g. on TPU) and said so.")
    parser.add_argument("--skip_baseline", action="store_true", help="Do not run (c), the transformers baseline.")
    parser.add_argument("--skip_pipeline", action="store_true", help="Do not run (b), the whole Beam pipeline.")
    parser.add_argument("--skip_disk", action="store_true", help="Do not measure the disk's write bandwidth.")
    parser.add_argument("--profile", default="full", choices=("full", "quick"),
                        help="quick: the default cases at length 2048 only, 3 timed steps after 1 warmup, 2 pipeline "
                             "batches, a 1 GiB disk test, seeded weights: sized for a short GPU loan. Flags given "
                             "explicitly still win.")
    parser.add_argument("--weights", default=None, choices=("checkpoint", "seeded"),
                        help="How ours and the pipeline get the baseline's random weights: checkpoint (saved with "
                             "save_pretrained and loaded, the default) or seeded (converted in memory and served "
                             "to the pipeline, no checkpoint written; the default of --profile=quick).")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU only, the tiny geometry (hidden 64), length 64, 2 steps: every path "
                             "end to end in seconds. Numbers mean nothing; CI runs it.")


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    layers_mode: str  # "one" or "all"

    @property
    def name(self) -> str:
        return f"{self.model}/{self.layers_mode}-layer{'s' if self.layers_mode == 'all' else ''}"

    def layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers_mode == "all":
            return tuple(range(num_layers))
        return (num_layers // 2,)


@dataclasses.dataclass
class Settings:
    cases: list[Case]
    lengths: list[int]
    batch_tokens: Optional[int]
    batch_size: Optional[int]
    steps: int
    warmup: int
    pipeline_steps: int
    dtype: Optional[str]
    peak_tflops: Optional[float]
    output_dir: Path
    work_dir: Optional[Path]
    disk_test_bytes: int
    max_output_bytes: int
    baseline_device: str
    attention: str
    seed: int
    skip_baseline: bool
    skip_pipeline: bool
    skip_disk: bool
    smoke: bool
    profile_dir: Optional[Path] = None
    model_parallelism: int = 1
    host_ceiling: Optional[object] = None  # pipeline.bench.host_ceiling.HostSettings when --host_ceiling
    seeded_weights: bool = False
    profile: str = "full"


def parse_settings(argv: list[str]) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.profile == "quick"
    cases = [] if args.host_ceiling else _cases(parser, args)
    lengths = _lengths(parser, args, cases)
    steps = args.steps or (2 if args.smoke else QUICK_STEPS if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else QUICK_WARMUP if quick else 2)
    if warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {warmup}")
    pipeline_steps = args.pipeline_steps if args.pipeline_steps is not None else (2 if quick else max(2, 2 * steps))
    if pipeline_steps < 1:
        parser.error(f"--pipeline_steps must be at least 1, got {pipeline_steps}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    max_output_gib = args.max_output_gib if args.max_output_gib is not None else (
        QUICK_MAX_OUTPUT_GIB if quick else 16.0)
    if max_output_gib <= 0:
        parser.error(f"--max_output_gib must be positive, got {max_output_gib}")
    disk_mib = args.disk_test_mib or (32 if args.smoke else QUICK_DISK_MIB if quick or args.host_ceiling else 4096)
    from pipeline.bench.host_ceiling import host_settings

    return Settings(
        cases=cases, lengths=lengths, batch_tokens=args.batch_tokens,
        batch_size=args.batch_size or (SMOKE_BATCH_SIZE if args.smoke and not args.batch_tokens else None),
        steps=steps, warmup=warmup, pipeline_steps=pipeline_steps,
        dtype=args.dtype or ("float32" if args.smoke else None), peak_tflops=args.peak_tflops,
        output_dir=Path(args.output_dir), work_dir=Path(args.work_dir) if args.work_dir else None,
        disk_test_bytes=disk_mib << 20, max_output_bytes=int(max_output_gib * (1 << 30)),
        baseline_device="cpu" if args.smoke else args.baseline_device, attention=args.attention, seed=args.seed,
        skip_baseline=args.skip_baseline, skip_pipeline=args.skip_pipeline, skip_disk=args.skip_disk,
        smoke=args.smoke, profile_dir=Path(args.profile_dir) if args.profile_dir else None,
        model_parallelism=args.model_parallelism, host_ceiling=host_settings(parser, args),
        seeded_weights=(args.weights or ("seeded" if quick else "checkpoint")) == "seeded", profile=args.profile)


def _cases(parser, args) -> list[Case]:
    from model.config import QWEN25_GEOMETRIES

    models = _csv(args.models) if args.models else ([SMOKE_MODEL] if args.smoke else None)
    layer_modes = _csv(args.layers) if args.layers else None
    for name in models or ():
        if name not in QWEN25_GEOMETRIES:
            parser.error(f"--models: unknown geometry {name!r}; choose among {', '.join(QWEN25_GEOMETRIES)}")
    for mode in layer_modes or ():
        if mode not in ("one", "all"):
            parser.error(f"--layers: {mode!r} is not a layer selection; use one, all or one,all")
    if args.smoke:
        return [Case(m, mode) for m in models for mode in (layer_modes or ["one", "all"])]
    if models is not None and layer_modes is not None:
        return [Case(m, mode) for m in models for mode in layer_modes]
    cases = [Case(m, mode) for m, mode in DEFAULT_CASES
             if (models is None or m in models) and (layer_modes is None or mode in layer_modes)]
    if not cases:
        parser.error(f"--models={args.models} --layers={args.layers} selects none of the default cases "
                     f"({', '.join(Case(*c).name for c in DEFAULT_CASES)}); give both flags to run any "
                     "combination")
    return cases


def _lengths(parser, args, cases: list[Case]) -> list[int]:
    from model.config import QWEN25_GEOMETRIES

    try:
        lengths = [int(x) for x in _csv(args.lengths)] if args.lengths else list(
            SMOKE_LENGTHS if args.smoke else QUICK_LENGTHS if args.profile == "quick" else DEFAULT_LENGTHS)
    except ValueError:
        parser.error(f"--lengths takes a comma list of whole numbers, got {args.lengths!r}")
    if not lengths or any(n < 2 for n in lengths):
        parser.error(f"--lengths needs lengths of at least 2 tokens, got {args.lengths!r}")
    for case in cases:
        limit = QWEN25_GEOMETRIES[case.model].max_position_embeddings
        too_long = [n for n in lengths if n > limit]
        if too_long:
            parser.error(f"--lengths {too_long} exceed {case.model}'s max_position_embeddings {limit}")
    return lengths


def batch_size_for(settings: Settings, model: str, length: int) -> int:
    if settings.batch_size:
        return settings.batch_size
    tokens = settings.batch_tokens or DEFAULT_BATCH_TOKENS.get(model, FALLBACK_BATCH_TOKENS)
    return max(1, tokens // length)
