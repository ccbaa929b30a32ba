"""Memory and time to the first commit of a whole local run, at several input sizes (not a test).

For each size: a synthetic text corpus (JSONL, `text` column) of documents made of words that are one token
each, so its token count is exact by construction; then `python -m pipeline.run --runner=DirectRunner` on it
as a child process, with the options given after `--`. Measured: the child's peak RSS (getrusage of the
waited-for child, ru_maxrss), the seconds from start to the first commit marker under OUTPUT/samples/
(polled every 0.2 s) and the whole run's wall time; the machine's load average before and after each run.

    python -m benchmarks.waves_bench --model /tmp/tiny --sizes 2e6,8e6 --work_dir /tmp/wb -- --max_seq_len=512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """A JSONL corpus of exactly `tokens` tokens: documents of 50-1500 single-token words."""
    import numpy as np

    from model.tokenizer import load_tokenizer
    from pipeline.bench.inputs import single_token_words

    tokenizer = load_tokenizer(None)
    words = np.array(single_token_words(tokenizer))
    rng = np.random.default_rng(seed)
    written, checked = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < tokens:
            n = int(min(rng.integers(50, 1500), tokens - written))
            text = " ".join(words[rng.integers(0, len(words), n)])
            if checked < 20:  # the construction holds: one token per word
                assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n
                checked += 1
            handle.write(json.dumps({"text": text}) + "\n")
            written += n
    return written


def _watch_first_commit(samples_dir: Path, started: float, found: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        if samples_dir.is_dir() and any(p.suffix == ".parquet" and not p.name.startswith(".")
                                        for p in samples_dir.iterdir()):
            found["first_commit_s"] = round(time.perf_counter() - started, 1)
            return
        time.sleep(0.2)


def run_once(model: str, corpus: Path, output: Path, extra: list[str]) -> dict:
    env = dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "pipeline.run", "--runner=DirectRunner", f"--model={model}",
               f"--dataset=text:{corpus}", f"--output={output}", "--progress_interval=0", *extra]
    found: dict = {}
    stop = threading.Event()
    load_before = os.getloadavg()
    started = time.perf_counter()
    watcher = threading.Thread(target=_watch_first_commit, args=(output / "samples", started, found, stop))
    watcher.start()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if done.returncode != 0:
        raise SystemExit(f"pipeline.run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return {"command": " ".join(command), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            * 1024, "first_commit_s": found.get("first_commit_s"), "wall_s": round(wall, 1),
            "tokens": summary["tokens"], "samples": summary["samples_written"],
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waves_bench")
    parser.add_argument("--model", required=True, help="checkpoint folder (a tiny random one: tests/checkpoints.py)")
    parser.add_argument("--sizes", default="2e6,8e6,32e6", help="comma list of corpus sizes in tokens")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--keep_outputs", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        corpus = work / f"corpus-{size}.jsonl"
        if not corpus.exists():
            write_corpus(corpus, size)
        output = work / f"out-{size}"
        shutil.rmtree(output, ignore_errors=True)
        # Each size in a fresh interpreter: ru_maxrss of RUSAGE_CHILDREN is the largest child so far.
        code = ("import json,sys; from benchmarks.waves_bench import run_once; from pathlib import Path; "
                f"print(json.dumps(run_once({args.model!r}, Path({str(corpus)!r}), Path({str(output)!r}), "
                f"{extra!r})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode != 0:
            raise SystemExit(done.stderr[-4000:])
        result = dict(json.loads(done.stdout.strip().splitlines()[-1]), corpus_tokens=size,
                      corpus_bytes=corpus.stat().st_size)
        results.append(result)
        print(json.dumps(result), flush=True)
        if not args.keep_outputs:
            shutil.rmtree(output, ignore_errors=True)
    for small, large in zip(results, results[1:]):
        slope = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["corpus_tokens"] - small["corpus_tokens"])
        print(f"{small['corpus_tokens']:,} -> {large['corpus_tokens']:,} tokens: {slope:.2f} bytes of peak RSS per "
              "input token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
