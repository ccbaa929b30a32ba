"""The bench's verdicts and output: ratios, targets, the printed table and the JSON results file."""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Optional

# The targets, as ratios against the baseline (or the disk) in the same run.
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


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def case_ratios(entry: dict, disk: Optional[dict]) -> dict:
    ours, base, pipe = entry.get("ours") or {}, entry.get("baseline") or {}, entry.get("pipeline") or {}
    return {
        "forward_vs_baseline": ratio(ours.get("forward_tok_s"), base.get("forward_tok_s")),
        "copy_vs_baseline": ratio(ours.get("copy_tok_s"), base.get("copy_tok_s")),
        "pipeline_vs_baseline_copy": ratio(pipe.get("tok_s"), base.get("copy_tok_s")),
        "pipeline_vs_baseline_write": ratio(pipe.get("tok_s"), base.get("write_tok_s")),
        "pipeline_vs_ours_forward": ratio(pipe.get("tok_s"), ours.get("forward_tok_s")),
        "pipeline_vs_disk": ratio(pipe.get("bytes_per_s"), (disk or {}).get("bytes_per_s")),
        "baseline_write_vs_disk": ratio(base.get("write_bytes_per_s"), (disk or {}).get("bytes_per_s")),
    }


def check_targets(cases: list[dict], device_kind: str) -> list[dict]:
    """The targets for every case and length that ran: pass, fail, or not measured (with why)."""
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
                f"informational: the targets are set for {' or '.join(TARGET_DEVICES)}, this is {device_kind}",
            })
    return results


def si(value, unit="") -> str:
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


TABLE_HEADERS = ("case", "L", "B", "ours fwd", "ours+copy", "pipeline", "base fwd", "base+copy", "base+write",
                 "fwd x", "copy x", "pipe/base", "MFU fwd", "MFU pipe", "pipe B/s", "% disk", "peak mem",
                 "compile s")


def _case_row(e: dict) -> tuple[str, ...]:
    ours, base, pipe, r = e.get("ours") or {}, e.get("baseline") or {}, e.get("pipeline") or {}, e["ratios"]
    peak = (ours.get("device_memory") or {}).get("peak_bytes_in_use") or base.get("peak_device_bytes")
    return (
        e["case"], str(e["length"]), str(e["batch_size"]),
        si(ours.get("forward_tok_s")), si(ours.get("copy_tok_s")), si(pipe.get("tok_s")),
        si(base.get("forward_tok_s")), si(base.get("copy_tok_s")), si(base.get("write_tok_s")),
        _x(r["forward_vs_baseline"]), _x(r["copy_vs_baseline"]), _x(r["pipeline_vs_baseline_copy"]),
        _pct(ours.get("forward_mfu")), _pct(pipe.get("mfu")), si(pipe.get("bytes_per_s"), "B"),
        _pct(r["pipeline_vs_disk"]), si(peak, "B"),
        "-" if ours.get("compile_s") is None else f"{ours['compile_s']:.1f}",
    )


def aligned(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return (["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
            + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows])


def format_table(results: dict) -> str:
    lines = []
    if results["cases"]:
        lines = aligned(TABLE_HEADERS, [_case_row(e) for e in results["cases"]])
        lines.append("tok/s throughout; pipeline = durable rate between shard commits (see docs/benchmarks.md); "
                     "pipe/base = pipeline over baseline forward+copy; peak mem = process peak on the device so far.")
    disk = results.get("disk")
    if disk:
        lines.append(f"disk: {si(disk['bytes_per_s'], 'B')}/s sequential write ({si(disk['bytes'], 'B')}, "
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
    if results.get("host_ceiling"):
        from pipeline.bench.host_ceiling import format_host_ceiling

        lines.extend(format_host_ceiling(results["host_ceiling"]))
    for skipped in results.get("skipped", []):
        lines.append(f"skipped: {skipped}")
    for error in results.get("errors", []):
        where = ", ".join(f"{k}={v}" for k, v in error.items() if k not in ("path", "error"))
        lines.append(f"ERROR {error['path']} ({where}): {error['error']}")
    return "\n".join(lines)


def software() -> dict:
    """The pipeline's software versions plus torch, which only the baseline uses."""
    from pipeline.run import software_versions

    versions = software_versions()
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # a CPU-only or TPU host without torch: recorded as absent
        versions["torch"] = None
    return versions


def git_commit() -> Optional[str]:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def write_results(results: dict, output_dir: Path, smoke: bool) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = output_dir / f"bench-{stamp}{'-smoke' if smoke else ''}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
