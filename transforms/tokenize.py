"""``ArcSample``/``TextSample`` -> ``TokenizedSample`` (docs/design.md): prompt text, token ids and annotations.

The rendered prompt is tokenized once with the fast tokenizer, which also returns each token's character
offsets; character labels (transforms/annotations.py) then become token annotations with numpy.

Length policy (``max_seq_len``): a sample fits when it has at most ``max_seq_len`` tokens. An ARC sample that
does not fit loses train examples from the end, as arc24 does, keeping at least one; if it still does not fit it
is rejected to the dead letter with its length. A text sample is cut into chunks of at most ``max_seq_len``
tokens, each its own sample ``f"{sample_id}/c{k}"``.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import apache_beam as beam
import numpy as np

from transforms.annotations import annotate_tokens, label_characters, text_annotations
from transforms.dead_letter import DEAD_LETTER_TAG, counter, reject
from transforms.grid_encoders import DEFAULT_GRID_ENCODER, GridEncoder, create_grid_encoder
from transforms.prompts import (
    DEFAULT_PROMPT_MODE, DEFAULT_PROMPT_VERSION, Prompt, check_chat_template, check_prompt_mode, encode_sample,
    get_prompt_version, render_prompt,
)

TOKENIZED_TAG = "samples"
# Samples whose prompts are tokenized in one call (on all cores); a few MB of prompt text.
TOKENIZE_BATCH = 64
DEFAULT_MAX_SEQ_LEN = 8192


class PromptTooLong(ValueError):
    pass


# What a malformed or too-long sample raises; it must reject that sample, not stop the run.
SAMPLE_ERRORS = (KeyError, TypeError, ValueError, IndexError)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(tokenizer_source: str | None):
    """One tokenizer per worker process and source: DoFn.setup runs per DoFn instance, this runs once."""
    from model.tokenizer import load_tokenizer
    from model.weights import resolve_checkpoint_dir

    if tokenizer_source in (None, "") or str(tokenizer_source).startswith("random:"):
        # A random:<geometry> model spec brings the offline Qwen2.5 tokenizer.
        return load_tokenizer(None)
    # The same resolution as the model's weights: a local directory, or a hub id found in the HF cache.
    directory, _ = resolve_checkpoint_dir(tokenizer_source)
    return load_tokenizer(directory)


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer: token offsets are needed for annotations; "
            "give a model directory with a tokenizer.json")
    return backend


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32 [n]) and character offsets (int32 [n, 2]) of ``text``, without added special tokens
    (special tokens written in the text, such as the chat template's, are recognised)."""
    return _arrays(_backend(tokenizer).encode(text, add_special_tokens=False))


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``encode_text`` of each text, in one call: the Rust tokenizer encodes them on all cores, without the GIL."""
    return [_arrays(encoding) for encoding in _backend(tokenizer).encode_batch(texts, add_special_tokens=False)]


def _arrays(encoding) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(encoding.ids, dtype=np.int32)
    # fromiter over the flattened pairs builds no list of tuples, as asarray would (hot path).
    offsets = np.fromiter(itertools.chain.from_iterable(encoding.offsets), dtype=np.int32,
                          count=2 * len(ids)).reshape(-1, 2)
    return ids, offsets


def _tokens_per_example(prompt: Prompt, offsets: np.ndarray) -> np.ndarray:
    """How many tokens start inside each train example's spans (the cost of keeping that example)."""
    counts = np.zeros(prompt.num_train_examples, dtype=np.int64)
    token_starts = offsets[:, 0]
    for start, end, _, index in prompt.spans:
        if index >= 0:
            counts[index] += np.searchsorted(token_starts, end) - np.searchsorted(token_starts, start)
    return counts


def _fewer_examples(prompt: Prompt, offsets: np.ndarray, n_tokens: int, max_seq_len: int) -> int:
    """The most train examples (fewer than now, at least 1) that the token counts say will fit."""
    counts = _tokens_per_example(prompt, offsets)
    n = prompt.num_train_examples
    for keep in range(n - 1, 0, -1):
        if n_tokens - counts[keep:].sum() <= max_seq_len:
            return keep
    return 1


def tokenize_arc_sample(
    sample: dict[str, Any], tokenizer, encoder: GridEncoder,
    prompt_version: str = DEFAULT_PROMPT_VERSION, prompt_mode: str = DEFAULT_PROMPT_MODE,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> dict[str, Any]:
    """The ``TokenizedSample`` of an ``ArcSample``; raises PromptTooLong when even one train example is too long."""
    return tokenize_arc_sample_with_count(sample, tokenizer, encoder, prompt_version, prompt_mode, max_seq_len)[0]


def tokenize_arc_sample_with_count(
    sample: dict[str, Any], tokenizer, encoder: GridEncoder,
    prompt_version: str = DEFAULT_PROMPT_VERSION, prompt_mode: str = DEFAULT_PROMPT_MODE,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> tuple[dict[str, Any], int]:
    """``tokenize_arc_sample`` and how many train examples the prompt kept."""
    encoded, prompt = _first_prompt(sample, tokenizer, encoder, prompt_version, prompt_mode)
    ids, offsets = encode_text(tokenizer, prompt.text)
    return _fit_arc_sample(sample, encoded, prompt, ids, offsets, tokenizer, prompt_version, prompt_mode,
                           max_seq_len)


def tokenize_arc_samples(
    samples: list[dict[str, Any]], tokenizer, encoder: GridEncoder,
    prompt_version: str = DEFAULT_PROMPT_VERSION, prompt_mode: str = DEFAULT_PROMPT_MODE,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_new_tokens: int = 0,
) -> list[tuple[tuple[dict[str, Any], int] | None, Exception | None]]:
    """``tokenize_arc_sample_with_count`` of each sample, the same results, with the prompts of all samples
    tokenized in one ``encode_texts`` call (all cores). Returns (result, None) or (None, error) per sample, in
    order: a malformed sample fails alone. `max_new_tokens` (--generate) is kept free in every sequence."""
    outcomes: list = [None] * len(samples)
    firsts = {}
    for index, sample in enumerate(samples):
        try:
            firsts[index] = _first_prompt(sample, tokenizer, encoder, prompt_version, prompt_mode)
        except SAMPLE_ERRORS as error:
            outcomes[index] = (None, error)
    encodings = encode_texts(tokenizer, [prompt.text for _, prompt in firsts.values()])
    for (index, (encoded, prompt)), (ids, offsets) in zip(firsts.items(), encodings):
        try:
            outcomes[index] = (_fit_arc_sample(samples[index], encoded, prompt, ids, offsets, tokenizer,
                                               prompt_version, prompt_mode, max_seq_len, max_new_tokens), None)
        except SAMPLE_ERRORS as error:
            outcomes[index] = (None, error)
    return outcomes


def _first_prompt(sample, tokenizer, encoder, prompt_version, prompt_mode):
    """The encoded grids and the prompt with every train example."""
    encoded = encode_sample(encoder, sample["train"], sample["test_input"], sample.get("test_output"))
    return encoded, render_prompt(tokenizer, encoded, prompt_version, prompt_mode, len(encoded.train))


def _too_long(n_tokens, num_train, of, max_seq_len, max_new_tokens) -> PromptTooLong:
    if not max_new_tokens:
        return PromptTooLong(
            f"prompt has {n_tokens} tokens with {num_train} train example(s) (of {of}), more than "
            f"--max_seq_len={max_seq_len}; raise --max_seq_len or use a more compact --grid_encoder")
    return PromptTooLong(
        f"prompt has {n_tokens} tokens with {num_train} train example(s) (of {of}); with --max_new_tokens="
        f"{max_new_tokens} that is {n_tokens + max_new_tokens} tokens, more than --max_seq_len={max_seq_len}; "
        "raise --max_seq_len, lower --max_new_tokens or use a more compact --grid_encoder")


def _fit_arc_sample(sample, encoded, prompt, ids, offsets, tokenizer, prompt_version, prompt_mode, max_seq_len,
                    max_new_tokens=0):
    """From the first prompt's tokens: drops train examples from the end until the prompt, and the
    `max_new_tokens` a --generate run adds to it, fit in `max_seq_len`; then annotates."""
    num_train = len(encoded.train)
    budget = max_seq_len - max_new_tokens
    while len(ids) > budget:
        if num_train <= 1:
            raise _too_long(len(ids), num_train, len(encoded.train), max_seq_len, max_new_tokens)
        num_train = _fewer_examples(prompt, offsets, len(ids), budget)
        prompt = render_prompt(tokenizer, encoded, prompt_version, prompt_mode, num_train)
        ids, offsets = encode_text(tokenizer, prompt.text)
    labels = label_characters(len(prompt.text), prompt.spans, prompt.cells)
    tokenized = {
        "sample_id": sample["sample_id"],
        "dataset": sample["dataset"],
        "task_id": sample["task_id"],
        "test_index": int(sample["test_index"]),
        "augmentation": sample["augmentation"],
        "prompt": prompt.text,
        "token_ids": ids,
        "annotations": annotate_tokens(offsets, labels),
    }
    if prompt_mode == "inference":
        # What a generated answer is scored against (None when the task has no known solution).
        tokenized["test_output"] = sample.get("test_output")
    return tokenized, num_train


def tokenize_text_sample(sample: dict[str, Any], tokenizer, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
                         ) -> list[dict[str, Any]]:
    """A ``TextSample`` as chunks of at most ``max_seq_len`` tokens, ids ``f"{sample_id}/c{k}"``; the
    ``prompt`` of a chunk is the text its tokens cover."""
    text = sample["text"]
    ids, offsets = encode_text(tokenizer, text)
    if len(ids) == 0:
        raise ValueError("text has no tokens")
    chunks = []
    for k, begin in enumerate(range(0, len(ids), max_seq_len)):
        end = min(begin + max_seq_len, len(ids))
        chunks.append({
            "sample_id": f"{sample['sample_id']}/c{k}",
            "dataset": sample["dataset"],
            "task_id": sample["task_id"],
            "test_index": int(sample.get("test_index", 0)),
            "augmentation": sample.get("augmentation", "{}"),
            "prompt": text[offsets[begin, 0]:offsets[end - 1, 1]],
            "token_ids": ids[begin:end].copy(),
            "annotations": text_annotations(end - begin),
        })
    return chunks


class _TokenizeDoFn(beam.DoFn):
    def __init__(self, tokenizer_source, grid_encoder: str, prompt_version: str, prompt_mode: str,
                 max_seq_len: int, max_new_tokens: int = 0):
        self.tokenizer_source = tokenizer_source
        self.grid_encoder = grid_encoder
        self.prompt_version = prompt_version
        self.prompt_mode = prompt_mode
        self.max_seq_len = max_seq_len
        self.max_new_tokens = max_new_tokens

    def setup(self):
        self.tokenizer = cached_tokenizer(self.tokenizer_source)
        self.encoder = create_grid_encoder(self.grid_encoder)
        self.samples_tokenized = counter("samples_tokenized")
        self.samples_rejected = counter("samples_rejected")
        self.tokens = counter("tokens")
        self.train_examples_dropped = counter("train_examples_dropped")
        self.chat_template_checked = False

    def process(self, samples):
        """`samples`: a list (from BatchElements), so that the prompts of many ARC samples are tokenized in one
        call on all cores."""
        arc = []
        for sample in samples:
            if isinstance(sample, dict) and "text" in sample:
                try:
                    outputs = tokenize_text_sample(sample, self.tokenizer, self.max_seq_len)
                except SAMPLE_ERRORS as error:
                    yield self._reject(sample, error)
                    continue
                yield from self._emit(outputs)
            else:
                arc.append(sample)
        if not arc:
            return
        if not self.chat_template_checked:
            # Checked on the first ARC sample, not in setup: text corpora need no chat template.
            check_chat_template(self.tokenizer, self.prompt_version)
            self.chat_template_checked = True
        outcomes = tokenize_arc_samples(arc, self.tokenizer, self.encoder, self.prompt_version, self.prompt_mode,
                                        self.max_seq_len, self.max_new_tokens)
        for sample, (result, error) in zip(arc, outcomes):
            if error is not None:
                yield self._reject(sample, error)
                continue
            tokenized, kept = result
            dropped = len(sample["train"]) - kept
            if dropped:
                self.train_examples_dropped.inc(dropped)
            yield from self._emit([tokenized])

    def _emit(self, outputs):
        for output in outputs:
            self.samples_tokenized.inc()
            self.tokens.inc(len(output["token_ids"]))
            yield output

    def _reject(self, sample, error):
        # PromptTooLong is a ValueError; KeyError & co. mean a malformed sample, which must not stop the run.
        self.samples_rejected.inc()
        source = sample.get("source", "<unknown>") if isinstance(sample, dict) else "<unknown>"
        reason = str(error) if isinstance(error, PromptTooLong) else f"{type(error).__name__}: {error}"
        sample_id = sample.get("sample_id", "?") if isinstance(sample, dict) else "?"
        return reject(source, "tokenize", f"sample {sample_id}: {reason}", sample)


class TokenizeSamples(beam.PTransform):
    """``ArcSample``/``TextSample`` -> ``TokenizedSample``.

    ``tokenizer_source``: the ``--model`` spec: a directory with tokenizer files, None (or ``random:...``) for
    the offline Qwen2.5 tokenizer; a hub id is looked up in the Hugging Face cache as the model's weights are.
    It is loaded once per worker process. Returns tagged outputs ``result.samples`` and ``result.dead_letter``
    (stage ``tokenize``). Counters in namespace ``arc_activations``: samples_tokenized, samples_rejected, tokens,
    train_examples_dropped. ``max_new_tokens`` (--generate): tokens each ARC prompt leaves free for its answer
    within ``max_seq_len``; a prompt that cannot is rejected with both numbers.
    """

    def __init__(self, tokenizer_source: str | None = None, grid_encoder: str = DEFAULT_GRID_ENCODER,
                 prompt_version: str = DEFAULT_PROMPT_VERSION, prompt_mode: str = DEFAULT_PROMPT_MODE,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_new_tokens: int = 0):
        super().__init__()
        # Fail at graph construction, not on a worker: these are user options.
        spec = create_grid_encoder(grid_encoder).spec
        get_prompt_version(prompt_version)
        check_prompt_mode(prompt_mode)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"--max_seq_len must be a positive integer, got {max_seq_len!r}")
        if not 0 <= max_new_tokens < max_seq_len:
            raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                             f"--max_seq_len={max_seq_len}")
        self._fn = _TokenizeDoFn(None if tokenizer_source is None else str(tokenizer_source), spec,
                                 prompt_version, prompt_mode, max_seq_len, max_new_tokens)

    def expand(self, samples):
        return (samples
                | "Group" >> beam.BatchElements(min_batch_size=TOKENIZE_BATCH, max_batch_size=TOKENIZE_BATCH)
                | "Tokenize" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG, main=TOKENIZED_TAG))
