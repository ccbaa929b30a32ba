"""`python -m pipeline.run --generate`: a tiny random checkpoint continues real ARC-AGI inference prompts; the
activations of prompt plus answer equal a plain capture of the final sequence, every sample has one prediction
committed with its shard, bad input is counted or dead-lettered, --resume completes a partly committed output,
verify checks predictions files, and pipeline.submission votes them into an ARC Prize submission."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.arc_fixtures import smallest_tasks
from tests.test_end_to_end import run_here, verify_here
from transforms.annotations import PART_CODES
from transforms.write import activations_to_numpy

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("resid_post", "mlp_out")
NEW_TOKENS = 24
# The long task's inference prompt has 711 tokens: it fits in 720 alone, not with 24 new tokens.
MAX_SEQ_LEN = 720
GRID12 = [[(r * 7 + c) % 10 for c in range(12)] for r in range(12)]


def _dataset(path: Path) -> dict:
    tasks = smallest_tasks(3)
    first = next(iter(tasks.values()))
    tasks["notruth0"] = {"train": first["train"], "test": [{"input": first["test"][0]["input"]}]}
    tasks["badbool0"] = {"train": [{"input": [[0, True]], "output": [[1, 1]]}],
                         "test": [{"input": [[0, 0]], "output": [[1, 1]]}]}
    tasks["long0"] = {"train": [{"input": GRID12, "output": GRID12}], "test": [{"input": GRID12}]}
    path.write_text(json.dumps(tasks))
    return tasks


def _args(checkpoint, dataset, output, *extra) -> list[str]:
    return [f"--model={checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=0,1",
            f"--hooks={','.join(HOOKS)}", "--dtype=float32", "--batch_size=4", f"--max_seq_len={MAX_SEQ_LEN}",
            "--augmentations=1", "--progress_interval=0", "--generate", "--prompt_mode=inference",
            f"--max_new_tokens={NEW_TOKENS}", *extra]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("generate")
    tasks = _dataset(work / "challenges.json")
    output = work / "out"
    done = run_here(*_args(tiny_checkpoint, work / "challenges.json", output))
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return SimpleNamespace(work=work, output=output, tasks=tasks, summary=summary, dataset=work / "challenges.json")


def _predictions(output: Path) -> list[dict]:
    return ds.dataset(output / "predictions", format="parquet").to_table().to_pylist()


def _verify(output: Path, *extra: str) -> subprocess.CompletedProcess:
    return verify_here(output, *extra)


def test_stored_activations_equal_a_plain_capture_of_prompt_plus_answer(generated, tiny_checkpoint):
    from model import CaptureSpec, load_model
    from model.hooks import hook_name

    samples = ds.dataset(generated.output / "samples", format="parquet").to_table().to_pylist()
    predictions = {row["sample_id"]: row for row in _predictions(generated.output)}
    acts = ds.dataset(generated.output / "activations", format="parquet", partitioning="hive").to_table()
    frame = {name: acts.column(name).to_numpy(zero_copy_only=False)
             for name in ("sample_id", "hook", "layer", "position", "token_id", "part")}
    values = activations_to_numpy(acts)
    model = load_model(str(tiny_checkpoint), dtype="float32", attention="xla")
    spec = CaptureSpec(hooks=HOOKS, layers=(0, 1), out_dtype="float32")
    worst = 0.0
    for sample in samples:
        ids = np.asarray(sample["token_ids"], np.int32)
        generated_ids = predictions[sample["sample_id"]]["token_ids"]
        assert len(generated_ids) == NEW_TOKENS and ids[-NEW_TOKENS:].tolist() == generated_ids
        n = len(ids)
        plain = model.capture(ids[None], np.ones((1, n), np.int32), np.arange(n, dtype=np.int32)[None], spec)
        mine = frame["sample_id"] == sample["sample_id"]
        for hook in HOOKS:
            for layer in (0, 1):
                rows = np.flatnonzero(mine & (frame["hook"] == hook) & (frame["layer"] == layer))
                order = rows[np.argsort(frame["position"][rows])]
                assert frame["position"][order].tolist() == list(range(n))
                parts = frame["part"][order]
                assert set(parts[-NEW_TOKENS:]) == {"generated"} and "generated" not in set(parts[:-NEW_TOKENS])
                reference = np.asarray(plain[hook_name(layer, hook)])[0]
                error = float(np.max(np.abs(values[order] - reference)) / np.max(np.abs(reference)))
                worst = max(worst, error)
                assert error <= 1e-5, (sample["sample_id"], hook, layer, error)
    assert len(samples) == 8 and worst > 0.0  # compared real numbers, not two copies of one array


def test_one_prediction_per_sample_scored_or_unknown(generated):
    samples = ds.dataset(generated.output / "samples", format="parquet").to_table()
    rows = _predictions(generated.output)
    assert sorted(r["sample_id"] for r in rows) == sorted(samples.column("sample_id").to_pylist())
    assert len(rows) == 8  # (3 tasks with a truth + 1 without) x 2 augmentations
    for row in rows:
        # A random model never closes its grid: bounded by max_new_tokens, recorded, never raised.
        assert row["stop_reason"] == "max_new_tokens" and row["num_generated"] == NEW_TOKENS
        assert row["grid"] is None and row["parse_error"].startswith("truncated")
        assert np.isfinite(row["logprob_sum"]) and row["logprob_sum"] < 0
        if row["task_id"] == "notruth0":
            assert row["correct"] is None and row["ground_truth"] is None
        else:
            truth = generated.tasks[row["task_id"]]["test"][0]["output"]
            assert row["correct"] is False and row["ground_truth"] == truth
    summary = generated.summary
    assert summary["samples_generated"] == 8 and summary["generation_truncated"] == 8
    assert summary["predictions_unknown"] == 2 and summary["generated_tokens"] == 8 * NEW_TOKENS


def test_counts_add_up_and_a_prompt_without_room_for_its_answer_is_dead_lettered(generated):
    manifest = json.loads((generated.output / "manifest.json").read_text())
    run = manifest["run_counters"]
    assert run["records_read"] == 6 == run["records_valid"] + run["records_rejected"]
    assert run["samples_expanded"] == 10 == manifest["counts"]["samples"] + run["samples_rejected"]
    letters = [json.loads(line) for path in sorted((generated.output / "dead_letter").glob("*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    long = [letter for letter in letters if "long0" in letter["reason"]]
    assert len(long) == 2 and all(letter["stage"] == "tokenize" for letter in long)
    reason = long[0]["reason"]
    assert "711 tokens" in reason and f"--max_new_tokens={NEW_TOKENS}" in reason
    assert f"--max_seq_len={MAX_SEQ_LEN}" in reason and "735" in reason
    section = manifest["predictions"]
    assert section["rows"] == 8 and section["truncated"] == 8 and section["unknown"] == 2
    assert manifest["identity"]["generate"] == "true" and manifest["identity"]["max_new_tokens"] == str(NEW_TOKENS)


def test_verify_accepts_the_output_and_submission_votes_it(generated, tmp_path):
    done = _verify(generated.output)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "submission.json"
    done = subprocess.run([sys.executable, "-m", "pipeline.submission", str(generated.output), f"--out={out}"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    submission = json.loads(out.read_text())
    assert set(submission) == set(generated.tasks) - {"badbool0", "long0"}
    for entries in submission.values():
        assert len(entries) == 1 and set(entries[0]) == {"attempt_1", "attempt_2"}
    assert "top-1 0.0%" in done.stdout and "over 3 tasks with a known answer (1 unknown)" in done.stdout
    manifest = json.loads((generated.output / "manifest.json").read_text())
    assert manifest["submission"]["tasks"] == 4 and manifest["submission"]["predictions"] == 8


def _copy(generated, tmp_path) -> Path:
    output = tmp_path / "out"
    shutil.copytree(generated.output, output)
    return output


def test_resume_after_a_partial_commit_gives_every_prediction_once(generated, tiny_checkpoint, tmp_path):
    output = _copy(generated, tmp_path)
    markers = sorted((output / "samples").glob("*.parquet"))
    assert len(markers) == 2
    # A run killed between its predictions file and its commit marker: that shard is not committed.
    markers[0].unlink()
    (output / "predictions" / f".tmp-0123-{markers[0].name}").write_bytes(b"partial")
    done = run_here(*_args(tiny_checkpoint, generated.dataset, output, "--resume"))
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert 0 < summary["samples_generated"] < 8
    rows = _predictions(output)
    assert len(rows) == 8 and len({row["sample_id"] for row in rows}) == 8
    assert not list((output / "predictions").glob(".tmp-*"))
    verify = _verify(output)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_resume_with_other_generation_flags_is_refused(generated, tiny_checkpoint):
    args = _args(tiny_checkpoint, generated.dataset, generated.output, "--resume")
    done = run_here(*[a for a in args if not a.startswith("--max_new_tokens")], "--max_new_tokens=16",
                    check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"max_new_tokens: recorded '{NEW_TOKENS}', this run '16' (pass --max_new_tokens)" in done.stderr
    plain = [a for a in args if a not in ("--generate", f"--max_new_tokens={NEW_TOKENS}")]
    done = run_here(*plain, check=False)
    assert done.returncode == 2 and "generate: recorded 'true', this run 'false'" in done.stderr


def test_verify_checks_predictions_and_repair_keeps_committed_ones(generated, tmp_path):
    output = _copy(generated, tmp_path)
    files = sorted((output / "predictions").glob("*.parquet"))
    damaged, kept = files
    damaged.write_bytes(kept.read_bytes())  # a valid Parquet file, but not the one its marker lists
    stray = output / "predictions" / "h000-00000000000000aa.parquet"
    shutil.copy(kept, stray)
    done = _verify(output)
    assert done.returncode == 1
    assert f"ERROR predictions/{damaged.name}: sha256" in done.stdout
    assert f"predictions/{stray.name}: predictions file listed by no commit marker" in done.stdout
    done = _verify(output, "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert kept.exists() and not damaged.exists() and not stray.exists()
    assert (output / "samples" / kept.name).exists() and not (output / "samples" / damaged.name).exists()


# ------------------------------------------------------------------------------------ plain functions

def _result(token_lists, reasons):
    from model.generate import GenerationResult

    return GenerationResult(tokens=[np.asarray(t, np.int32) for t in token_lists],
                            logprobs=[np.full(len(t), -0.5, np.float32) for t in token_lists],
                            stop_reasons=list(reasons), steps=max(len(t) for t in token_lists), timings={})


def test_answer_batch_scores_annotates_cells_and_records_failures(qwen_tokenizer):
    from transforms.answers import GenerateSettings, answer_batch, capture_batch
    from transforms.grid_encoders import create_grid_encoder
    from transforms.tokenize import tokenize_arc_sample

    encoder = create_grid_encoder()
    truth = [[1, 2], [3, 0]]
    task = {"train": [{"input": [[0, 1]], "output": [[1, 0]]}], "test_input": [[5, 5], [5, 5]]}
    samples = []
    for index, output in enumerate((truth, truth, None)):
        raw = {"sample_id": f"t{index}/t0/a0", "dataset": "d", "task_id": f"t{index}", "test_index": 0,
               "augmentation": '{"index":0}', "test_output": output, **task}
        samples.append(tokenize_arc_sample(raw, qwen_tokenizer, encoder, prompt_mode="inference"))
    right = encoder.to_text(truth)[len("```grid"):] + "<|im_end|>"
    impossible = " shape: 2x2\n1 12\n2 3\n```<|im_end|>"
    scripted = [qwen_tokenizer.encode(text, add_special_tokens=False) for text in (right, impossible, right)]
    calls = []

    def fake_generate(model, prompts, max_new_tokens, bucket):
        calls.append((len(prompts), bucket))
        return _result(scripted + [scripted[0]] * (len(prompts) - 3), ["im_end"] * len(prompts))

    settings = GenerateSettings(max_new_tokens=40, grid_encoder=encoder.spec, batch_size=4, max_seq_len=1024)
    finals, predictions = answer_batch(SimpleNamespace(tokenizer=qwen_tokenizer), samples, settings, encoder,
                                       fake_generate)
    assert calls == [(4, 256)]  # padded to the batch size, one of the capture's buckets
    assert [p["correct"] for p in predictions] == [True, False, None]
    assert predictions[0]["grid"] == truth and predictions[0]["logprob_sum"] == pytest.approx(-0.5 * len(scripted[0]))
    assert predictions[1]["grid"] is None and "impossible grid" in predictions[1]["parse_error"]
    first = finals[0]
    n_prompt = len(samples[0]["token_ids"])
    assert first["token_ids"][n_prompt:].tolist() == scripted[0] and first["prompt"].endswith(right)
    part = first["annotations"]["part"]
    assert (part[n_prompt:] == PART_CODES["generated"]).all() and (part[:n_prompt] != PART_CODES["generated"]).all()
    cells = {(int(r), int(c), int(v)) for r, c, v in zip(*(first["annotations"][k][n_prompt:]
                                                           for k in ("row", "col", "color"))) if r >= 0}
    assert cells == {(0, 0, 1), (0, 1, 2), (1, 0, 3), (1, 1, 0)}
    assert (finals[1]["annotations"]["row"][len(samples[1]["token_ids"]):] == -1).all()
    batch = capture_batch(finals, settings)
    assert len(batch["samples"]) == 3 and batch["tokens"].shape == (4, 256)


def test_generate_options_are_checked_together():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ExtractOptions, OptionError

    def check(*argv):
        PipelineOptions(["--output=/tmp/x", *argv]).view_as(ExtractOptions).validate_extract()

    check("--generate", "--prompt_mode=inference", "--max_new_tokens=10")
    with pytest.raises(OptionError, match="--prompt_mode=inference"):
        check("--generate")
    with pytest.raises(OptionError, match="text corpus"):
        check("--generate", "--prompt_mode=inference", "--dataset=text:/tmp/corpus.jsonl")
    with pytest.raises(OptionError, match="pass --generate"):
        check("--max_new_tokens=10")
    with pytest.raises(OptionError, match="--max_new_tokens=64 leaves no room.*--max_seq_len=64"):
        check("--generate", "--prompt_mode=inference", "--max_new_tokens=64", "--max_seq_len=64")


def test_identities_recorded_before_generation_still_match():
    from pipeline.identity import FLAGS, differences

    old = {key: "x" for key in FLAGS if key not in ("generate", "max_new_tokens")}
    assert differences(old, {**old, "generate": "false", "max_new_tokens": "0"}) == []
    assert differences(old, {**old, "generate": "true", "max_new_tokens": "30"})
