"""Path (b), the whole pipeline: `pipeline.run.main` in this process on the local runner, timed by its shard
commits (the real product, not a re-implementation of its DoFns)."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.bench.inputs import flush_tree, write_text_corpus
from pipeline.bench.settings import HOOK, BenchError
from pipeline.bench.timing import timed


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
    the first, over the time from the first commit to the last (`steady`), plus the time the fsync of the
    output after the run took to flush what the page cache still held (`durable`: what the disk absorbed,
    not what memory did). Startup, reading, tokenizing, model loading and compilation all happen before the
    first commit, and the manifest after the last, so they fall outside both; `end_to_end` keeps everything."""
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


def run_and_sync(argv: list[str], output: Path, profile=None) -> dict:
    """`pipeline.run.main(argv)`, then an fsync of every file it wrote, both timed; the rates of the shards it
    committed."""
    from pipeline import run as pipeline_run

    code, main_s = timed(lambda: pipeline_run.main(argv), profile)
    if code != 0:
        raise BenchError(f"python -m pipeline.run {' '.join(argv)} exited with {code} (its error is above)")
    _, sync_s = timed(lambda: flush_tree(output))
    shards = shard_commits(output)
    return {**pipeline_rates(shards, main_s, sync_s), "argv": argv,
            "first_commit": shards[0]["committed"] if shards else None,
            "last_commit": shards[-1]["committed"] if shards else None}


def run_pipeline(model_source: str, layers, length: int, batch_size: int, num_batches: int, dtype: str,
                 attention: str, tokenizer, work: Path, seed: int, profile=None, model_parallelism: int = 1) -> dict:
    """`python -m pipeline.run` in this process (pipeline.run.main) on a synthetic text corpus of
    `num_batches` full batches, on the local runner, into Parquet under `work`."""
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
    result = run_and_sync(argv, output, profile)
    result.update({"corpus_tokens": corpus_tokens, "batches": num_batches})
    if result["tokens"] != corpus_tokens:
        raise BenchError(f"the pipeline wrote {result['tokens']:,} tokens for a corpus of {corpus_tokens:,} "
                         f"({output}): tokens were lost or duplicated")
    shutil.rmtree(output, ignore_errors=True)
    corpus.unlink(missing_ok=True)
    return result


class _Placeholder:
    """A weak-referenceable nothing, for release_pipeline_model."""


def release_pipeline_model() -> None:
    """Lets the pipeline's model go after a run. Beam's `Shared` deliberately keeps the most recently acquired
    object alive (so a worker does not reload between bundles), which after `pipeline.run.main` returns is the
    extractor's model: the next run would load a second copy of the weights beside it. Acquiring a placeholder
    through the same public API takes that place."""
    from apache_beam.utils import shared

    from pipeline.bench.accelerator import free_jax_memory

    shared.Shared().acquire(_Placeholder)
    free_jax_memory()
