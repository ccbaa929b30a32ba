import itertools

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from transforms.annotations import ANNOTATION_DTYPES, PART_CODES, part_names
from transforms.grid_encoders import create_grid_encoder
from transforms.prompts import build_prompt
from transforms.tokenize import (
    PromptTooLong, TokenizeSamples, encode_text, encode_texts, tokenize_arc_sample, tokenize_arc_sample_with_count,
    tokenize_arc_samples, tokenize_text_sample,
)

RNG = np.random.default_rng(0)


def grid(height, width):
    return RNG.integers(0, 10, size=(height, width)).tolist()


def arc_sample(sample_id="d:t/t0/a0", train_shapes=((3, 4), (2, 5)), test_shape=(7, 5), with_output=True):
    return {
        "sample_id": sample_id, "dataset": "d", "task_id": "t", "test_index": 0, "augmentation": '{"index":0}',
        "source": "d.json#t",
        "train": [{"input": grid(*shape), "output": grid(*shape[::-1])} for shape in train_shapes],
        "test_input": grid(*test_shape),
        "test_output": grid(*test_shape[::-1]) if with_output else None,
    }


SAMPLE = arc_sample()


def runs(annotations):
    """Run-length (part name, example index) sequence over tokens."""
    pairs = zip(part_names(annotations["part"]), annotations["example_index"].tolist())
    return [key for key, _ in itertools.groupby(pairs)]


def cell_tokens(tokenized, part, example_index=-1):
    a = tokenized["annotations"]
    mask = (a["part"] == PART_CODES[part]) & (a["example_index"] == example_index) & (a["row"] >= 0)
    return np.flatnonzero(mask)


def assert_cell_tokens_match_grid(tokenizer, tokenized, part, grid_, example_index=-1):
    a = tokenized["annotations"]
    positions = cell_tokens(tokenized, part, example_index)
    seen = []
    for position in positions:
        row, col, color = int(a["row"][position]), int(a["col"][position]), int(a["color"][position])
        assert tokenizer.decode([int(tokenized["token_ids"][position])]) == str(color)
        assert grid_[row][col] == color
        seen.append((row, col))
    # Every cell exactly once, in row-major order.
    assert seen == [(r, c) for r in range(len(grid_)) for c in range(len(grid_[0]))]


def test_every_cell_token_has_its_row_col_and_colour(qwen_tokenizer):
    out = tokenize_arc_sample(SAMPLE, qwen_tokenizer, create_grid_encoder())
    assert_cell_tokens_match_grid(qwen_tokenizer, out, "test_input", SAMPLE["test_input"])
    assert_cell_tokens_match_grid(qwen_tokenizer, out, "answer", SAMPLE["test_output"])
    for index, example in enumerate(SAMPLE["train"]):
        assert_cell_tokens_match_grid(qwen_tokenizer, out, "example_input", example["input"], index)
        assert_cell_tokens_match_grid(qwen_tokenizer, out, "example_output", example["output"], index)
    # Row numbers and shape digits are not cells.
    a = out["annotations"]
    assert int((a["row"] >= 0).sum()) == sum(
        len(g) * len(g[0]) for g in [SAMPLE["test_input"], SAMPLE["test_output"]]
        + [ex[k] for ex in SAMPLE["train"] for k in ("input", "output")])


@pytest.mark.parametrize("spec", ["minimal", "separation(|)", "code-block(row-number(minimal))"])
def test_cell_tokens_with_other_encoders(qwen_tokenizer, spec):
    out = tokenize_arc_sample(SAMPLE, qwen_tokenizer, create_grid_encoder(spec))
    assert_cell_tokens_match_grid(qwen_tokenizer, out, "test_input", SAMPLE["test_input"])


@pytest.mark.parametrize("spec", ["repeat(3)", "shape(replace(minimal))"])
def test_multi_character_cells_label_overlapping_tokens(qwen_tokenizer, spec):
    encoder = create_grid_encoder(spec)
    out = tokenize_arc_sample(SAMPLE, qwen_tokenizer, encoder)
    _, offsets = encode_text(qwen_tokenizer, out["prompt"])
    prompt = build_prompt(qwen_tokenizer, encoder, SAMPLE["train"], SAMPLE["test_input"], SAMPLE["test_output"])
    (test_start, test_end), = [(s, e) for s, e, code, _ in prompt.spans if code == PART_CODES["test_input"]]
    spans = {(r, c, k): (s, e) for s, e, r, c, k in prompt.cells.tolist() if test_start <= s < test_end}
    assert len(spans) == 35
    a = out["annotations"]
    for position in cell_tokens(out, "test_input"):
        start, end = spans[(int(a["row"][position]), int(a["col"][position]), int(a["color"][position]))]
        token_start, token_end = offsets[position]
        assert token_start < end and start < token_end  # the token overlaps the cell it is labelled with
    labelled = {(int(a["row"][p]), int(a["col"][p])) for p in cell_tokens(out, "test_input")}
    if spec.startswith("repeat"):
        assert len(labelled) == 35  # digits are single tokens, so every cell is labelled


def test_token_ids_dtypes_and_parts_in_order(qwen_tokenizer):
    out = tokenize_arc_sample(SAMPLE, qwen_tokenizer, create_grid_encoder())
    assert set(out) == {"sample_id", "dataset", "task_id", "test_index", "augmentation", "prompt", "token_ids",
                        "annotations"}
    assert out["token_ids"].dtype == np.int32
    assert out["token_ids"].tolist() == qwen_tokenizer(out["prompt"], add_special_tokens=False)["input_ids"]
    for name, dtype in ANNOTATION_DTYPES.items():
        assert out["annotations"][name].dtype == dtype
        assert out["annotations"][name].shape == out["token_ids"].shape
    assert runs(out["annotations"]) == [
        ("chat_markup", -1), ("system", -1), ("chat_markup", -1), ("instructions", -1),
        ("example_input", 0), ("example_output", 0), ("example_input", 1), ("example_output", 1),
        ("test_input", -1), ("chat_markup", -1), ("answer", -1), ("chat_markup", -1)]
    # The chat template's special tokens are markup.
    special = np.isin(out["token_ids"], qwen_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    assert special.sum() == 6 and np.all(out["annotations"]["part"][special] == PART_CODES["chat_markup"])


def test_inference_mode_ends_with_the_fence_and_no_end_of_turn(qwen_tokenizer):
    sample = arc_sample(with_output=False)
    out = tokenize_arc_sample(sample, qwen_tokenizer, create_grid_encoder(), prompt_mode="inference")
    assert out["prompt"].endswith("<|im_start|>assistant\n### Output\n\n```grid")
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out["token_ids"].tolist().count(im_end) == 2  # system and user turns only
    assert qwen_tokenizer.decode(out["token_ids"][-2:].tolist()) == "```grid"
    assert runs(out["annotations"])[-2:] == [("chat_markup", -1), ("answer", -1)]
    assert not np.any(out["annotations"]["row"][out["annotations"]["part"] == PART_CODES["answer"]] >= 0)


def test_length_policy_drops_train_examples_from_the_end(qwen_tokenizer):
    encoder = create_grid_encoder()
    sample = arc_sample(train_shapes=((6, 6), (5, 7), (8, 4), (6, 5)), test_shape=(5, 5))
    lengths = {}
    for n in range(1, 5):
        prompt = build_prompt(qwen_tokenizer, encoder, sample["train"], sample["test_input"], sample["test_output"],
                              num_train=n)
        lengths[n] = len(encode_text(qwen_tokenizer, prompt.text)[0])
    assert lengths[1] < lengths[2] < lengths[3] < lengths[4]
    out, kept = tokenize_arc_sample_with_count(sample, qwen_tokenizer, encoder, max_seq_len=lengths[4])
    assert kept == 4 and len(out["token_ids"]) == lengths[4]
    out, kept = tokenize_arc_sample_with_count(sample, qwen_tokenizer, encoder, max_seq_len=lengths[3] - 1)
    assert kept == 2 and len(out["token_ids"]) == lengths[2]
    assert "## Example 2" in out["prompt"] and "## Example 3" not in out["prompt"]
    out, kept = tokenize_arc_sample_with_count(sample, qwen_tokenizer, encoder, max_seq_len=lengths[1])
    assert kept == 1
    with pytest.raises(PromptTooLong, match=f"{lengths[1]} tokens with 1 train example.*--max_seq_len={lengths[1] - 1}"):
        tokenize_arc_sample(sample, qwen_tokenizer, encoder, max_seq_len=lengths[1] - 1)


def test_text_sample_chunks(qwen_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    sample = {"sample_id": "web:3", "dataset": "web", "task_id": "3", "test_index": 0, "augmentation": "{}",
              "source": "web.jsonl:3", "text": text}
    full = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = tokenize_text_sample(sample, qwen_tokenizer, max_seq_len=64)
    assert [c["sample_id"] for c in chunks] == [f"web:3/c{k}" for k in range(len(chunks))]
    assert len(chunks) == -(-len(full) // 64)
    assert all(len(c["token_ids"]) == 64 for c in chunks[:-1])
    assert np.concatenate([c["token_ids"] for c in chunks]).tolist() == full
    assert "".join(c["prompt"] for c in chunks) == text  # each chunk's prompt is exactly the text it covers
    for chunk in chunks:
        assert set(part_names(chunk["annotations"]["part"])) == {"text"}
        assert np.all(chunk["annotations"]["row"] == -1) and np.all(chunk["annotations"]["example_index"] == -1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from model.tokenizer import write_qwen25_tokenizer

    return str(write_qwen25_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_tokenize_samples_pipeline(tokenizer_dir, qwen_tokenizer):
    good = [arc_sample(f"d:t/t0/a{k}") for k in range(2)]
    too_long = dict(arc_sample("d:big/t0/a0", train_shapes=((30, 30),), test_shape=(30, 30)), source="d.json#big")
    text = {"sample_id": "web:0", "dataset": "web", "task_id": "0", "test_index": 0, "augmentation": "{}",
            "source": "web.jsonl:0", "text": "word " * 700}
    malformed = {"sample_id": "d:x/t0/a0", "source": "d.json#x", "train": []}
    max_seq_len = 512
    expected = {s["sample_id"]: tokenize_arc_sample(s, qwen_tokenizer, create_grid_encoder(),
                                                    max_seq_len=max_seq_len)["token_ids"].tolist() for s in good}
    expected.update({c["sample_id"]: c["token_ids"].tolist()
                     for c in tokenize_text_sample(text, qwen_tokenizer, max_seq_len)})

    pipeline = beam.Pipeline(runner=FnApiRunner())
    result = pipeline | beam.Create(good + [too_long, text, malformed]) | TokenizeSamples(
        tokenizer_source=tokenizer_dir, max_seq_len=max_seq_len)
    assert_that(result.samples | beam.Map(lambda s: (s["sample_id"], s["token_ids"].tolist())),
                equal_to(list(expected.items())), label="tokens")
    assert_that(
        result.dead_letter | beam.Map(lambda d: (d["source"], d["stage"], d["reason"].split(":")[0],
                                                 "--max_seq_len=512" in d["reason"])),
        equal_to([("d.json#big", "tokenize", "sample d", True), ("d.json#x", "tokenize", "sample d", False)]),
        label="dead")
    run = pipeline.run()
    run.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in run.metrics().query(MetricsFilter().with_namespace("arc_activations"))["counters"]}
    assert counters["samples_tokenized"] == len(expected)
    assert counters["samples_rejected"] == 2
    assert counters["tokens"] == sum(len(ids) for ids in expected.values())


def test_tokenize_samples_rejects_bad_options():
    with pytest.raises(ValueError, match="grid encoder 'nope'"):
        TokenizeSamples(grid_encoder="nope")
    with pytest.raises(ValueError, match="--prompt_version"):
        TokenizeSamples(prompt_version="v2")
    with pytest.raises(ValueError, match="--max_seq_len"):
        TokenizeSamples(max_seq_len=0)


def test_tokenizer_source_follows_the_model_spec(tokenizer_dir):
    from transforms.tokenize import cached_tokenizer

    assert cached_tokenizer(tokenizer_dir).convert_tokens_to_ids("<|im_end|>") == 151645
    assert cached_tokenizer("random:qwen2.5-0.5b?layers=2").convert_tokens_to_ids("<|im_start|>") == 151644
    with pytest.raises(Exception, match="does not exist"):
        cached_tokenizer("/nonexistent/checkpoint")


def test_batched_tokenization_equals_one_sample_at_a_time(qwen_tokenizer):
    """What TokenizeSamples runs (a batch of prompts in one tokenizer call) gives each sample exactly what the
    one-sample path gives, errors included, in order."""
    encoder = create_grid_encoder()
    long = arc_sample("d:long/t0/a0", train_shapes=((9, 9), (8, 9), (9, 8), (7, 9)), test_shape=(9, 9))
    broken = dict(arc_sample("d:broken/t0/a0"))
    del broken["test_input"]
    samples = [arc_sample(f"d:t{i}/t0/a0", test_shape=(i + 1, 3)) for i in range(5)] + [long, broken, "not a dict"]
    one_train = len(tokenize_arc_sample_with_count(long, qwen_tokenizer, encoder, max_seq_len=10**6)[0]["token_ids"])
    seen = set()
    for max_seq_len in (10**6, one_train - 150, 40):
        outcomes = tokenize_arc_samples(samples, qwen_tokenizer, encoder, max_seq_len=max_seq_len)
        seen.update(type(error).__name__ for _, error in outcomes if error is not None)
        seen.update("dropped" for result, _ in outcomes if result is not None and result[1] < 4 and
                    result[0]["sample_id"] == long["sample_id"])
        assert len(outcomes) == len(samples)
        for sample, (result, error) in zip(samples, outcomes):
            try:
                want, want_error = tokenize_arc_sample_with_count(sample, qwen_tokenizer, encoder,
                                                                  max_seq_len=max_seq_len), None
            except (KeyError, TypeError, ValueError, IndexError) as caught:
                want, want_error = None, caught
            if want_error is not None:
                assert result is None and type(error) is type(want_error) and str(error) == str(want_error)
                continue
            assert error is None and result[1] == want[1]
            assert result[0]["prompt"] == want[0]["prompt"]
            np.testing.assert_array_equal(result[0]["token_ids"], want[0]["token_ids"])
            for key, values in want[0]["annotations"].items():
                np.testing.assert_array_equal(result[0]["annotations"][key], values)
    assert seen == {"dropped", "PromptTooLong", "KeyError", "TypeError"}, seen
    assert tokenize_arc_samples([], qwen_tokenizer, encoder) == []
    texts = ["a b c", "", "<|im_start|>user\n12 34"]
    for (ids, offsets), text in zip(encode_texts(qwen_tokenizer, texts), texts):
        want_ids, want_offsets = encode_text(qwen_tokenizer, text)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(offsets, want_offsets)
