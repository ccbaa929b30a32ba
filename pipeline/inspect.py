"""What is in an output, at a glance: `python -m pipeline.inspect OUTPUT [--json] [--no_parts]`.

State: `finished` when manifest.json lists every commit marker (no shard was committed after it was written) and no
host holds a live lease; `running` when a host's lease under `_leases/` was renewed within its timeout (the hosts
are named); `incomplete` when committed shards exist that no manifest lists and no lease is live (a run stopped
before its manifest, or one that predates leases is still going: resume it, or rebuild the manifest with
`python -m pipeline.manifest`); `empty` when nothing is committed yet. Then hooks x layers x tokens, samples,
datasets and prompt parts with token counts, dtypes, bytes, uncommitted files and dead letters by stage, all from
the commit markers (the samples files' metadata), so a running output is described as it stands. A --generate
output also has its predictions: the committed files and their rows (from the markers), and how many were scored
against a ground truth and how many were correct (their `correct` column only).

Exits 2 with a one-line message naming the path when OUTPUT is not an output (it holds nothing a run writes), when
its manifest.json is not a manifest of this format (rebuild it with `python -m pipeline.manifest OUTPUT`), or when
its storage cannot be read (no credentials, an unreachable endpoint) or refuses a file (permissions). A file whose
bytes do not read (a commit marker; a predictions file; an activation file of the hook and layer whose prompt parts
are counted, the only ones inspect opens) is a problem line naming it and pipeline.verify, which checks them all.
Ends with 141, quietly, when the reader of its output stops early (`| head`).

Reads local or gs:// outputs through pipeline.dataset's stores; imports neither Beam nor JAX nor torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset import StorageReadError, _LocalStore, _store, is_file_damage, one_line
from transforms.output_format import parallel_map
from transforms import output_format as fmt

LEASES_DIR = fmt.LEASES_DIR
# What a run writes into its output: a directory holding none of them is not an output. A run that has started but
# committed nothing yet already holds its lease (the first thing it writes), its identity file or temporary files.
OUTPUT_FILES = (fmt.MANIFEST_NAME, fmt.IDENTITY_FILE, fmt.STATS_NAME)
OUTPUT_DIRS = (fmt.SAMPLES_DIR, fmt.ACTIVATIONS_DIR, LEASES_DIR, fmt.RUNS_DIR, fmt.DEAD_LETTER_DIR, fmt.STATS_DIR,
               fmt.PREDICTIONS_DIR)

__all__ = ["inspect_output", "format_report", "main"]


def _json_files(store, reldir: str) -> dict[str, Any]:
    """name -> parsed JSON of every `<reldir>/<name>.json`; a file that does not parse maps to an error string."""
    found = {}
    for relpath in sorted(store.list(reldir)):
        name = fmt.basename(relpath)
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            data = store.read_bytes(relpath)
        except FileNotFoundError:  # gone since the listing, e.g. a lease its run deleted at the end
            continue
        try:
            found[name[:-len(".json")]] = json.loads(data)
        except ValueError as err:
            found[name[:-len(".json")]] = f"{store.path(relpath)} is not valid JSON ({one_line(err)})"
    return found


def _not_files(store, reldir: str, output: str) -> list[str]:
    """Problems for the entries of a local `reldir` named as Parquet files that are no files: a directory or a link
    to nothing, which every listing passes over, so their shard would count as uncommitted without a word."""
    if not isinstance(store, _LocalStore) or not os.path.isdir(store.path(reldir)):
        return []
    return [f"{store.path(f'{reldir}/{entry.name}')} is not a file (a directory or a broken link), so it commits "
            f"nothing; remove it, then run python -m pipeline.verify {output}"
            for entry in sorted(os.scandir(store.path(reldir)), key=lambda e: e.name)
            if entry.name.endswith(fmt.PARQUET_SUFFIX) and not fmt.is_temp_name(entry.name) and not entry.is_file()]


def _marker(store, relpath: str) -> dict:
    with store.open(relpath) as handle:
        try:
            meta = fmt.decode_metadata(pq.read_metadata(handle))
            samples = pq.read_table(handle, columns=["dataset", "num_tokens"])
        except (pa.ArrowException, OSError, ValueError) as err:
            if not is_file_damage(err):  # storage failures and refusals: exit 2
                raise
            return {"path": relpath, "error": f"{store.path(relpath)}: not a readable Parquet commit marker "
                                              f"({one_line(err)}); run python -m pipeline.verify on the output"}
    meta["path"] = relpath
    meta["datasets"] = samples
    return meta


def _leases(store, now: float) -> dict[str, dict]:
    leases = {}
    for share, holder in _json_files(store, LEASES_DIR).items():
        if not isinstance(holder, dict):
            leases[share] = {"error": str(holder), "live": False}
            continue
        try:
            age = now - float(holder["renewed_unix"])
            timeout = float(holder.get("timeout_s", 120.0))
        except (KeyError, TypeError, ValueError):
            leases[share] = {"error": f"{store.path(f'{LEASES_DIR}/{share}.json')} has no numeric renewed_unix",
                             "live": False}
            continue
        leases[share] = {"hostname": holder.get("hostname"), "pid": holder.get("pid"),
                         "started": holder.get("started"), "renewed_s_ago": round(age, 1), "timeout_s": timeout,
                         "live": age <= timeout}
    return leases


def _dead_letters(store) -> dict:
    by_stage: Counter = Counter()
    files = total_bytes = 0
    for relpath, size in sorted(store.list(fmt.DEAD_LETTER_DIR).items()):
        name = fmt.basename(relpath)
        if not name.endswith(fmt.DEAD_LETTER_SUFFIX) or fmt.is_temp_name(name):
            continue
        try:
            data = store.read_bytes(relpath)
        except FileNotFoundError:  # deleted since the listing (verify --repair)
            continue
        files += 1
        total_bytes += size
        for line in data.decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            try:
                by_stage[str(json.loads(line).get("stage", "unknown"))] += 1
            except (ValueError, AttributeError):
                by_stage["unreadable line"] += 1
    return {"total": sum(by_stage.values()), "by_stage": dict(sorted(by_stage.items())), "files": files,
            "bytes": total_bytes}


def _prediction_counts(store, relpath: str, output: str) -> tuple[int | None, int | None] | str:
    """(scored, correct) of one predictions file from its `correct` column alone (None, None without one), or the
    problem when the file does not read."""
    try:
        with store.open(relpath) as handle:
            parquet = pq.ParquetFile(handle)
            if "correct" not in parquet.schema_arrow.names:
                return None, None
            column = parquet.read(columns=["correct"]).column("correct")
    except (pa.ArrowException, OSError) as err:
        if not is_file_damage(err):  # storage failures and refusals: exit 2
            raise
        return f"{store.path(relpath)} does not read ({one_line(err)}); run python -m pipeline.verify {output}"
    if not (pa.types.is_boolean(column.type) or pa.types.is_null(column.type)):
        return (f"{store.path(relpath)}: its `correct` column is {column.type}, not bool, so it is not counted; run "
                f"python -m pipeline.verify {output}")
    return len(column) - column.null_count, int(pc.sum(column).as_py() or 0)


def _predictions(store, markers: list[dict], output: str, problems: list[str]) -> dict | None:
    """--generate's predictions files: those the commit markers list, their rows (from the markers), how many
    were scored against a ground truth and found correct (the `correct` column), and files no marker lists. None
    for an output without predictions."""
    from transforms.predictions import marker_entry

    entries = []
    for meta in markers:
        try:
            entry = marker_entry(meta)
        except ValueError as err:
            problems.append(str(err))
            continue
        if entry is not None:
            entries.append(entry)
    listed = {p for p in store.list(fmt.PREDICTIONS_DIR)
              if p.endswith(fmt.PARQUET_SUFFIX) and not fmt.is_temp_name(fmt.basename(p))}
    if not entries and not listed:
        return None
    present = [e for e in entries if e["path"] in listed]
    problems += [f"{store.path(e['path'])} is listed by its commit marker but missing"
                 for e in entries if e["path"] not in listed]
    counts = list(parallel_map(lambda e: _prediction_counts(store, e["path"], output), present))
    problems += [c for c in counts if isinstance(c, str)]
    scored = [c for c in counts if not isinstance(c, str) and c[0] is not None]
    committed = {e["path"] for e in entries}
    return {"files": len(entries), "rows": sum(int(e["rows"]) for e in entries),
            "scored": sum(c[0] for c in scored) if scored else None,
            "correct": sum(c[1] for c in scored) if scored else None,
            "bytes": sum(int(e["bytes"]) for e in entries),
            "uncommitted_files": sorted(listed - committed)}


def _part_counts(store, paths: list[str], output: str, problems: list[str]) -> dict[str, int]:
    """Tokens per prompt part over `paths`; a file that does not read as Parquet is a problem (its tokens are left
    out); a storage failure or the system refusing a file (an errno) is raised."""
    def count(relpath):
        try:
            with store.open(relpath) as handle:
                column = pq.read_table(handle, columns=["part"]).column("part")
        except (pa.ArrowException, OSError) as err:
            if not is_file_damage(err):  # storage failures and refusals: exit 2
                raise
            return f"{store.path(relpath)} does not read ({one_line(err)}); run python -m pipeline.verify {output}"
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        return {row["values"]: row["counts"] for row in pc.value_counts(column).to_pylist()}

    totals: Counter = Counter()
    for counts in parallel_map(count, paths):
        (problems.append(counts) if isinstance(counts, str) else totals.update(counts))
    return dict(totals.most_common())


def inspect_output(output: str, *, parts: bool = True, now: float | None = None) -> dict[str, Any]:
    """The report `python -m pipeline.inspect --json` prints (see the module docstring)."""
    store = _store(output)
    now = time.time() if now is None else now
    problems = []
    manifest = _manifest(store, output)
    samples_listed = store.list(fmt.SAMPLES_DIR)
    marker_paths = fmt.marker_paths(samples_listed)
    markers = []
    problems += _not_files(store, fmt.SAMPLES_DIR, output)
    for meta in parallel_map(lambda p: _marker(store, p), marker_paths):
        (problems.append(meta["error"]) if "error" in meta else markers.append(meta))
    leases = _leases(store, now)
    problems += [lease["error"] for lease in leases.values() if "error" in lease]
    hosts = _hosts(markers, _json_files(store, fmt.RUNS_DIR), leases)
    # Listed after the markers: a writer renames a shard's activation files into place before its marker, so every
    # file a marker seen above lists is in this listing.
    listed = store.list(fmt.ACTIVATIONS_DIR)
    if manifest is None and not (samples_listed or listed or leases) and not _holds_output_entries(store):
        raise ValueError(f"{store} is not an output of pipeline.run: it holds none of "
                         f"{', '.join(OUTPUT_FILES + tuple(f'{d}/' for d in OUTPUT_DIRS))}; give the --output a "
                         "run wrote into")
    committed, pairs = _committed_activations(markers)
    uncommitted = sorted(p for p in listed if p not in committed)
    problems += [f"{store.path(p)} is listed by its commit marker but missing"
                 for p in sorted(p for p in committed if p not in listed)]
    dtypes = _agreed_metadata(markers, problems)
    datasets = _datasets(markers)
    part_counts, parts_of = None, None
    if parts and pairs:
        hook, layer = min(pairs)
        parts_of = {"hook": hook, "layer": layer}
        part_counts = _part_counts(store, sorted(p for p, e in committed.items()
                                                 if e["hook"] == hook and int(e["layer"]) == layer and p in listed),
                                   output, problems)
    live = sorted(share for share, lease in leases.items() if lease.get("live"))
    state, why = _state(output, manifest, markers, marker_paths, live)
    problems += _manifest_disagreements(store, output, manifest, markers)
    sample_bytes = sum(size for p, size in samples_listed.items() if p in set(marker_paths))
    dead = _dead_letters(store)
    predictions = _predictions(store, markers, output, problems)
    activation_bytes = sum(e["bytes"] for e in pairs.values())
    prediction_bytes = predictions["bytes"] if predictions else 0
    return {
        "output": str(store), "state": state, "state_reason": why,
        "manifest": ({"written": manifest.get("written"), "state": manifest.get("state"),
                      "format_version": manifest.get("format_version")} if isinstance(manifest, dict) else None),
        "hosts": {name: hosts[name] for name in sorted(hosts)},
        "live_hosts": live,
        "model": dtypes.pop("model"), "d_model": dtypes[fmt.KEY_D_MODEL], "storage_dtype": dtypes[fmt.KEY_STORAGE_DTYPE],
        "compute_dtype": dtypes[fmt.KEY_DTYPE], "format_version": dtypes[fmt.KEY_FORMAT_VERSION],
        "shards": len(markers),
        "activations": [{"hook": h, "layer": l, **pairs[(h, l)]} for h, l in sorted(pairs)],
        "samples": sum(d["samples"] for d in datasets.values()),
        "tokens": sum(d["tokens"] for d in datasets.values()),
        "datasets": [{"dataset": name, **datasets[name]} for name in sorted(datasets)],
        "parts": part_counts, "parts_of": parts_of,
        "predictions": predictions,
        "bytes": {"activations": activation_bytes, "samples": sample_bytes, "predictions": prediction_bytes,
                  "dead_letter": dead["bytes"],
                  "total": activation_bytes + sample_bytes + prediction_bytes + dead["bytes"]},
        "uncommitted_files": uncommitted,
        "dead_letters": dead,
        "problems": problems,
    }


def _manifest(store, output: str) -> dict | None:
    """OUTPUT/manifest.json, None before a run wrote one; ValueError naming it and saying how to rebuild it when it
    is not a manifest of this format (pipeline.dataset refuses such an output too)."""
    if not store.exists(fmt.MANIFEST_NAME):
        return None
    return fmt.parse_manifest(store.read_bytes(fmt.MANIFEST_NAME), store.path(fmt.MANIFEST_NAME), output)


def _holds_output_entries(store) -> bool:
    """Whether any of OUTPUT_FILES or OUTPUT_DIRS is there (asked only when no listing found anything)."""
    if os.path.isdir(str(store)):  # local disk: a folder a starting run made counts even while it is empty
        return any(os.path.lexists(store.path(name)) for name in OUTPUT_FILES + OUTPUT_DIRS)
    return any(store.exists(name) for name in OUTPUT_FILES) or any(store.list(name) for name in OUTPUT_DIRS)


def _manifest_disagreements(store, output: str, manifest: dict | None, markers: list[dict]) -> list[str]:
    """What pipeline.dataset refuses in an output whose manifest lists other activation files than the commit
    markers of its shards (shards committed after the manifest are the state's business, not a disagreement)."""
    if manifest is None:
        return []
    in_manifest = {f["path"] for f in manifest.get("files", []) if f["kind"] == "samples"}
    left_out, unknown = fmt.manifest_disagreement(manifest, [m for m in markers if m["path"] in in_manifest])
    problems = []
    for paths, what in ((left_out, "leaves out {n} the commit markers list"),
                        (unknown, "lists {n} no commit marker lists")):
        if paths:
            n = f"{len(paths)} activation file" + ("s" if len(paths) > 1 else "")
            problems.append(f"{store.path(fmt.MANIFEST_NAME)} {what.format(n=n)} ({fmt.shown_paths(paths)}); "
                            f"pipeline.dataset refuses the output until it is rebuilt: python -m pipeline.manifest "
                            f"{output}")
    return problems


def _hosts(markers: list[dict], runs: dict, leases: dict) -> dict[str, dict]:
    """Per host: the shards its workers committed, its run record and its lease."""
    hosts: dict[str, dict] = defaultdict(lambda: {"shards": 0, "samples": 0, "tokens": 0, "run": None,
                                                  "lease": None})
    for meta in markers:
        host = hosts[fmt.shard_worker(meta.get(fmt.KEY_SHARD, "")) or "?"]
        host["shards"] += 1
        host["samples"] += int(meta.get(fmt.KEY_NUM_SAMPLES, 0))
        host["tokens"] += int(meta.get(fmt.KEY_NUM_TOKENS, 0))
    for host, run in runs.items():
        hosts[host]["run"] = ({k: run.get(k) for k in ("state", "started", "finished")} if isinstance(run, dict)
                              else {"error": run})
    for share, lease in leases.items():
        hosts[share]["lease"] = lease
    return hosts


def _committed_activations(markers: list[dict]) -> tuple[dict[str, dict], dict[tuple[str, int], dict]]:
    """The activation files the markers list (path -> entry), and their totals per (hook, layer)."""
    committed = {}
    pairs: dict[tuple[str, int], dict] = {}
    for meta in markers:
        for entry in meta.get(fmt.KEY_FILES, []):
            committed[entry["path"]] = entry
            pair = pairs.setdefault((entry["hook"], int(entry["layer"])), {"tokens": 0, "files": 0, "bytes": 0})
            pair["tokens"] += int(entry["rows"])
            pair["files"] += 1
            pair["bytes"] += int(entry["bytes"])
    return committed, pairs


def _agreed_metadata(markers: list[dict], problems: list[str]) -> dict[str, Any]:
    """Model, dtypes and format version, which every marker should record alike (a list where they differ)."""
    agreed = {}
    for key in (fmt.KEY_D_MODEL, fmt.KEY_STORAGE_DTYPE, fmt.KEY_DTYPE, fmt.KEY_FORMAT_VERSION, "model"):
        values = sorted({str(m.get(key)) for m in markers})
        agreed[key] = (int(values[0]) if values[0].isdigit() else values[0]) if len(values) == 1 else values
        if len(values) > 1:
            problems.append(f"shards disagree on {key}: {', '.join(values)}")
    return agreed


def _datasets(markers: list[dict]) -> dict[str, dict]:
    datasets: dict[str, dict] = defaultdict(lambda: {"samples": 0, "tokens": 0})
    for meta in markers:
        table = meta["datasets"]
        for name, tokens in zip(table.column("dataset").to_pylist(), table.column("num_tokens").to_pylist()):
            datasets[name]["samples"] += 1
            datasets[name]["tokens"] += int(tokens)
    return datasets


def _state(output: str, manifest, markers: list[dict], marker_paths: list[str], live: list[str]) -> tuple[str, str]:
    """running, finished, empty or incomplete, and why."""
    in_manifest = ({f["path"] for f in manifest.get("files", []) if f.get("kind") == "samples"}
                   if isinstance(manifest, dict) else set())
    after_manifest = [p for p in marker_paths if p not in in_manifest]
    if live:
        return "running", f"live lease held by {', '.join(live)}"
    if isinstance(manifest, dict) and not after_manifest and markers:
        return "finished", f"manifest.json written {manifest.get('written')} lists every commit marker"
    if not markers:
        return "empty", "no committed shard yet"
    return "incomplete", (
        f"{len(after_manifest)} commit markers " + ("that manifest.json does not list" if manifest else
        "and no manifest.json") + " and no live lease: a run stopped before its manifest, or one without "
        f"leases is still going; resume it, or rebuild the manifest with python -m pipeline.manifest {output}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _table(rows: list[list], indent: str = "  ") -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    def numeric(cell) -> bool:
        return str(cell).replace(",", "").replace(".", "").split(" ")[0].isdigit()

    return [indent + "  ".join(str(c).rjust(w) if numeric(c) else str(c).ljust(w) for c, w in zip(row, widths)
                               ).rstrip() for row in rows]


def _prediction_lines(predictions: dict | None) -> list[str]:
    if predictions is None:
        return []
    scored = ("none scored (no ground truth)" if not predictions["scored"] else
              f"{predictions['scored']:,} scored, {predictions['correct']:,} correct")
    lines = [f"predictions: {predictions['rows']:,} in {predictions['files']:,} files, {scored}"]
    uncommitted = predictions["uncommitted_files"]
    if uncommitted:
        lines.append(f"  uncommitted predictions files (never read): {len(uncommitted):,}")
    return lines


def format_report(report: dict) -> str:
    lines = [f"{report['output']}", f"state: {report['state']} ({report['state_reason']})",
             f"model: {report['model']}  d_model {report['d_model']}  storage {report['storage_dtype']}  "
             f"compute {report['compute_dtype']}  format {report['format_version']}", "hosts:"]
    rows = [["host", "shards", "samples", "tokens", "run", "lease"]]
    for name, host in report["hosts"].items():
        run = host["run"] or {}
        lease = host["lease"]
        lease_text = ("-" if lease is None else lease.get("error") or
                      f"{'live' if lease['live'] else 'stale'} ({lease['hostname']} pid {lease['pid']}, renewed "
                      f"{lease['renewed_s_ago']:.0f} s ago)")
        run_text = run.get("error") or (f"{run.get('state')} {run.get('started')} -> {run.get('finished')}"
                                        if run else "-")
        rows.append([name, f"{host['shards']:,}", f"{host['samples']:,}", f"{host['tokens']:,}", run_text, lease_text])
    lines += _table(rows)
    lines.append(f"activations: {report['shards']:,} committed shards")
    rows = [["hook", "layer", "tokens", "files", "bytes"]]
    rows += [[a["hook"], a["layer"], f"{a['tokens']:,}", f"{a['files']:,}", _size(a["bytes"])]
             for a in report["activations"]]
    lines += _table(rows) if len(rows) > 1 else ["  none"]
    lines.append(f"samples: {report['samples']:,} ({report['tokens']:,} tokens)")
    rows = [["dataset", "samples", "tokens"]] + [[d["dataset"], f"{d['samples']:,}", f"{d['tokens']:,}"]
                                                 for d in report["datasets"]]
    lines += _table(rows) if len(rows) > 1 else []
    if report["parts"] is not None:
        lines.append(f"parts (tokens of {report['parts_of']['hook']} layer {report['parts_of']['layer']}):")
        lines += _table([["part", "tokens"]] + [[p, f"{n:,}"] for p, n in report["parts"].items()])
    lines += _prediction_lines(report["predictions"])
    b = report["bytes"]
    predictions = f", predictions {_size(b['predictions'])}" if report["predictions"] else ""
    lines.append(f"bytes: activations {_size(b['activations'])}, samples {_size(b['samples'])}{predictions}, dead "
                 f"letters {_size(b['dead_letter'])}, total {_size(b['total'])}")
    dead = report["dead_letters"]
    stages = ", ".join(f"{stage} {n:,}" for stage, n in dead["by_stage"].items())
    lines.append(f"dead letters: {dead['total']:,}" + (f" ({stages})" if stages else ""))
    uncommitted = report["uncommitted_files"]
    lines.append(f"uncommitted activation files (never read): {len(uncommitted):,}")
    lines += [f"  {p}" for p in uncommitted[:10]] + ([f"  ... {len(uncommitted) - 10:,} more"]
                                                     if len(uncommitted) > 10 else [])
    lines += [f"problem: {p}" for p in report["problems"]]
    return "\n".join(lines)


def _storage_errors(output: str) -> tuple[type[BaseException], ...]:
    """What reading `output` may raise when its storage fails; google's libraries are imported for gs:// only."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    if str(output).startswith("gs://"):
        try:
            from google.api_core.exceptions import GoogleAPIError
            from google.auth.exceptions import GoogleAuthError
        except ImportError:  # without them pipeline.dataset cannot reach gs:// either; its error says so
            return errors
        errors += (GoogleAPIError, GoogleAuthError)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="OUTPUT of pipeline.run: a local path or gs://bucket/prefix")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--no_parts", action="store_true",
                        help="skip the prompt-part token counts (they read the part column of one hook and layer)")
    args = parser.parse_args(argv)
    storage_errors = _storage_errors(args.output)
    try:
        report = inspect_output(args.output, parts=not args.no_parts)
    except (FileNotFoundError, StorageReadError, ValueError, TypeError) as err:
        # Not an output, a damaged manifest.json, an unreadable object: the message names it and says what to do.
        print(f"pipeline.inspect: {err}", file=sys.stderr)
        return 2
    except storage_errors as err:
        # Other OSErrors (e.g. access to a local file) and google's errors: no credentials, an unreachable endpoint
        # (after google-cloud-storage's own retries), a refused bucket. None of them names the output.
        detail = one_line(err)
        print(f"pipeline.inspect: {args.output} could not be read ({type(err).__name__}: {detail[:500]}); check that "
              "it exists, the credentials and the network, then run it again", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    from pipeline.errors import exit_report

    exit_report(main)
