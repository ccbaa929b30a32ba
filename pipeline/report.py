"""`python -m pipeline.report OUTPUT [--out DIR]`: a look at the activations before training on them.

Writes DIR/index.html (default OUTPUT/report/; one page, inline CSS, no scripts, nothing fetched from the network)
and the PNG figures it shows, from OUTPUT/stats.json (recomputed from the activations when the output has none):
mean and p1 / p50 / p99 token norm against layer for each hook; the norm histogram of each layer; per-dimension
mean and std with the massive dimensions labelled; mean norm by prompt part; a row x column heat map of mean norm
over grid cells; the tokens of largest norm with their text; and the run's facts from manifest.json and _runs/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import io
import os
import sys
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms import activation_stats as S
from transforms.annotations import PART_NAMES

REPORT_DIR = "report"
FIG_SIZE = (8.0, 4.5)
DPI = 100
# A dimension is "massive" when its largest |value| is this many times the median over dimensions of that
# largest |value| (massive activations sit orders of magnitude above the rest); at most MAX_LABELS are named.
MASSIVE_FACTOR = 20.0
MAX_LABELS = 8
PERCENTILES = (1, 50, 99)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
code { background: #f6f6f6; padding: 0 0.2em; } .note { color: #666; font-size: 0.9em; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, rows=1, cols=1, size=FIG_SIZE):
    return plt.subplots(rows, cols, figsize=size, dpi=DPI, squeeze=False)


def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=DPI)  # no bbox_inches: every PNG keeps its figure size
    plt.close(fig)
    return name


def _layer_axis(ax, layers) -> None:
    from matplotlib.ticker import MaxNLocator

    if len(layers) <= 16:
        ax.set_xticks(sorted(layers))
        if len(layers) == 1:
            ax.set_xlim(layers[0] - 1, layers[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _some_minor(value, _=None) -> str:
    """Labels the 2x and 5x minor ticks of a log axis, so a span of under two decades still reads."""
    leading = f"{value:.0e}"[0]
    return f"{value:g}" if leading in "25" else ""


def _norm_scale(ax, values, axis="y") -> None:
    """Log scale when the values span more than a factor of 10, plain numbers on the ticks either way."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if not finite or max(finite) / min(finite) <= 10:
        return
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(_some_minor) if max(finite) / min(finite) < 100 else NullFormatter())


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _hooks(stats: dict) -> dict[str, list[S.LayerStats]]:
    hooks: dict[str, list[S.LayerStats]] = {}
    for key in sorted(stats):
        hooks.setdefault(key[0], []).append(stats[key])
    return hooks


def massive_dimensions(stats: S.LayerStats) -> list[int]:
    """Dimensions whose largest |value| is at least MASSIVE_FACTOR times the median dimension's, largest first."""
    peak = np.maximum(np.abs(np.where(np.isfinite(stats.dim_min), stats.dim_min, 0)),
                      np.abs(np.where(np.isfinite(stats.dim_max), stats.dim_max, 0)))
    median = float(np.median(peak)) if peak.size else 0.0
    if median <= 0:
        return []
    found = np.flatnonzero(peak >= MASSIVE_FACTOR * median)
    return [int(i) for i in found[np.argsort(-peak[found], kind="stable")][:MAX_LABELS]]


# ------------------------------------------------------------------------------------------------ figures

def plot_norms_by_layer(plt, hooks, out_dir) -> str:
    fig, axes = _figure(plt, 1, len(hooks), (max(FIG_SIZE[0], 4.0 * len(hooks)), FIG_SIZE[1]))
    for ax, (hook, layers) in zip(axes[0], hooks.items()):
        x = [s.layer for s in layers]
        ax.plot(x, [s.mean_norm() or np.nan for s in layers], "o-", label="mean", color="black")
        for q, style in zip(PERCENTILES, (":", "--", ":")):
            ax.plot(x, [s.norm_percentile(q) or np.nan for s in layers], style, marker=".", label=f"p{q}")
        ax.set_title(hook)
        ax.set_xlabel("layer")
        _layer_axis(ax, x)
        _norm_scale(ax, [s.norm_percentile(q) for s in layers for q in PERCENTILES])
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("token L2 norm")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle("Token norm against layer (percentiles from the histogram)")
    fig.tight_layout()
    return _save(plt, fig, out_dir, "norms_by_layer.png")


def plot_histograms(plt, hook, layers, out_dir) -> str:
    fig, axes = _figure(plt)
    ax = axes[0][0]
    lower, upper = S.bin_bounds()
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(layers), 2)))
    for color, stats in zip(colors, layers):
        counts = stats.histogram[2:-1].astype(float)
        if counts.sum():
            used = np.flatnonzero(counts)
            span = slice(max(used[0] - 1, 0), used[-1] + 2)
            ax.stairs(counts[span], S.EDGES[span.start:span.stop + 1][:len(counts[span]) + 1], color=color,
                      label=f"layer {stats.layer}")
        outside = int(stats.histogram[S.ZERO_BIN] + stats.histogram[S.UNDERFLOW_BIN] + stats.histogram[-1])
        if outside:
            ax.text(0.01, 0.95, f"{outside} tokens outside the bins shown", transform=ax.transAxes, fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_xlim()
    if high / low < 30:  # under a decade and a half the minor ticks need numbers too
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("token L2 norm")
    ax.set_ylabel(f"tokens per bin (1/{S.BINS_PER_OCTAVE} octave)")
    ax.set_title(f"{hook}: norm histogram per layer")
    if len(layers) <= 12:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, out_dir, f"hist_{_safe(hook)}.png")


def plot_dimensions(plt, stats: S.LayerStats, out_dir) -> tuple[str, list[int]]:
    fig, axes = _figure(plt, 2, 1, (FIG_SIZE[0], 5.5))
    mean, std = stats.dim_mean(), np.sqrt(stats.dim_var())
    dims = np.arange(stats.d_model)
    massive = massive_dimensions(stats)
    for ax, values, label in ((axes[0][0], mean, "mean"), (axes[1][0], std, "std")):
        ax.plot(dims, values, lw=0.6, color="tab:blue")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        for dim in massive:
            ax.plot([dim], [values[dim]], "o", color="tab:red", ms=4)
            ax.annotate(str(dim), (dim, values[dim]), fontsize=7, color="tab:red", xytext=(3, 3),
                        textcoords="offset points")
    axes[1][0].set_xlabel("dimension")
    axes[0][0].set_title(f"{stats.hook} layer {stats.layer}: per-dimension mean and std"
                         + (f" (massive: {', '.join(map(str, massive))})" if massive else ""))
    fig.tight_layout()
    return _save(plt, fig, out_dir, f"dims_{_safe(stats.hook)}_{stats.layer}.png"), massive


def plot_parts(plt, hooks, out_dir) -> str:
    fig, axes = _figure(plt, 1, len(hooks), (max(FIG_SIZE[0], 4.0 * len(hooks)), FIG_SIZE[1]))
    for ax, (hook, layers) in zip(axes[0], hooks.items()):
        x = [s.layer for s in layers]
        for part in PART_NAMES:
            y = [s.by_part[part].mean_norm if part in s.by_part and s.by_part[part].finite else np.nan
                 for s in layers]
            if not np.all(np.isnan(y)):
                ax.plot(x, y, "o-", ms=3, label=part)
        ax.set_title(hook)
        ax.set_xlabel("layer")
        _layer_axis(ax, x)
        _norm_scale(ax, [g.mean_norm for s in layers for g in s.by_part.values() if g.finite])
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mean token norm")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Mean norm by prompt part")
    fig.tight_layout()
    return _save(plt, fig, out_dir, "parts.png")


def plot_cells(plt, stats: S.LayerStats, out_dir) -> str | None:
    if not stats.by_cell:
        return None
    cells = {tuple(map(int, key.split(","))): group for key, group in stats.by_cell.items()}
    rows, cols = max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1
    grid = np.full((rows, cols), np.nan)
    for (r, c), group in cells.items():
        if group.finite:
            grid[r, c] = group.mean_norm
    fig, axes = _figure(plt, 1, 1, (6.0, 5.0))
    ax = axes[0][0]
    image = ax.imshow(grid, cmap="magma", origin="upper", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mean token norm")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(f"{stats.hook} layer {stats.layer}: mean norm of grid-cell tokens")
    fig.tight_layout()
    return _save(plt, fig, out_dir, f"cells_{_safe(stats.hook)}_{stats.layer}.png")


def plot_throughput(plt, runs: dict, out_dir) -> str | None:
    spans = []
    for host, run in runs.items():
        try:
            start = _dt.datetime.fromisoformat(run["started"])
            end = _dt.datetime.fromisoformat(run["finished"])
        except (KeyError, TypeError, ValueError):
            continue
        seconds = max((end - start).total_seconds(), 1e-9)
        spans.append((host, start, end, int(run.get("run_counters", {}).get("tokens_extracted", 0)) / seconds))
    if not spans:
        return None
    fig, axes = _figure(plt, 1, 1, (FIG_SIZE[0], 3.5))
    ax = axes[0][0]
    origin = min(s[1] for s in spans)
    for host, start, end, rate in spans:
        ax.plot([(start - origin).total_seconds(), (end - origin).total_seconds()], [rate, rate], lw=3, label=host)
    ax.set_xlabel(f"seconds since {origin.isoformat(timespec='seconds')}")
    ax.set_ylabel("tokens / s (last run)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Extraction rate of each host's last run")
    fig.tight_layout()
    return _save(plt, fig, out_dir, "throughput.png")


# ------------------------------------------------------------------------------------------------- page

def token_texts(manifest: dict, token_ids: set[int]) -> tuple[dict[int, str], str]:
    """Token id -> text, with the manifest's tokenizer when it loads offline; else ({}, why not)."""
    if not token_ids:
        return {}, ""
    name = manifest.get("tokenizer") or (manifest.get("model") or {}).get("tokenizer")
    try:
        from model.qwen2 import OFFLINE_TOKENIZER
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(None if name in (None, OFFLINE_TOKENIZER) else name)
        return {i: tokenizer.decode([i]) for i in sorted(token_ids)}, ""
    except Exception as error:  # the table falls back to ids; the page says why
        return {}, f"token text unavailable ({type(error).__name__}: {str(error)[:200]}); ids shown"


def _table(rows: list[list[Any]], header: list[str], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [f"<td class=num>{html.escape(_fmt(v))}</td>" if i in numeric else f"<td>{html.escape(_fmt(v))}</td>"
                 for i, v in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _img(name: str | None, alt: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">' if name else ""


def run_facts(manifest: dict, runs: dict, stats: dict) -> list[list[Any]]:
    counters = manifest.get("run_counters", {})
    counts = manifest.get("counts", {})
    options = manifest.get("options", {})
    real, padding = int(counters.get("real_tokens", 0)), int(counters.get("padding_tokens", 0))
    model = manifest.get("model", {})
    facts = [
        ["model", model.get("model") if isinstance(model, dict) else model],
        ["tokenizer", manifest.get("tokenizer")],
        ["dataset", options.get("dataset")],
        ["hooks / layers", f"{manifest.get('hooks')} / {manifest.get('layers')}"],
        ["compute / storage dtype", f"{manifest.get('compute_dtype')} / {manifest.get('storage_dtype')}"],
        ["samples", counts.get("samples")],
        ["tokens", counts.get("tokens", next(iter(stats.values())).tokens if stats else None)],
        ["shards", counts.get("shards")],
        ["hosts", len(runs) or manifest.get("num_hosts")],
        ["padding", f"{padding / (padding + real):.2%} of {padding + real:,} batch slots" if padding + real else None],
        ["rejected records", counts.get("rejected")],
        ["started / finished", f"{manifest.get('started')} / {manifest.get('finished')}"],
    ]
    for host, run in runs.items():
        try:
            seconds = (_dt.datetime.fromisoformat(run["finished"]) - _dt.datetime.fromisoformat(run["started"]))
            rate = int(run.get("run_counters", {}).get("tokens_extracted", 0)) / max(seconds.total_seconds(), 1e-9)
            facts.append([f"host {host}", f"{rate:,.1f} tokens/s over {seconds.total_seconds():,.0f} s "
                                          f"(last run, state {run.get('state')})"])
        except (KeyError, TypeError, ValueError):
            facts.append([f"host {host}", "no start/finish times recorded"])
    return facts


def load_inputs(output: str) -> tuple[dict, dict, dict, str]:
    """(manifest or {}, host runs, stats by (hook, layer), where the stats came from)."""
    from pipeline import stats as pipeline_stats
    from pipeline.manifest import MANIFEST_NAME, host_runs, read_manifest
    from transforms.write import join

    root = output.rstrip("/")
    manifest = read_manifest(root) if FileSystems.exists(join(root, MANIFEST_NAME)) else {}
    stats = pipeline_stats.read_stats(root)
    source = pipeline_stats.STATS_NAME
    if stats is None:
        stats = pipeline_stats.recompute(root)
        source = "recomputed from the activations (the output has no stats.json)"
    return manifest, host_runs(root), stats, source


def _norm_sections(plt, stats, hooks, out_dir) -> list[str]:
    summary = [[s.hook, s.layer, s.tokens, s.mean_norm(), s.norm_std()] + [s.norm_percentile(q) for q in PERCENTILES]
               + [s.norm_min if s.norm_count else None, s.norm_max if s.norm_count else None, s.saelens_scale(),
                  s.non_finite, s.float16_overflow] for s in (stats[k] for k in sorted(stats))]
    body = ["<h2>Token norms</h2>", _img(plot_norms_by_layer(plt, hooks, out_dir), "norm against layer"),
            _table(summary, ["hook", "layer", "tokens", "mean", "std", "p1", "p50", "p99", "min", "max",
                             "SAELens scale", "non-finite", "f16 overflow"], set(range(1, 13))),
            "<p class=note>SAELens scale = sqrt(d_model) / mean norm. Percentiles interpolate geometrically "
            f"within 1/{S.BINS_PER_OCTAVE}-octave histogram bins (within a factor "
            f"{2 ** (1 / S.BINS_PER_OCTAVE):.3f} of the exact value).</p>"]
    body.append("<h2>Norm histograms</h2>")
    for hook, layers in hooks.items():
        body.append(_img(plot_histograms(plt, hook, layers, out_dir), f"{hook} norm histograms"))
    return body


def _part_section(plt, stats, hooks, out_dir) -> list[str]:
    body = ["<h2>Prompt parts</h2>", _img(plot_parts(plt, hooks, out_dir), "mean norm by prompt part")]
    part_rows = [[s.hook, s.layer, part, g.tokens, g.mean_norm] for s in (stats[k] for k in sorted(stats))
                 for part, g in sorted(s.by_part.items(), key=lambda kv: PART_NAMES.index(kv[0]))]
    body.append(f"<details><summary>table</summary>{_table(part_rows, ['hook', 'layer', 'part', 'tokens', 'mean norm'], {1, 3, 4})}</details>")
    return body


def _dimension_section(plt, hooks, out_dir) -> list[str]:
    body = [f"<h2>Dimensions</h2><p class=note>Massive: largest |value| at least {MASSIVE_FACTOR:g}x the "
            "median dimension's (red, labelled with the dimension index).</p>"]
    for hook, layers in hooks.items():
        images = []
        for s in layers:
            name, massive = plot_dimensions(plt, s, out_dir)
            images.append(_img(name, f"{hook} layer {s.layer} dimensions"))
        body.append(f"<details open><summary>{html.escape(hook)}</summary>{''.join(images)}</details>")
    return body


def _cell_section(plt, stats, hooks, out_dir) -> list[str]:
    body = ["<h2>Grid cells</h2>"]
    for hook, layers in hooks.items():
        images = [_img(plot_cells(plt, s, out_dir), f"{hook} layer {s.layer} grid cells") for s in layers]
        body.append(f"<details open><summary>{html.escape(hook)}</summary>"
                    f"{''.join(images) or '<p>no grid-cell tokens</p>'}</details>")
    color_rows = [[s.hook, s.layer, int(c), g.tokens, g.mean_norm] for s in (stats[k] for k in sorted(stats))
                  for c, g in sorted(s.by_color.items(), key=lambda kv: int(kv[0]))]
    body.append(f"<details><summary>mean norm by colour</summary>"
                f"{_table(color_rows, ['hook', 'layer', 'colour', 'tokens', 'mean norm'], {1, 2, 3, 4})}</details>")
    return body


def _top_token_section(stats, texts, text_note) -> list[str]:
    body = [f"<h2>Tokens of largest norm</h2><p class=note>{S.TOP_K} per hook and layer. "
            f"{html.escape(text_note)}</p>"]
    for key in sorted(stats):
        s = stats[key]
        rows = [[t.norm, t.sample_id, t.position, t.token_id, repr(texts[t.token_id]) if t.token_id in texts else "",
                 t.part] for t in s.top]
        body.append(f"<details{' open' if key == min(stats) else ''}><summary>{html.escape(s.hook)} layer {s.layer}"
                    f"</summary>{_table(rows, ['norm', 'sample', 'position', 'token id', 'text', 'part'], {0, 2, 3})}"
                    "</details>")
    return body


def write_report(output: str, out_dir: str | None = None) -> str:
    """Writes the report; returns the path of its index.html."""
    manifest, runs, stats, source = load_inputs(output)
    if not stats:
        raise ValueError(f"{output}: no statistics (no committed shard?)")
    out_dir = out_dir or os.path.join(output.rstrip("/"), REPORT_DIR)
    if "://" in out_dir:
        raise ValueError(f"--out {out_dir}: the report is written to a local directory; pass --out DIR")
    os.makedirs(out_dir, exist_ok=True)
    plt = _plt()
    hooks = _hooks(stats)
    texts, text_note = token_texts(manifest, {t.token_id for s in stats.values() for t in s.top})

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>Activations of {html.escape(output)}</h1>",
            f"<p class=note>Statistics: {html.escape(source)}; written {stamp} UTC by "
            "<code>python -m pipeline.report</code>. Schema: docs/format.md, Statistics.</p>",
            "<h2>Run</h2>", _table(run_facts(manifest, runs, stats), ["fact", "value"]),
            _img(plot_throughput(plt, runs, out_dir), "tokens per second of each host")]

    body += _norm_sections(plt, stats, hooks, out_dir)
    body += _part_section(plt, stats, hooks, out_dir)
    body += _dimension_section(plt, hooks, out_dir)
    body += _cell_section(plt, stats, hooks, out_dir)
    body += _top_token_section(stats, texts, text_note)

    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>Activation report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the run's --output (local directory or gs://...)")
    parser.add_argument("--out", help="local directory for index.html and the PNGs (default OUTPUT/report)")
    args = parser.parse_args(argv)
    from pipeline.storage import use_storage_emulator_if_configured

    use_storage_emulator_if_configured()
    if "://" in args.output and not args.out:
        parser.error("with a gs:// OUTPUT pass --out DIR (a local directory)")
    try:
        path = write_report(args.output, args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    from pipeline.errors import exit_report

    exit_report(main)
