"""What the measurement paths feed on: random token batches, a synthetic text corpus that tokenizes to full rows,
samples for the writer, the caps on how much a run writes, and the disk's own write bandwidth."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.bench.settings import MAX_ORDINARY_TOKEN, BenchError
from pipeline.bench.timing import Stopwatch
from transforms.elements import Placement


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
                         "pipeline/bench/inputs.py _WORDS needs words that are single tokens of this tokenizer")
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


def bench_samples(tokens, batch_index: int) -> tuple[list[dict], list[Placement]]:
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
    return samples, [Placement(row, row, 0, length) for row in range(rows)]


def estimated_bytes_per_token(config, num_layers: int, dtype: str) -> float:
    """Parquet bytes per token of `num_layers` layers, on the high side (it caps what a run writes; the measured
    bytes per value are in docs/format.md)."""
    return num_layers * config.hidden_size * (2.3 if dtype == "bfloat16" else 4.1)


def capped_batches(wanted: int, config, num_layers: int, dtype: str, batch_tokens: int, cap_bytes: int) -> int:
    per_batch = estimated_bytes_per_token(config, num_layers, dtype) * batch_tokens
    return max(1, min(wanted, int(cap_bytes // max(per_batch, 1))))


def disk_write_bandwidth(directory: Path, total_bytes: int, chunk_bytes: int = 64 << 20) -> dict:
    """Sequential write of `total_bytes` incompressible bytes into `directory`, fsync'd before the clock stops
    (so the page cache cannot flatter it); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(min(chunk_bytes, total_bytes))
    path = directory / "disk-bandwidth.tmp"
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    clock = Stopwatch()
    try:
        with clock.running():
            while written < total_bytes:
                view = memoryview(chunk)[: total_bytes - written]
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"path": str(directory), "bytes": written, "seconds": clock.seconds, "bytes_per_s": written / clock.seconds,
            "method": f"os.write of {chunk_bytes >> 20} MiB chunks, then fsync, page cache not bypassed"}


def flush_tree(root: Path) -> int:
    """fsync every file under `root`: what the page cache still holds of this run's output reaches the disk,
    and nothing of other processes' writes (os.sync would flush those too). Returns the files flushed."""
    count = 0
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            count += 1
    return count
