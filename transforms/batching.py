"""Fixed-shape token batches: pack tokenized samples into (batch_size, bucket_length) arrays.

The model compiles once per (batch_size, length) shape, so lengths come from a small set of buckets and every
batch is exactly `batch_size` rows. Several samples share a row (segment ids 1..k, positions restarting at 0 for
each) so short ARC prompts do not waste a whole row of padding. A sample is never split.

Exactly-once writing names each shard after its batch (`batch_id` = sha1 of the batch's sample ids), so a batch's
composition must depend only on *which* samples exist, never on bundling, ordering or retries:
`BatchSamples` routes each sample to a group by a stable hash of its sample id (hashlib, not Python's salted
`hash()`), groups with a GroupByKey and packs each group after sorting it by sample id.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from typing import Iterable, Sequence

import apache_beam as beam
import numpy as np

from transforms.elements import Batch, Placement, TokenizedSample
from transforms.metrics import NAMESPACE

MIN_BUCKET = 256
DEFAULT_BATCHES_PER_GROUP = 64
BATCH_ID_HEX_CHARS = 16


def choose_buckets(max_seq_len: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from `min_bucket` below `max_seq_len`, then `max_seq_len` itself.

    Few buckets keep compilation count small (one per bucket); doubling bounds the padding of a short batch
    to under half of its length."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
        raise ValueError(f"--max_seq_len must be a positive integer, got {max_seq_len!r}")
    max_seq_len = int(max_seq_len)
    buckets = []
    length = min_bucket
    while length < max_seq_len:
        buckets.append(length)
        length *= 2
    buckets.append(max_seq_len)
    return tuple(buckets)


def stable_group(sample_id: str, num_groups: int) -> int:
    """Group index of a sample, identical in every process, run and Python version."""
    digest = hashlib.sha1(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_groups


def batch_id_for(sample_ids: Iterable[str]) -> str:
    joined = "\n".join(sorted(sample_ids)).encode("utf-8")
    return hashlib.sha1(joined).hexdigest()[:BATCH_ID_HEX_CHARS]


def _num_tokens(sample: TokenizedSample) -> int:
    return int(np.asarray(sample["token_ids"]).shape[0])


def _smallest_bucket(length: int, buckets: Sequence[int]) -> int:
    index = bisect.bisect_left(buckets, length)
    return buckets[index]


def _pack_rows(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the fullest row that still has room.

    Rows are kept in a list sorted by remaining space, so a placement is a bisect instead of a scan of every row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for sample_index in sorted(order, key=lambda i: -lengths[i]):
        length = lengths[sample_index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
            rows[row].append(sample_index)
            remaining -= length
        else:
            row = len(rows)
            rows.append([sample_index])
            remaining = capacity - length
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


PACKINGS = ("packed", "rows")


def pack_samples(samples: list[TokenizedSample], batch_size: int, buckets: Sequence[int],
                 packing: str = "packed") -> list[Batch]:
    """Packs samples into batches of exactly `batch_size` rows whose length is one of `buckets`.

    `packing="packed"` puts several samples in a row (least padding); `"rows"` gives each sample a row of its
    own, right-padded, batched with samples of similar length: more padding, but attention kernels that take
    sequence lengths (cuDNN) then need no mask.

    Deterministic: the result depends only on the set of samples (they are sorted by sample id first).
    Within a batch, `samples` are ordered by (row, start) and `placements[i]` describes `samples[i]`, so the
    real tokens of a [B, L, ...] array taken in row-major order with `segment_ids > 0` come out exactly in sample
    order, then position order (see `real_token_mask`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {batch_size!r}")
    buckets = tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive lengths, got {buckets!r}")
    if packing not in PACKINGS:
        raise ValueError(f"--packing={packing!r} is not one of {', '.join(PACKINGS)}")
    if not samples:
        return []
    samples = sorted(samples, key=lambda s: s["sample_id"])
    for previous, current in zip(samples, samples[1:]):
        if previous["sample_id"] == current["sample_id"]:
            raise ValueError(
                f"sample_id {current['sample_id']!r} occurs twice in one batching group: sample ids must be "
                "unique (they name the output rows); check the reader's record ids"
            )
    lengths = [_num_tokens(s) for s in samples]
    for sample, length in zip(samples, lengths):
        if length == 0:
            raise ValueError(f"sample {sample['sample_id']!r} has no tokens; tokenize must reject empty samples")
        if length > buckets[-1]:
            raise ValueError(
                f"sample {sample['sample_id']!r} has {length} tokens, more than the largest bucket "
                f"{buckets[-1]} (--max_seq_len): tokenize's length policy should have shortened it or sent it to "
                "the dead letter"
            )
    if packing == "rows":
        rows = [[index] for index in range(len(samples))]
    else:
        capacity = _smallest_bucket(max(lengths), buckets)
        rows = _pack_rows(lengths, list(range(len(samples))), capacity)
    # Fullest rows first: the last, partly empty batch of a group then holds the shortest rows and can use a
    # smaller bucket.
    fills = [sum(lengths[i] for i in row) for row in rows]
    row_order = sorted(range(len(rows)), key=lambda r: (-fills[r], samples[rows[r][0]]["sample_id"]))
    batches = []
    for first in range(0, len(row_order), batch_size):
        chunk = [rows[r] for r in row_order[first:first + batch_size]]
        length = _smallest_bucket(max(sum(lengths[i] for i in row) for row in chunk), buckets)
        batches.append(_build_batch(samples, lengths, chunk, batch_size, length))
    return batches


def _build_batch(samples, lengths, rows, batch_size, length) -> Batch:
    tokens = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    positions = np.zeros((batch_size, length), np.int32)
    batch_samples, placements = [], []
    for row_index, row in enumerate(rows):
        # Within a row, samples go in sample-id order so a row's layout is canonical too.
        start = 0
        for segment, sample_index in enumerate(sorted(row), start=1):
            n = lengths[sample_index]
            sample = samples[sample_index]
            tokens[row_index, start:start + n] = np.asarray(sample["token_ids"], np.int32)
            segment_ids[row_index, start:start + n] = segment
            positions[row_index, start:start + n] = np.arange(n, dtype=np.int32)
            placements.append(Placement(len(batch_samples), row_index, start, n))
            batch_samples.append(sample)
            start += n
    return {
        "batch_id": batch_id_for(s["sample_id"] for s in batch_samples),
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "placements": placements,
        "samples": batch_samples,
    }


def real_token_mask(batch: Batch) -> np.ndarray:
    """Boolean [B, L]: True on real tokens. `array[real_token_mask(batch)]` on a [B, L, D] array yields the
    [n_real_tokens, D] rows in the order ExtractedBatch and the writer expect (sample order, then position)."""
    return np.asarray(batch["segment_ids"]) > 0


def num_real_tokens(batch: Batch) -> int:
    return int(sum(length for _, _, _, length in batch["placements"]))


def padding_fraction(batch: Batch) -> float:
    total = int(np.asarray(batch["tokens"]).size)
    return 1.0 - num_real_tokens(batch) / total if total else 0.0


def default_num_groups(total_tokens: int, batch_size: int, max_seq_len: int,
                       batches_per_group: int = DEFAULT_BATCHES_PER_GROUP) -> int:
    """Groups of about `batches_per_group` full batches: enough to pack well (only the last batch of a group may
    be partly empty, so at most ~1/batches_per_group padding from that) while one group's samples stay a bounded
    amount of worker memory (batches_per_group * batch_size * max_seq_len tokens)."""
    tokens_per_group = max(1, batches_per_group * batch_size * max_seq_len)
    return max(1, math.ceil(total_tokens / tokens_per_group))


class _PackGroup(beam.DoFn):
    def __init__(self, batch_size: int, buckets: tuple[int, ...], packing: str = "packed"):
        self._batch_size = batch_size
        self._buckets = buckets
        self._packing = packing
        self._batches, self._padding_tokens, self._real_tokens = (
            beam.metrics.Metrics.counter(NAMESPACE, name) for name in ("batches", "padding_tokens", "real_tokens"))
        # Distributions take integers: the padding fraction is reported in per mille.
        self._padding_permille = beam.metrics.Metrics.distribution(NAMESPACE, "padding_permille")

    def process(self, keyed_group):
        _, samples = keyed_group
        for batch in pack_samples(list(samples), self._batch_size, self._buckets, self._packing):
            real = num_real_tokens(batch)
            self._batches.inc()
            self._real_tokens.inc(real)
            self._padding_tokens.inc(int(batch["tokens"].size) - real)
            self._padding_permille.update(int(round(1000 * padding_fraction(batch))))
            yield batch


class BatchSamples(beam.PTransform):
    """TokenizedSample -> Batch, with batch composition a pure function of the set of samples.

    Trade-off: the GroupByKey is a shuffle barrier (no batch is emitted before every sample has been
    tokenized) and one group is packed in one worker's memory. `num_groups` sets that size; when None it is
    derived from the total token count (a global sum read as a side input) so that each group holds about
    `batches_per_group` full batches. A Reshuffle after packing spreads the batches of a group over workers for
    extraction (otherwise fusion would run a group's batches one after another on one worker)."""

    def __init__(self, batch_size: int, max_seq_len: int, num_groups: int | None = None,
                 batches_per_group: int = DEFAULT_BATCHES_PER_GROUP, buckets: Sequence[int] | None = None,
                 reshuffle: bool = True, packing: str = "packed", total_tokens=None):
        """`total_tokens`: an optional singleton PCollection of the samples' token count, when the caller has one
        already (the pipeline also needs it for its progress ETA); otherwise it is summed here."""
        super().__init__()
        self._total_tokens = total_tokens
        if packing not in PACKINGS:
            raise ValueError(f"--packing={packing!r} is not one of {', '.join(PACKINGS)}")
        self._packing = packing
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"--batch_size must be a positive integer, got {batch_size!r}")
        if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 1):
            raise ValueError(f"num_groups must be a positive integer or None, got {num_groups!r}")
        self._batch_size = batch_size
        self._max_seq_len = max_seq_len
        self._buckets = tuple(sorted(buckets)) if buckets else choose_buckets(max_seq_len)
        if self._buckets[-1] != max_seq_len:
            raise ValueError(f"the largest bucket {self._buckets[-1]} must equal --max_seq_len {max_seq_len}")
        self._num_groups = num_groups
        self._batches_per_group = batches_per_group
        self._reshuffle = reshuffle

    def expand(self, samples):
        if self._num_groups is not None:
            keyed = samples | "KeyByGroup" >> beam.Map(
                lambda s, n: (stable_group(s["sample_id"], n), s), n=self._num_groups)
        else:
            batch_size, max_seq_len, per_group = self._batch_size, self._max_seq_len, self._batches_per_group
            total = self._total_tokens
            if total is None:
                total = samples | "CountTokens" >> beam.Map(_num_tokens) | "SumTokens" >> beam.CombineGlobally(sum)
            num_groups = (
                total
                | "NumGroups" >> beam.Map(
                    lambda total: default_num_groups(total, batch_size, max_seq_len, per_group))
            )
            keyed = samples | "KeyByGroup" >> beam.Map(
                lambda s, n: (stable_group(s["sample_id"], n), s), n=beam.pvalue.AsSingleton(num_groups))
        batches = (
            keyed
            | "GroupSamples" >> beam.GroupByKey()
            | "Pack" >> beam.ParDo(_PackGroup(self._batch_size, self._buckets, self._packing))
        )
        if self._reshuffle:
            batches = batches | "SpreadBatches" >> beam.Reshuffle()
        return batches
