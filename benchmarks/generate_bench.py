"""Generation benchmark: generated tokens/s of model/generate.py against transformers' greedy `generate` on the
same weights, batch and lengths, in one process.

Not a test: it prints a Markdown table for docs/benchmarks.md ("## Generation"). The weights are one random
transformers Qwen2ForCausalLM of the geometry, saved with save_pretrained and loaded by both sides (as
pipeline/bench/baseline.py builds its matching models). Every row gets the same prompt length and exactly --new_tokens
tokens (no stop sequence for ours, min_new_tokens for transformers), so both sides do the same work.

    python -m benchmarks.generate_bench --model 'random:qwen2.5-0.5b?layers=4' --batch 8 --prompt_len 1024 \\
        --new_tokens 256

Each side runs once with --new_tokens and once with one new token (prefill only), after a warm-up of each shape
(compilation for ours, on a batch that stops at once); "decode" is the difference, so its tokens/s exclude the prompt. The share outside the device
loop is our host work (padding, transfers, fetching and trimming the outputs) over our end-to-end time.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _ours(model, prompts, new_tokens):
    from model.generate import generate

    result = generate(model, prompts, new_tokens, stop_sequences=())
    assert all(len(t) == new_tokens for t in result.tokens)
    return result.timings["total_s"], result


def _theirs(torch_model, ids, new_tokens):
    import torch

    with torch.inference_mode():
        started = time.perf_counter()
        out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        elapsed = time.perf_counter() - started
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed, out[:, ids.shape[1]:].numpy()


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-0.5b?layers=4", help="a random: geometry spec")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    import jax
    import torch

    from model import load_model
    from model.config import parse_random_spec
    from pipeline.bench.baseline import build_reference_model, save_checkpoint

    random_spec = parse_random_spec(args.model)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, 151643, size=(args.batch, args.prompt_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as work:
        torch_model = build_reference_model(random_spec.config, args.dtype, "cpu", random_spec.seed)
        ours_model = load_model(str(save_checkpoint(torch_model, Path(work) / "checkpoint")), dtype=args.dtype,
                                attention="xla")
    ids = torch.from_numpy(prompts.astype(np.int64))
    rows = list(prompts)

    report = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "dtype": args.dtype, "jax_backend": jax.default_backend(),
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count()}
    # Warm-up: compilation (ours) and first-call allocations (both). Ours compiles the full-length program on a
    # batch of one repeated prompt that stops on its first token: same shapes, one decode step instead of all.
    from model.generate import StopSequence, generate

    first = int(_ours(ours_model, rows, 1)[1].tokens[0][0])
    generate(ours_model, [rows[0]] * args.batch, args.new_tokens, stop_sequences=(StopSequence("warm-up", (first,)),))
    # transformers compiles nothing: a short prompt warms its first-call allocations.
    _theirs(torch_model, ids[:, :32], 2)

    # Printed as measured, so a run stopped by a timeout still reports what it finished.
    ours_prefill, _ = _ours(ours_model, rows, 1)
    ours_total, result = _ours(ours_model, rows, args.new_tokens)
    print(f"ours: prefill {ours_prefill:.1f} s, end to end {ours_total:.1f} s, timings {result.timings}", flush=True)
    theirs_prefill, _ = _theirs(torch_model, ids, 1)
    print(f"transformers: prefill {theirs_prefill:.1f} s", flush=True)
    theirs_total, theirs_tokens = _theirs(torch_model, ids, args.new_tokens)

    same = [int(np.array_equal(a, b)) for a, b in zip(result.tokens, theirs_tokens)]
    report.update(_speeds(args, result, same, ours_total, ours_prefill, theirs_total, theirs_prefill))
    _print_report(report, args)
    return report


def _speeds(args, result, same, ours_total, ours_prefill, theirs_total, theirs_prefill) -> dict:
    generated = args.batch * args.new_tokens
    decoded = args.batch * (args.new_tokens - 1)
    outside = result.timings["total_s"] - result.timings["device_s"]
    report = {
        "ours_total_s": ours_total, "ours_prefill_s": ours_prefill,
        "theirs_total_s": theirs_total, "theirs_prefill_s": theirs_prefill,
        "ours_tokens_per_s": generated / ours_total, "theirs_tokens_per_s": generated / theirs_total,
        "ours_decode_tokens_per_s": decoded / max(ours_total - ours_prefill, 1e-9),
        "theirs_decode_tokens_per_s": decoded / max(theirs_total - theirs_prefill, 1e-9),
        "outside_device_loop_s": outside, "outside_device_loop_share": outside / ours_total,
        "ours_timings": result.timings, "rows_with_identical_ids": sum(same),
    }
    report["speedup"] = report["ours_tokens_per_s"] / report["theirs_tokens_per_s"]
    report["decode_speedup"] = report["ours_decode_tokens_per_s"] / report["theirs_decode_tokens_per_s"]
    return report


def _print_report(report: dict, args) -> None:
    outside = report["outside_device_loop_s"]
    print(json.dumps(report, indent=2))
    print()
    print("| | end to end s | prefill s | generated tokens/s | decode tokens/s |")
    print("|---|---|---|---|---|")
    for side in ("ours", "theirs"):
        name = "ours (model/generate.py)" if side == "ours" else "transformers generate"
        print(f"| {name} | {report[side + '_total_s']:.1f} | {report[side + '_prefill_s']:.1f} | "
              f"{report[side + '_tokens_per_s']:.1f} | {report[side + '_decode_tokens_per_s']:.1f} |")
    print(f"\nspeed-up {report['speedup']:.2f}x end to end, {report['decode_speedup']:.2f}x decode; outside the "
          f"device loop: {outside * 1e3:.1f} ms = {100 * report['outside_device_loop_share']:.2f}% of ours; "
          f"rows with identical ids: {report['rows_with_identical_ids']}/{args.batch}")


if __name__ == "__main__":
    main()
