"""`python -m pipeline.bench`: our extractor, the whole pipeline and the transformers baseline, side by side.

One process, on whatever accelerator is present, on the same random weights and the same token batches:

(a) ours: the jitted `Model.capture` on fixed-shape random token batches, batch n+1 dispatched before batch n is
    fetched (as transforms/extract.py does), once as a bare forward (every layer, result left on the device) and
    once copying the requested hooks to host;
(b) pipeline: `pipeline.run.main` on the local runner, reading a synthetic text corpus of about the same token
    count and writing Parquet to local disk (the real product, not a re-implementation of its DoFns);
(c) baseline: transformers' PyTorch Qwen2 (bf16 on GPU, float32 on CPU, SDPA attention) with
    `output_hidden_states=True`, the requested layers copied to host with `.cpu()`, then written by the same
    Parquet writer the pipeline uses.

Same weights: the transformers model is built first with random weights, saved once as a safetensors checkpoint
(with the real Qwen2.5 tokenizer) into a work folder, and that checkpoint is what ours and the pipeline load. Each
framework holds the weights once at a time: the baseline runs and frees its model before JAX loads the checkpoint,
and our model is freed before the pipeline loads its own copy.

The disk's own sequential write bandwidth is measured in the same run (fsync'd), so the all-layer target (a share
of that bandwidth) is checkable. Results print as a table and go to OUTPUT_DIR/bench-<time>.json, with every target
of issue 5 marked pass / fail / not run. `--smoke` runs every path on CPU with the tiny geometry in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.options import whole_number

# Dense bf16 peak TFLOP/s by device kind (vendor data sheets, no sparsity). Matched in order on
# `jax.devices()[0].device_kind`, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)

# The cases of issue 5: (geometry, layer selection).
DEFAULT_CASES: tuple[tuple[str, str], ...] = (
    ("qwen2.5-0.5b", "one"),
    ("qwen2.5-0.5b", "all"),
    ("qwen2.5-7b", "one"),
)
DEFAULT_LENGTHS = (1024, 2048, 4096)
# Tokens per batch: 32 x 2048 for 0.5B and 8 x 2048 for 7B, the batch shapes of issue 5's table.
DEFAULT_BATCH_TOKENS = {"qwen2.5-0.5b": 65536, "qwen2.5-7b": 16384}
FALLBACK_BATCH_TOKENS = 16384
HOOK = "resid_post"
# Random token ids stay below the special tokens (151643 is <|endoftext|>), as real text does.
MAX_ORDINARY_TOKEN = 151643

SMOKE_MODEL = "tiny"
SMOKE_LENGTHS = (64,)
SMOKE_BATCH_SIZE = 2

# Issue 5's targets, as ratios against the baseline (or the disk) in the same run.
TARGETS = (
    # (id, geometry, layers, metric, threshold, description)
    ("0.5b-one-layer-pipeline", "qwen2.5-0.5b", "one", "pipeline_vs_baseline_copy", 3.0,
     "0.5B, one layer, whole pipeline into Parquet >= 3x the baseline (forward + copy to host)"),
    ("0.5b-forward", "qwen2.5-0.5b", "one", "forward_vs_baseline", 1.8,
     "0.5B forward only >= 1.8x transformers' forward"),
    ("0.5b-all-layers-disk", "qwen2.5-0.5b", "all", "pipeline_vs_disk", 0.7,
     "0.5B, all layers, whole pipeline >= 70% of the disk's sequential write bandwidth"),
    ("7b-one-layer-pipeline", "qwen2.5-7b", "one", "pipeline_vs_baseline_copy", 1.7,
     "7B, one layer, whole pipeline >= 1.7x the baseline (forward + copy to host)"),
    ("7b-forward", "qwen2.5-7b", "one", "forward_vs_baseline", 1.3,
     "7B forward only >= 1.3x transformers' forward"),
)
TARGET_DEVICES = ("H100", "H200")
# Largest |ours - transformers| / max|transformers| on the same weights and tokens before the run is flagged.
AGREEMENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message names the option or file and what to do."""


# --------------------------------------------------------------------------------------------------- options


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _positive_int(name):
    return whole_number(name, 1)


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
                    "same random weights and token batches (issue 5). See docs/benchmarks.md.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--models", default=None,
                        help="Comma list of geometries (model/config.py QWEN25_GEOMETRIES), default "
                             "qwen2.5-0.5b,qwen2.5-7b (--smoke: tiny).")
    parser.add_argument("--layers", default=None,
                        help="Comma list of layer selections: 'one' (the middle layer) and/or 'all'. Without "
                             "--models and --layers both given, only issue 5's three cases run (0.5B one, 0.5B all, "
                             "7B one); naming both runs every combination.")
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
                             "(default 4096; --smoke: 32).")
    parser.add_argument("--max_output_gib", type=float, default=16.0,
                        help="Cap on the estimated Parquet bytes of one pipeline or baseline-write run: fewer "
                             "batches are written when the cap would be passed (all-layer cases).")
    parser.add_argument("--pipeline_steps", type=int, default=None,
                        help="Batches of text the pipeline run gets (default: twice --steps, at least 2 so a "
                             "steady rate between shard commits exists), fewer if --max_output_gib says so.")
    parser.add_argument("--profile_dir", default=None,
                        help="Also record a JAX profiler trace (TensorBoard / Perfetto) of our timed copy loop and "
                             "of each pipeline run under this folder. Tracing slows things down: profile in a "
                             "separate run from the one whose numbers you record.")
    parser.add_argument("--baseline_device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="Where the transformers baseline runs. auto: cuda when torch sees a GPU, CPU when "
                             "JAX also runs on CPU, else the baseline is skipped (e.g. on TPU) and said so.")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                        help="Our attention kernel (passed to load_model and the pipeline).")
    parser.add_argument("--model_parallelism", type=_positive_int("model_parallelism"), default=1,
                        help="With several local devices (a TPU host), devices per model replica; the rest form "
                             "the data axis, as in the pipeline's extractor. The peak rate is per device times "
                             "the device count.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and token batches.")
    parser.add_argument("--skip_baseline", action="store_true", help="Do not run (c), the transformers baseline.")
    parser.add_argument("--skip_pipeline", action="store_true", help="Do not run (b), the whole Beam pipeline.")
    parser.add_argument("--skip_disk", action="store_true", help="Do not measure the disk's write bandwidth.")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU only, the tiny geometry (hidden 64), length 64, 2 steps: every path "
                             "end to end in seconds. Numbers mean nothing; CI runs it.")
    return parser


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


def parse_settings(argv: list[str]) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        cases = [Case(m, mode) for m in models for mode in (layer_modes or ["one", "all"])]
    elif models is not None and layer_modes is not None:
        cases = [Case(m, mode) for m in models for mode in layer_modes]
    else:
        cases = [Case(m, mode) for m, mode in DEFAULT_CASES
                 if (models is None or m in models) and (layer_modes is None or mode in layer_modes)]
        if not cases:
            parser.error(f"--models={args.models} --layers={args.layers} selects none of the default cases "
                         f"({', '.join(Case(*c).name for c in DEFAULT_CASES)}); give both flags to run any "
                         "combination")
    try:
        lengths = [int(x) for x in _csv(args.lengths)] if args.lengths else list(
            SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS)
    except ValueError:
        parser.error(f"--lengths takes a comma list of whole numbers, got {args.lengths!r}")
    if not lengths or any(n < 2 for n in lengths):
        parser.error(f"--lengths needs lengths of at least 2 tokens, got {args.lengths!r}")
    for case in cases:
        limit = QWEN25_GEOMETRIES[case.model].max_position_embeddings
        too_long = [n for n in lengths if n > limit]
        if too_long:
            parser.error(f"--lengths {too_long} exceed {case.model}'s max_position_embeddings {limit}")
    steps = args.steps or (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {warmup}")
    pipeline_steps = args.pipeline_steps if args.pipeline_steps is not None else max(2, 2 * steps)
    if pipeline_steps < 1:
        parser.error(f"--pipeline_steps must be at least 1, got {pipeline_steps}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    if args.max_output_gib <= 0:
        parser.error(f"--max_output_gib must be positive, got {args.max_output_gib}")
    disk_mib = args.disk_test_mib or (32 if args.smoke else 4096)
    return Settings(
        cases=cases, lengths=lengths, batch_tokens=args.batch_tokens,
        batch_size=args.batch_size or (SMOKE_BATCH_SIZE if args.smoke and not args.batch_tokens else None),
        steps=steps, warmup=warmup, pipeline_steps=pipeline_steps,
        dtype=args.dtype or ("float32" if args.smoke else None), peak_tflops=args.peak_tflops,
        output_dir=Path(args.output_dir), work_dir=Path(args.work_dir) if args.work_dir else None,
        disk_test_bytes=disk_mib << 20, max_output_bytes=int(args.max_output_gib * (1 << 30)),
        baseline_device="cpu" if args.smoke else args.baseline_device, attention=args.attention, seed=args.seed,
        skip_baseline=args.skip_baseline, skip_pipeline=args.skip_pipeline, skip_disk=args.skip_disk,
        smoke=args.smoke, profile_dir=Path(args.profile_dir) if args.profile_dir else None,
        model_parallelism=args.model_parallelism)


def batch_size_for(settings: Settings, model: str, length: int) -> int:
    if settings.batch_size:
        return settings.batch_size
    tokens = settings.batch_tokens or DEFAULT_BATCH_TOKENS.get(model, FALLBACK_BATCH_TOKENS)
    return max(1, tokens // length)


# --------------------------------------------------------------------------------------------------- FLOPs


def flops_per_token(config, length: int, layers_run: int) -> float:
    """Forward FLOPs per token through the first `layers_run` layers at sequence length `length`, LM head
    excluded, as model.qwen2.forward_flops counts them (matmuls at 2 per weight, plus causal attention scores
    and values: about 4 * length * heads * head_dim / 2 per layer)."""
    from model import CaptureSpec
    from model.qwen2 import forward_flops

    spec = CaptureSpec(hooks=(HOOK,), layers=(layers_run - 1,))
    return forward_flops(config, 1, length, spec) / length


def default_peak_tflops(device_kind: str, platform_name: str, dtype: str) -> Optional[float]:
    if platform_name == "cpu" or dtype != "bfloat16":
        return None
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def _mfu(tokens_per_s, flops_token, peak_tflops):
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


# --------------------------------------------------------------------------------------------------- disk


def disk_write_bandwidth(directory: Path, total_bytes: int, chunk_bytes: int = 64 << 20) -> dict:
    """Sequential write of `total_bytes` incompressible bytes into `directory`, fsync'd before the clock stops
    (so the page cache cannot flatter it); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(min(chunk_bytes, total_bytes))
    path = directory / "disk-bandwidth.tmp"
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        while written < total_bytes:
            view = memoryview(chunk)[: total_bytes - written]
            while view:
                n = os.write(fd, view)
                written += n
                view = view[n:]
        os.fsync(fd)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"path": str(directory), "bytes": written, "seconds": seconds, "bytes_per_s": written / seconds,
            "method": "os.write of 64 MiB chunks, then fsync, page cache not bypassed"}


# --------------------------------------------------------------------------------------------------- inputs


def token_batches(count: int, batch_size: int, length: int, seed: int):
    """`count` (tokens, segment_ids, positions) int32 batches: full rows of random ordinary token ids, one
    sequence per row, no padding. The same arrays feed ours and the baseline."""
    import numpy as np

    rng = np.random.default_rng([seed, batch_size, length])
    segment_ids = np.ones((batch_size, length), np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
    return [(rng.integers(0, MAX_ORDINARY_TOKEN, (batch_size, length), dtype=np.int32), segment_ids, positions)
            for _ in range(count)]


_WORDS = (
    "grid cell colour row column pattern object shape square line border corner fill copy move rotate mirror "
    "flip count largest smallest left right top bottom inside outside background foreground red blue green "
    "yellow black grey orange purple pink brown rule example input output test answer puzzle symmetry repeat "
    "extend connect gravity fall stack sort group match transform scale crop tile overlay hole path"
).split()


def single_token_words(tokenizer) -> list[str]:
    """Words that are one token both alone and after a space, so a document of n of them is n tokens."""
    def one(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1

    words = [w for w in _WORDS if one(w) and one(" " + w)]
    if len(words) < 8:
        raise BenchError("the tokenizer splits the benchmark's word list into several tokens per word; "
                         "pipeline/bench.py _WORDS needs words that are single tokens of this tokenizer")
    return words


def write_text_corpus(path: Path, tokenizer, num_docs: int, doc_tokens: int, seed: int) -> int:
    """A JSONL corpus (`text` column) of `num_docs` documents of `doc_tokens` single-token words each, so the
    pipeline's text path cuts each into one chunk that fills one row of a `doc_tokens` batch exactly (no
    padding, like the baseline's batches). Returns the token count as the tokenizer sees it."""
    import numpy as np

    rng = np.random.default_rng([seed, num_docs, doc_tokens])
    words = single_token_words(tokenizer)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            text = " ".join(rng.choice(words, doc_tokens))
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            f.write(json.dumps({"text": text}) + "\n")
    return total


def bench_samples(tokens, batch_index: int) -> tuple[list[dict], list[tuple[int, int, int, int]]]:
    """TokenizedSample dicts and placements for a full random batch (one sample per row), so the baseline
    writes through the same `ShardWriter` as the pipeline, with the same columns."""
    import numpy as np

    from transforms.annotations import text_annotations

    rows, length = tokens.shape
    annotations = text_annotations(length)
    samples = [{
        "sample_id": f"bench/b{batch_index}/r{row}", "dataset": "bench", "task_id": f"b{batch_index}r{row}",
        "test_index": 0, "augmentation": "{}", "prompt": "", "token_ids": np.asarray(tokens[row]),
        "annotations": annotations,
    } for row in range(rows)]
    return samples, [(row, row, 0, length) for row in range(rows)]


def estimated_bytes_per_token(config, num_layers: int, dtype: str) -> float:
    """Parquet bytes per token of `num_layers` layers, on the high side (it caps what a run writes): bf16 storage
    measured 1.56-1.60 bytes per value, float32 storage of float32 compute 3.7 (docs/format.md)."""
    return num_layers * config.hidden_size * (2.3 if dtype == "bfloat16" else 4.1)


def capped_batches(wanted: int, config, num_layers: int, dtype: str, batch_tokens: int, cap_bytes: int) -> int:
    per_batch = estimated_bytes_per_token(config, num_layers, dtype) * batch_tokens
    return max(1, min(wanted, int(cap_bytes // max(per_batch, 1))))


# --------------------------------------------------------------------------------------------------- (c) baseline


def choose_baseline_device(setting: str, jax_platform: str) -> tuple[Optional[str], Optional[str]]:
    """(torch device, reason when skipped)."""
    import torch

    if setting == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--baseline_device=cuda but torch sees no CUDA device (torch "
                             f"{torch.__version__}); install a CUDA build of torch or pass --skip_baseline")
        return "cuda", None
    if setting == "cpu":
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    if jax_platform == "cpu":
        return "cpu", None
    return None, (f"JAX runs on {jax_platform} but torch has no accelerator here: a CPU baseline would not be "
                  "comparable (pass --baseline_device=cpu to run it anyway)")


def build_reference_model(config, dtype: str, device: str, seed: int):
    """transformers' Qwen2ForCausalLM of `config` with random weights, SDPA attention, on `device`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    hf_config = Qwen2Config(**fields)
    hf_config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    # Initialised on the device itself: a 7B model initialised on CPU would take minutes.
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                              dtype=getattr(torch, dtype))
    return model.eval()


def save_checkpoint(model, directory: Path) -> Path:
    """safetensors weights + config.json + the Qwen2.5 tokenizer: what `load_model` and the pipeline read."""
    from model.tokenizer import write_qwen25_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_qwen25_tokenizer(directory)
    return directory


def _torch_to_numpy(tensor):
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _TorchDevice:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> Optional[int]:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    def ids(self, batch):
        return self.torch.from_numpy(batch[0]).to(self.device, dtype=self.torch.long, non_blocking=True)


def baseline_forward(model, device: _TorchDevice, batches, warmup: int) -> dict:
    """transformers' forward through every layer (Qwen2Model, no LM head, no hidden states kept)."""
    torch = device.torch
    tokens_per_batch = batches[0][0].size
    device.reset_peak()
    with torch.inference_mode():
        started = time.perf_counter()
        model.model(input_ids=device.ids(batches[0]), use_cache=False)
        device.sync()
        first_s = time.perf_counter() - started
        for batch in batches[1:1 + warmup]:
            model.model(input_ids=device.ids(batch), use_cache=False)
        device.sync()
        timed = batches[1 + warmup:]
        started = time.perf_counter()
        for batch in timed:
            model.model(input_ids=device.ids(batch), use_cache=False)
        device.sync()
        seconds = time.perf_counter() - started
    return {"forward_tok_s": tokens_per_batch * len(timed) / seconds, "forward_s": seconds,
            "first_call_s": first_s, "steps": len(timed), "peak_device_bytes": device.peak_bytes()}


def baseline_copy_and_write(model, device: _TorchDevice, batches, warmup: int, layers, write_batches: int,
                            out_dir: Path, model_name: str, dtype: str) -> dict:
    """output_hidden_states=True, the requested layers copied to host with .cpu(), then (for the first
    `write_batches` timed batches) written by transforms.write.ShardWriter, one step after the other as a
    plain transformers script would. hidden_states[l + 1] is the output of layer l (transformers' last entry
    is the final-normed value; the bytes moved and written are the same)."""
    from transforms.extract import transfer_dtype
    from transforms.write import ShardWriter

    torch = device.torch
    storage = dtype  # what the pipeline stores by default (--activation_dtype=auto): the compute dtype, exactly
    writer = ShardWriter(str(out_dir), "base", model_name, dtype, storage)
    rows, length = batches[0][0].shape
    tokens_per_batch = rows * length
    assert transfer_dtype(dtype, storage) == dtype  # what crosses to host is the compute dtype, as for ours
    device.reset_peak()
    copy_s = write_s = 0.0
    written_tokens = written_bytes = 0
    with torch.inference_mode():
        for index, batch in enumerate(batches):
            timed = index >= 1 + warmup
            started = time.perf_counter()
            out = model.model(input_ids=device.ids(batch), output_hidden_states=True, use_cache=False)
            host = [out.hidden_states[layer + 1].cpu() for layer in layers]
            del out
            copied = time.perf_counter()
            if index == 0:
                # Copies, so the whole first batch is not kept alive through a view.
                first_rows = {layer: _torch_to_numpy(h[0]).copy() for layer, h in zip(layers, host)}
            if timed:
                copy_s += copied - started
            if timed and index - (1 + warmup) < write_batches:
                samples, placements = bench_samples(batch[0], index)
                activations = {(HOOK, layer): _torch_to_numpy(h).reshape(tokens_per_batch, -1)
                               for layer, h in zip(layers, host)}
                summary = writer.write_shard(f"{index:016x}", samples, placements, activations)
                written_tokens += summary["tokens"]
                written_bytes += summary["bytes"]
                write_s += time.perf_counter() - copied
    started = time.perf_counter()
    os.sync()  # the page cache must not flatter the baseline's writes any more than the pipeline's
    write_s += time.perf_counter() - started
    steps = len(batches) - 1 - warmup
    copy_rate = tokens_per_batch * steps / copy_s
    write_rate = None
    if written_tokens:
        # forward + copy + write, one after the other: per-token copy time plus per-token write time.
        write_rate = 1.0 / (1.0 / copy_rate + write_s / written_tokens)
    return {"copy_tok_s": copy_rate, "copy_s": copy_s, "write_tok_s": write_rate, "write_s": write_s,
            "written_tokens": written_tokens, "bytes_written": written_bytes,
            "write_bytes_per_s": written_bytes / write_s if write_s and written_bytes else None,
            "write_steps": min(write_batches, steps), "steps": steps, "peak_device_bytes_copy": device.peak_bytes(),
            "_first_rows": first_rows}


# --------------------------------------------------------------------------------------------------- (a) ours


def device_memory() -> dict:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def ours_forward(model, batches, warmup: int) -> dict:
    """Every layer, output left on the device: the accelerator's own speed. Batch n+1 is dispatched before
    batch n is waited for."""
    import jax

    from model import CaptureSpec

    spec = CaptureSpec(hooks=(HOOK,), layers=(model.config.num_hidden_layers - 1,))
    tokens_per_batch = batches[0][0].size
    started = time.perf_counter()
    jax.block_until_ready(model.capture(*batches[0], spec))
    compile_s = time.perf_counter() - started
    pending = None
    for batch in batches[1:1 + warmup]:
        out = model.capture(*batch, spec)
        if pending is not None:
            jax.block_until_ready(pending)
        pending = out
    jax.block_until_ready(pending)
    timed = batches[1 + warmup:]
    pending = None
    started = time.perf_counter()
    for batch in timed:
        out = model.capture(*batch, spec)
        if pending is not None:
            jax.block_until_ready(pending)
        pending = out
    jax.block_until_ready(pending)
    seconds = time.perf_counter() - started
    return {"forward_tok_s": tokens_per_batch * len(timed) / seconds, "forward_s": seconds,
            "forward_compile_s": compile_s, "steps": len(timed)}


def ours_copy(model, batches, warmup: int, layers, dtype: str, profile=None) -> dict:
    """The requested hooks copied to host in the dtype the extractor moves (transforms.extract.transfer_dtype),
    batch n+1 dispatched and its copy started before batch n is fetched, as ExtractActivations does."""
    import numpy as np

    from model import CaptureSpec
    from model.hooks import hook_name
    from transforms.extract import transfer_dtype

    spec = CaptureSpec(hooks=(HOOK,), layers=tuple(layers), out_dtype=transfer_dtype(dtype, dtype))
    tokens_per_batch = batches[0][0].size
    started = time.perf_counter()
    first = {name: np.asarray(value) for name, value in model.capture(*batches[0], spec).items()}
    compile_s = time.perf_counter() - started
    host_bytes = sum(v.nbytes for v in first.values())
    first_rows = {layer: first[hook_name(layer, HOOK)][0].copy() for layer in layers}
    del first

    def run(selected):
        pending = None
        for batch in selected:
            out = model.capture(*batch, spec)
            for value in out.values():
                value.copy_to_host_async()
            if pending is not None:
                for value in pending.values():
                    np.asarray(value)
            pending = out
        if pending is not None:
            for value in pending.values():
                np.asarray(value)

    run(batches[1:1 + warmup])
    timed = batches[1 + warmup:]
    with profile or contextlib.nullcontext():
        started = time.perf_counter()
        run(timed)
        seconds = time.perf_counter() - started
    return {"copy_tok_s": tokens_per_batch * len(timed) / seconds, "copy_s": seconds, "compile_s": compile_s,
            "host_bytes_per_token": host_bytes / tokens_per_batch, "steps": len(timed), "_first_rows": first_rows}


def agreement(ours_rows: dict, baseline_rows: dict, num_layers: int, dtype: str) -> Optional[dict]:
    """Ours against transformers on the first row of the first batch: proof that both ran the same weights on
    the same tokens. The last layer is left out: transformers' last hidden state is the final-normed value.
    The error is relative to the largest magnitude of the reference (bf16 keeps ~3 significant digits, and
    random-weight residual streams accumulate it over layers)."""
    import numpy as np

    layers = [layer for layer in baseline_rows if layer in ours_rows and layer < num_layers - 1]
    if not layers:
        return None
    worst = 0.0
    for layer in layers:
        ours = np.asarray(ours_rows[layer], np.float32)
        ref = np.asarray(baseline_rows[layer], np.float32)
        worst = max(worst, float(np.abs(ours - ref).max() / max(float(np.abs(ref).max()), 1e-30)))
    tolerance = AGREEMENT_TOLERANCE[dtype]
    return {"layers": layers, "max_relative_error": worst, "tolerance": tolerance, "ok": worst <= tolerance}


def profiled(profile_dir: Optional[Path], name: str):
    """A JAX profiler trace of the block under profile_dir/name, or nothing."""
    if profile_dir is None:
        return contextlib.nullcontext()
    import jax

    return jax.profiler.trace(str(profile_dir / name))


class _Placeholder:
    """A weak-referenceable nothing, for release_pipeline_model."""


def release_pipeline_model() -> None:
    """Lets the pipeline's model go after a run. Beam's `Shared` deliberately keeps the most recently acquired
    object alive (so a worker does not reload between bundles), which after `pipeline.run.main` returns is the
    extractor's model: the next run would load a second copy of the weights beside it. Acquiring a placeholder
    through the same public API takes that place."""
    from apache_beam.utils import shared

    shared.Shared().acquire(_Placeholder)
    free_jax_memory()


def free_jax_memory() -> None:
    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


# --------------------------------------------------------------------------------------------------- (b) pipeline


def shard_commits(output_root: Path) -> list[dict]:
    """Committed shards in commit order: commit time (the samples file's mtime), tokens and bytes."""
    from transforms.write import committed_shards

    shards = []
    for shard, meta in committed_shards(str(output_root)).items():
        marker = output_root / meta["path"]
        activation_bytes = sum(int(f["bytes"]) for f in meta["files"])
        shards.append({"shard": shard, "committed": marker.stat().st_mtime, "tokens": int(meta["num_tokens"]),
                       "activation_bytes": activation_bytes, "bytes": activation_bytes + marker.stat().st_size})
    return sorted(shards, key=lambda s: s["committed"])


def pipeline_rates(shards: list[dict], main_s: float, sync_s: float) -> dict:
    """Throughput of the running pipeline from its shard commits: the tokens and bytes of every shard after
    the first, over the time from the first commit to the last (`steady`), plus the time the `os.sync()` after
    the run took to flush what the page cache still held (`durable`: what the disk absorbed, not what memory
    did). Startup, reading, tokenizing, model loading and compilation all happen before the first commit, and
    the manifest after the last, so they fall outside both; `end_to_end` keeps everything."""
    tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    out = {"shards": len(shards), "tokens": tokens, "bytes_written": total_bytes,
           "activation_bytes": sum(s["activation_bytes"] for s in shards), "main_s": main_s, "sync_s": sync_s,
           "end_to_end_tok_s": tokens / (main_s + sync_s) if tokens else None,
           "end_to_end_bytes_per_s": total_bytes / (main_s + sync_s) if tokens else None,
           "steady_tok_s": None, "steady_bytes_per_s": None, "durable_tok_s": None, "durable_bytes_per_s": None}
    if len(shards) >= 2:
        later_tokens = sum(s["tokens"] for s in shards[1:])
        later_bytes = sum(s["bytes"] for s in shards[1:])
        window = shards[-1]["committed"] - shards[0]["committed"]
        durable = window + sync_s
        if window > 0:
            out["steady_tok_s"] = later_tokens / window
            out["steady_bytes_per_s"] = later_bytes / window
        if durable > 0:
            out["durable_tok_s"] = later_tokens / durable
            out["durable_bytes_per_s"] = later_bytes / durable
    # The headline number is the conservative one that exists.
    if out["durable_tok_s"]:
        out["tok_s"], out["bytes_per_s"], out["rate_basis"] = (
            out["durable_tok_s"], out["durable_bytes_per_s"], "durable")
    else:
        out["tok_s"], out["bytes_per_s"], out["rate_basis"] = (
            out["end_to_end_tok_s"], out["end_to_end_bytes_per_s"], "end_to_end")
    return out


def run_pipeline(model_source: str, layers, length: int, batch_size: int, num_batches: int, dtype: str,
                 attention: str, tokenizer, work: Path, seed: int, profile=None, model_parallelism: int = 1) -> dict:
    """`python -m pipeline.run` in this process (pipeline.run.main) on a synthetic text corpus of
    `num_batches` full batches, on the local runner, into Parquet under `work`."""
    from pipeline import run as pipeline_run

    corpus = work / f"corpus-{length}-{batch_size}-{num_batches}.jsonl"
    corpus_tokens = write_text_corpus(corpus, tokenizer, num_batches * batch_size, length, seed)
    output = work / "pipeline-output"
    shutil.rmtree(output, ignore_errors=True)
    argv = [
        "--runner=DirectRunner", f"--model={model_source}", f"--dataset=text:{corpus}", f"--output={output}",
        f"--layers={','.join(str(layer) for layer in layers)}", f"--hooks={HOOK}", f"--dtype={dtype}",
        f"--batch_size={batch_size}", f"--max_seq_len={length}", f"--attention={attention}",
        f"--model_parallelism={model_parallelism}", "--progress_interval=0",
    ]
    # Beam builds default PipelineOptions from sys.argv in places; this process's argv holds the bench's flags,
    # which Beam would report as unparseable, so the pipeline sees exactly its own command line.
    saved_argv, sys.argv = sys.argv, ["python -m pipeline.run", *argv]
    try:
        with profile or contextlib.nullcontext():
            started = time.perf_counter()
            code = pipeline_run.main(argv)
            main_s = time.perf_counter() - started
    finally:
        sys.argv = saved_argv
    if code != 0:
        raise BenchError(f"python -m pipeline.run {' '.join(argv)} exited with {code} (its error is above)")
    started = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - started
    shards = shard_commits(output)
    result = pipeline_rates(shards, main_s, sync_s)
    result.update({"argv": argv, "corpus_tokens": corpus_tokens, "batches": num_batches})
    if result["tokens"] != corpus_tokens:
        raise BenchError(f"the pipeline wrote {result['tokens']:,} tokens for a corpus of {corpus_tokens:,} "
                         f"({output}): tokens were lost or duplicated")
    shutil.rmtree(output, ignore_errors=True)
    corpus.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------------------------------- report


def case_ratios(entry: dict, disk: Optional[dict]) -> dict:
    ours, base, pipe = entry.get("ours") or {}, entry.get("baseline") or {}, entry.get("pipeline") or {}
    return {
        "forward_vs_baseline": _ratio(ours.get("forward_tok_s"), base.get("forward_tok_s")),
        "copy_vs_baseline": _ratio(ours.get("copy_tok_s"), base.get("copy_tok_s")),
        "pipeline_vs_baseline_copy": _ratio(pipe.get("tok_s"), base.get("copy_tok_s")),
        "pipeline_vs_baseline_write": _ratio(pipe.get("tok_s"), base.get("write_tok_s")),
        "pipeline_vs_ours_forward": _ratio(pipe.get("tok_s"), ours.get("forward_tok_s")),
        "pipeline_vs_disk": _ratio(pipe.get("bytes_per_s"), (disk or {}).get("bytes_per_s")),
        "baseline_write_vs_disk": _ratio(base.get("write_bytes_per_s"), (disk or {}).get("bytes_per_s")),
    }


def check_targets(cases: list[dict], device_kind: str) -> list[dict]:
    """Issue 5's targets for every case and length that ran: pass, fail, or not measured (with why)."""
    on_target_device = any(name.lower() in device_kind.lower() for name in TARGET_DEVICES)
    results = []
    for target_id, model, layers_mode, metric, threshold, description in TARGETS:
        for entry in cases:
            if entry["model"] != model or entry["layers_mode"] != layers_mode:
                continue
            value = entry["ratios"].get(metric)
            agreed = (entry.get("agreement") or {}).get("ok")
            results.append({
                "target": target_id, "description": description, "case": entry["case"],
                "length": entry["length"], "metric": metric, "threshold": threshold, "value": value,
                "passed": None if value is None else bool(value >= threshold),
                "binding": on_target_device,
                # False: ours and transformers gave different activations, so the ratio compares different models.
                "same_model_checked": agreed,
                "note": None if on_target_device else
                f"informational: issue 5's targets are set for {' or '.join(TARGET_DEVICES)}, this is {device_kind}",
            })
    return results


def _si(value, unit="") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(results: dict) -> str:
    headers = ("case", "L", "B", "ours fwd", "ours+copy", "pipeline", "base fwd", "base+copy", "base+write",
               "fwd x", "copy x", "pipe/base", "MFU fwd", "MFU pipe", "pipe B/s", "% disk", "peak mem",
               "compile s")
    rows = []
    for e in results["cases"]:
        ours, base, pipe, r = e.get("ours") or {}, e.get("baseline") or {}, e.get("pipeline") or {}, e["ratios"]
        peak = (ours.get("device_memory") or {}).get("peak_bytes_in_use") or base.get("peak_device_bytes")
        rows.append((
            e["case"], str(e["length"]), str(e["batch_size"]),
            _si(ours.get("forward_tok_s")), _si(ours.get("copy_tok_s")), _si(pipe.get("tok_s")),
            _si(base.get("forward_tok_s")), _si(base.get("copy_tok_s")), _si(base.get("write_tok_s")),
            _x(r["forward_vs_baseline"]), _x(r["copy_vs_baseline"]), _x(r["pipeline_vs_baseline_copy"]),
            _pct(ours.get("forward_mfu")), _pct(pipe.get("mfu")), _si(pipe.get("bytes_per_s"), "B"),
            _pct(r["pipeline_vs_disk"]), _si(peak, "B"),
            "-" if ours.get("compile_s") is None else f"{ours['compile_s']:.1f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("tok/s throughout; pipeline = durable rate between shard commits (see docs/benchmarks.md); "
                 "pipe/base = pipeline over baseline forward+copy; peak mem = process peak on the device so far.")
    disk = results.get("disk")
    if disk:
        lines.append(f"disk: {_si(disk['bytes_per_s'], 'B')}/s sequential write ({_si(disk['bytes'], 'B')}, "
                     f"fsync'd) in {disk['path']}")
    for e in results["cases"]:
        if e.get("agreement") and not e["agreement"]["ok"]:
            lines.append(f"WARNING {e['case']} L={e['length']}: ours and transformers disagree (max relative error "
                         f"{e['agreement']['max_relative_error']:.3g} > {e['agreement']['tolerance']}); its ratios "
                         "compare different computations")
    for target in results["targets"]:
        verdict = "not measured" if target["passed"] is None else ("PASS" if target["passed"] else "FAIL")
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        lines.append(f"target {target['target']} L={target['length']}: {verdict} "
                     f"({target['metric']} = {value}, needs >= {target['threshold']})"
                     + ("" if target["binding"] else " [informational: not an H100/H200]"))
    for skipped in results.get("skipped", []):
        lines.append(f"skipped: {skipped}")
    for error in results.get("errors", []):
        where = ", ".join(f"{k}={v}" for k, v in error.items() if k not in ("path", "error"))
        lines.append(f"ERROR {error['path']} ({where}): {error['error']}")
    return "\n".join(lines)


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "torch", "transformers", "apache_beam", "pyarrow", "numpy", "flax"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a package absent here is recorded as absent
            versions[name] = None
    return versions


def device_description(baseline_device: Optional[str]) -> dict:
    import jax

    devices = jax.devices()
    info = {"jax_platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "host": platform.node(), "cpu_count": os.cpu_count(),
            "baseline_device": baseline_device}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
    except OSError:
        info["cpu_model"] = platform.processor() or None
    if baseline_device == "cuda":
        import torch

        info["torch_device_name"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> Optional[str]:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------- driver


def _attempt(errors: list, where: dict, path: str, function):
    """Runs one measurement. A failure (an out-of-memory on a big case, say) is printed with its traceback and
    recorded under the case and in `errors`, and the run goes on: later cases still get measured, and main()
    exits non-zero. Returns the function's result, or None when it failed."""
    try:
        return function()
    except Exception as err:  # recorded, printed and reflected in the exit code, never swallowed
        import traceback

        traceback.print_exc()
        message = f"{type(err).__name__}: {err}"
        errors.append({**where, "path": path, "error": message})
        print(f"  ERROR in {path} of {where}: {message}", file=sys.stderr, flush=True)
        return None


def run_bench(settings: Settings, argv: list[str]) -> dict:
    # Torch and JAX share the device in this process: JAX must not grab 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if settings.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from model import load_model
    from model.config import QWEN25_GEOMETRIES
    from model.tokenizer import load_tokenizer

    jax_device = jax.devices()[0]
    platform_name = jax_device.platform
    dtype = settings.dtype or ("float32" if platform_name == "cpu" else "bfloat16")
    device_peak = settings.peak_tflops or default_peak_tflops(jax_device.device_kind, platform_name, dtype)
    mesh = None
    if jax.device_count() > 1:
        # The same layout the pipeline's extractor uses on this host (transforms/extract.py).
        from model.sharding import make_mesh

        mesh = make_mesh(model=settings.model_parallelism)
    peak_tflops = device_peak * jax.device_count() if device_peak else None
    skipped: list[str] = []
    baseline_device = None
    if settings.skip_baseline:
        skipped.append("baseline: --skip_baseline")
    else:
        baseline_device, reason = choose_baseline_device(settings.baseline_device, platform_name)
        if reason:
            skipped.append(f"baseline: {reason}")
    if settings.skip_pipeline:
        skipped.append("pipeline: --skip_pipeline")
    if peak_tflops is None:
        skipped.append(f"MFU: no peak rate known for {jax_device.device_kind} in {dtype}; pass --peak_tflops")

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    own_work = settings.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench-work-", dir=settings.output_dir)) if own_work else settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": 1, "command": ["python", "-m", "pipeline.bench", *argv],
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(), "smoke": settings.smoke,
        "device": device_description(baseline_device), "software": software_versions(), "git_commit": git_commit(),
        "settings": {"dtype": dtype, "peak_tflops": peak_tflops, "peak_tflops_per_device": device_peak,
                     "mesh": dict(mesh.shape) if mesh is not None else None,
                     "steps": settings.steps, "warmup": settings.warmup,
                     "pipeline_steps": settings.pipeline_steps, "lengths": settings.lengths,
                     "cases": [c.name for c in settings.cases], "hook": HOOK, "seed": settings.seed,
                     "attention": settings.attention, "max_output_bytes": settings.max_output_bytes,
                     "profile_dir": str(settings.profile_dir) if settings.profile_dir else None},
        "disk": None, "cases": [], "targets": [], "skipped": skipped, "errors": [],
    }
    errors = results["errors"]
    tokenizer = load_tokenizer()
    try:
        if settings.skip_disk:
            skipped.append("disk bandwidth: --skip_disk")
        else:
            results["disk"] = disk_write_bandwidth(work, settings.disk_test_bytes)
            print(f"disk: {_si(results['disk']['bytes_per_s'], 'B')}/s sequential write into {work}", flush=True)
        for model_name in dict.fromkeys(c.model for c in settings.cases):
            config = QWEN25_GEOMETRIES[model_name]
            model_cases = [c for c in settings.cases if c.model == model_name]
            # Cheaper cases first, so the process-wide device memory peak read after a case is mostly its own.
            model_cases.sort(key=lambda c: c.layers_mode != "one")
            entries = {}
            for case in model_cases:
                layers = case.layers(config.num_hidden_layers)
                for length in settings.lengths:
                    batch_size = batch_size_for(settings, model_name, length)
                    entries[(case, length)] = {
                        "case": case.name, "model": model_name, "layers_mode": case.layers_mode,
                        "layers": list(layers), "length": length, "batch_size": batch_size,
                        "tokens_per_batch": batch_size * length, "dtype": dtype,
                        "flops_per_token_forward": flops_per_token(config, length, config.num_hidden_layers),
                        "flops_per_token_capture": flops_per_token(config, length, max(layers) + 1),
                        "ours": None, "baseline": None, "pipeline": None, "agreement": None,
                    }
            batches_for = {}

            def batches(batch_size, length):
                key = (batch_size, length)
                if key not in batches_for:
                    batches_for[key] = token_batches(1 + settings.warmup + settings.steps, batch_size, length,
                                                     settings.seed)
                return batches_for[key]

            model_source = f"random:{model_name}?seed={settings.seed}"
            reference_rows = {}
            if baseline_device:
                print(f"[{model_name}] transformers baseline on {baseline_device} ({dtype})", flush=True)
                device = _TorchDevice(baseline_device)

                def build():
                    model = build_reference_model(config, dtype, baseline_device, settings.seed)
                    return model, str(save_checkpoint(model, work / f"checkpoint-{model_name}"))

                built = _attempt(errors, {"model": model_name}, "baseline model", build)
                reference = None
                if built:
                    reference, model_source = built
                forward_done = {}
                for (case, length), entry in entries.items():
                    if reference is None:
                        break

                    def measure():
                        key = (entry["batch_size"], length)
                        data = batches(*key)
                        if key not in forward_done:
                            forward_done[key] = baseline_forward(reference, device, data, settings.warmup)
                        write_batches = capped_batches(settings.steps, config, len(entry["layers"]), dtype,
                                                       entry["tokens_per_batch"], settings.max_output_bytes)
                        out_dir = work / "baseline-output"
                        try:
                            copy = baseline_copy_and_write(reference, device, data, settings.warmup,
                                                           entry["layers"], write_batches, out_dir, model_source,
                                                           dtype)
                        finally:
                            shutil.rmtree(out_dir, ignore_errors=True)
                        reference_rows[(case, length)] = copy.pop("_first_rows")
                        return {**forward_done[key], **copy, "device": baseline_device}

                    entry["baseline"] = _attempt(errors, {"case": entry["case"], "length": length}, "baseline",
                                                 measure)
                    if entry["baseline"]:
                        b = entry["baseline"]
                        print(f"  {entry['case']} L={length}: forward {_si(b['forward_tok_s'])} tok/s, "
                              f"+copy {_si(b['copy_tok_s'])}, +write {_si(b['write_tok_s'])}", flush=True)
                    elif device.cuda:
                        device.torch.cuda.empty_cache()
                del reference, built
                gc.collect()
                if device.cuda:
                    device.torch.cuda.empty_cache()

            print(f"[{model_name}] ours: load_model({model_source!r}, dtype={dtype})", flush=True)
            started = time.perf_counter()
            ours = _attempt(errors, {"model": model_name}, "ours load_model",
                            lambda: load_model(model_source, dtype=dtype, mesh=mesh, attention=settings.attention))
            load_s = time.perf_counter() - started
            forward_done = {}
            for (case, length), entry in entries.items():
                if ours is None:
                    break

                def measure():
                    key = (entry["batch_size"], length)
                    data = batches(*key)
                    if key not in forward_done:
                        forward_done[key] = ours_forward(ours, data, settings.warmup)
                    copy = ours_copy(ours, data, settings.warmup, entry["layers"], dtype,
                                     profiled(settings.profile_dir, f"ours-{case.model}-{case.layers_mode}-{length}"))
                    ours_rows = copy.pop("_first_rows")
                    if (case, length) in reference_rows:
                        entry["agreement"] = agreement(ours_rows, reference_rows.pop((case, length)),
                                                       config.num_hidden_layers, dtype)
                    result = {**forward_done[key], **copy, "load_s": load_s, "device_memory": device_memory()}
                    result["forward_mfu"] = _mfu(result["forward_tok_s"], entry["flops_per_token_forward"],
                                                 peak_tflops)
                    result["copy_mfu"] = _mfu(result["copy_tok_s"], entry["flops_per_token_capture"], peak_tflops)
                    return result

                entry["ours"] = _attempt(errors, {"case": entry["case"], "length": length}, "ours", measure)
                if entry["agreement"] and not entry["agreement"]["ok"]:
                    print(f"  WARNING: ours and transformers disagree on {entry['case']} L={length} "
                          f"(max relative error {entry['agreement']['max_relative_error']:.3g} > "
                          f"{entry['agreement']['tolerance']}): they did not run the same model, so the "
                          "ratios of this case compare different things", flush=True)
                if entry["ours"]:
                    o = entry["ours"]
                    print(f"  {entry['case']} L={length}: forward {_si(o['forward_tok_s'])} tok/s, "
                          f"+copy {_si(o['copy_tok_s'])}, compile {o['compile_s']:.1f} s", flush=True)
            del ours
            batches_for.clear()
            free_jax_memory()

            if not settings.skip_pipeline:
                for (case, length), entry in entries.items():
                    num_batches = max(2, capped_batches(settings.pipeline_steps, config, len(entry["layers"]),
                                                        dtype, entry["tokens_per_batch"], settings.max_output_bytes))
                    print(f"[{model_name}] pipeline {entry['case']} L={length}: {num_batches} batches", flush=True)

                    def measure():
                        result = run_pipeline(model_source, entry["layers"], length, entry["batch_size"],
                                              num_batches, dtype, settings.attention, tokenizer, work, settings.seed,
                                              profiled(settings.profile_dir,
                                                       f"pipeline-{case.model}-{case.layers_mode}-{length}"),
                                              settings.model_parallelism)
                        result["mfu"] = _mfu(result["tok_s"], entry["flops_per_token_capture"], peak_tflops)
                        result["bytes_per_value"] = (
                            result["activation_bytes"] / (result["tokens"] * len(entry["layers"]) * config.hidden_size)
                            if result["tokens"] else None)
                        result["device_memory"] = device_memory()
                        return result

                    entry["pipeline"] = _attempt(errors, {"case": entry["case"], "length": length}, "pipeline",
                                                 measure)
                    if entry["pipeline"]:
                        r = entry["pipeline"]
                        print(f"  pipeline: {_si(r['tok_s'])} tok/s ({r['rate_basis']}), "
                              f"{_si(r['bytes_per_s'], 'B')}/s, end to end {_si(r['end_to_end_tok_s'])} tok/s",
                              flush=True)
                    release_pipeline_model()
            shutil.rmtree(work / f"checkpoint-{model_name}", ignore_errors=True)
            for entry in entries.values():
                entry["weights"] = (f"transformers Qwen2ForCausalLM random init (seed {settings.seed}), saved with "
                                    "save_pretrained and loaded by ours and the pipeline" if baseline_device
                                    else model_source)
                entry["ratios"] = case_ratios(entry, results["disk"])
                results["cases"].append(entry)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    results["targets"] = check_targets(results["cases"], jax_device.device_kind)
    results["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    try:
        results = run_bench(settings, argv)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = settings.output_dir / f"bench-{stamp}{'-smoke' if settings.smoke else ''}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(format_table(results))
    print(f"results: {path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
