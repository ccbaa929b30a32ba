"""The model's own answers as samples (pipeline.run --generate): plain functions, no Beam.

For one batch of inference prompts (``TokenizedSample`` dicts, one per row): generate with model/generate.py, then
make each sample the final sequence, prompt plus generated tokens (stop tokens kept), whose activations the
normal capture forward then computes, so the stored vector at position t is the hook's value for token t given
tokens 0..t. Generated tokens are annotated part ``generated``; those that write a cell of the parsed answer grid
get its row, col and colour, found the way the prompt's cells are: the parsed grid re-encoded with the grid
encoder (``encode_with_cells``) and located in the generated text. An answer that does not parse, or whose text is
not the encoder's own writing of its grid, gets no cells. Every sample also gets its prediction row
(transforms/predictions.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from transforms.annotations import PART_CODES, annotate_tokens, label_characters
from transforms.batching import choose_buckets, pack_samples
from transforms.grid_encoders import GridEncoder
from transforms.predictions import prediction_row
from transforms.prompts import INFERENCE_ANSWER_START


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """What --generate needs besides the model: the answer budget, the grid encoder that parses answers, and the
    batch shape (rows, longest final sequence) the capture forward compiles for."""
    max_new_tokens: int
    grid_encoder: str
    batch_size: int
    max_seq_len: int


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """The decoded text of `ids` and each token's (start, end) character span in it.

    Each end is the length of the decoded prefix through that token (all prefixes decoded in one Rust call), so
    the spans are those of the text the tokens write in order; a token ending inside a multi-byte character spans
    the replacement character its prefix decodes to, and the token completing it an empty span."""
    ids = [int(t) for t in ids]
    if not ids:
        return "", np.zeros((0, 2), np.int32)
    backend = tokenizer.backend_tokenizer
    prefixes = backend.decode_batch([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=False)
    text = prefixes[-1]
    ends = np.minimum(np.maximum.accumulate(np.asarray([len(p) for p in prefixes], np.int32)), len(text))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int32)
    return text, np.stack([starts, ends], axis=1).astype(np.int32)


def answer_cells(text: str, grid, encoder: GridEncoder) -> np.ndarray:
    """``[n, 5]`` (char_start, char_end, row, col, colour) of the cells of `grid` in `text` (what the model wrote
    after the prompt's opening fence), or no rows when the encoder's own text of the grid is not found in it."""
    none = np.zeros((0, 5), np.int32)
    if grid is None:
        return none
    encoded, cells = encoder.encode_with_cells(grid)
    # Inference prompts end with the opening fence, so an encoder that writes one continues after it.
    skipped = len(INFERENCE_ANSWER_START) if encoded.startswith(INFERENCE_ANSWER_START) else 0
    offset = text.find(encoded[skipped:])
    if offset < 0:
        return none
    cells = np.asarray(cells, np.int32).copy()
    cells[:, :2] += offset - skipped
    return cells


def generated_annotations(text: str, spans: np.ndarray, grid, encoder: GridEncoder) -> dict[str, np.ndarray]:
    """Annotations of generated tokens with character `spans` in `text`: part ``generated``, no example, and
    the cell of the parsed answer `grid` (None: no cells) each token writes."""
    labels = label_characters(len(text), [(0, len(text), PART_CODES["generated"], -1)],
                              answer_cells(text, grid, encoder))
    annotations = annotate_tokens(spans, labels)
    if not len(text):  # tokens that decode to nothing still belong to the answer
        annotations["part"] = np.full(len(spans), PART_CODES["generated"], np.int8)
    return annotations


def extend_sample(sample: dict[str, Any], generated: np.ndarray, annotations: dict[str, np.ndarray],
                  text: str) -> dict[str, Any]:
    """The sample whose tokens are its prompt's followed by the generated ones; `prompt` becomes the text of both."""
    extended = dict(sample)
    extended["token_ids"] = np.concatenate([np.asarray(sample["token_ids"], np.int32),
                                            np.asarray(generated, np.int32)])
    extended["annotations"] = {key: np.concatenate([np.asarray(values), annotations[key].astype(values.dtype)])
                               for key, values in sample["annotations"].items()}
    extended["prompt"] = sample.get("prompt", "") + text
    extended["num_generated"] = int(len(generated))
    return extended


def prompt_bucket(longest: int, max_seq_len: int) -> int:
    """The padded prompt length of a generation batch: one of the capture's buckets, so few programs compile."""
    return next(bucket for bucket in choose_buckets(max_seq_len) if bucket >= longest)


def answer_batch(model, samples: Sequence[dict[str, Any]], settings: GenerateSettings, encoder: GridEncoder,
                 generate_fn: Callable | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(final samples, prediction rows) of one batch of inference prompts, in the order of `samples`.

    The batch is padded to `settings.batch_size` rows with copies of its first prompt (which stop when it does),
    so every batch runs one compiled program. `generate_fn` (default model.generate.generate) is replaceable
    for tests."""
    if generate_fn is None:
        from model.generate import generate as generate_fn
    if not samples or len(samples) > settings.batch_size:
        raise ValueError(f"a generation batch holds 1..{settings.batch_size} samples, got {len(samples)}")
    prompts = [np.asarray(s["token_ids"], np.int32) for s in samples]
    longest = max(len(p) for p in prompts)
    if longest + settings.max_new_tokens > settings.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus --max_new_tokens={settings.max_new_tokens} exceeds "
                         f"--max_seq_len={settings.max_seq_len}; tokenize should have rejected it")
    padded = prompts + [prompts[0]] * (settings.batch_size - len(prompts))
    result = generate_fn(model, padded, settings.max_new_tokens, bucket=prompt_bucket(longest, settings.max_seq_len))
    finals, predictions = [], []
    for row, sample in enumerate(samples):
        ids = np.asarray(result.tokens[row], np.int32)
        text, spans = token_char_spans(model.tokenizer, ids)
        prediction = prediction_row(sample, text, ids, result.logprobs[row], result.stop_reasons[row], encoder)
        annotations = generated_annotations(text, spans, prediction["grid"], encoder)
        finals.append(extend_sample(sample, ids, annotations, text))
        predictions.append(prediction)
    return finals, predictions


def capture_batch(finals: Sequence[dict[str, Any]], settings: GenerateSettings) -> dict[str, Any]:
    """The fixed-shape batch (transforms/batching.py, one sample per row) of the final sequences."""
    batches = pack_samples(list(finals), settings.batch_size, choose_buckets(settings.max_seq_len), packing="rows")
    if len(batches) != 1:
        raise ValueError(f"{len(finals)} final sequences made {len(batches)} batches of {settings.batch_size} rows")
    return batches[0]
