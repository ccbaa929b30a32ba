"""`python -m pipeline.bench`: the CPU smoke run end to end (no timing asserts) and the arithmetic behind it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import QWEN25_GEOMETRIES
from pipeline.bench import accelerator, baseline, driver, end_to_end, inputs, ours, report, settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """One smoke run in this process: tiny geometry, CPU, the all-layer case, all three paths. (The one-layer case
    runs all three paths in test_quick_profile_smoke_builds_the_weights_once_in_memory.)"""
    out = tmp_path_factory.mktemp("bench")
    code = driver.main(["--smoke", "--layers=all", "--output_dir", str(out), "--peak_tflops", "0.5"])
    assert code == 0
    files = sorted(out.glob("bench-*-smoke.json"))
    assert len(files) == 1, files
    assert not list(out.glob("bench-work-*")), "the scratch folder must be removed"
    return json.loads(files[0].read_text())


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_runs_every_path_on_every_case(smoke_results):
    r = smoke_results
    assert r["smoke"] is True
    assert r["device"]["jax_platform"] == "cpu"
    assert r["device"]["baseline_device"] == "cpu"
    assert r["settings"]["dtype"] == "float32"
    assert r["software"]["jax"] and r["software"]["torch"] and r["software"]["transformers"]
    assert [c["case"] for c in r["cases"]] == ["tiny/all-layers"]
    assert r["skipped"] == [] and r["errors"] == []
    for case in r["cases"]:
        assert case["length"] == 64 and case["batch_size"] == 2 and case["tokens_per_batch"] == 128
        depth = QWEN25_GEOMETRIES["tiny"].num_hidden_layers
        assert case["layers"] == ([depth // 2] if case["layers_mode"] == "one" else list(range(depth)))
        ours, base, pipe = case["ours"], case["baseline"], case["pipeline"]
        for value in (ours["forward_tok_s"], ours["copy_tok_s"], ours["compile_s"], ours["forward_compile_s"],
                      ours["load_s"], ours["forward_mfu"], ours["copy_mfu"],
                      base["forward_tok_s"], base["copy_tok_s"], base["write_tok_s"], base["write_bytes_per_s"],
                      pipe["tok_s"], pipe["bytes_per_s"], pipe["end_to_end_tok_s"], pipe["main_s"], pipe["mfu"],
                      pipe["bytes_per_value"], case["flops_per_token_forward"], case["flops_per_token_capture"]):
            assert _positive(value), case
        assert ours["steps"] == base["steps"] == 2
        # float32 compute crosses to host as float32, 4 bytes per value per requested layer.
        assert ours["host_bytes_per_token"] == 4 * 64 * len(case["layers"])
        assert base["written_tokens"] == 2 * 128 and base["bytes_written"] > 0
        # Every token of the synthetic corpus came back once (run_pipeline checks it against the corpus).
        assert pipe["tokens"] == pipe["corpus_tokens"] == pipe["batches"] * 128
        assert pipe["shards"] == pipe["batches"] >= 2
        assert pipe["rate_basis"] == "durable"
        # float32 values with BYTE_STREAM_SPLIT + ZSTD: random float32 barely compresses.
        assert 1.0 < pipe["bytes_per_value"] < 5.0
        assert "--runner=DirectRunner" in pipe["argv"]
        for name, value in case["ratios"].items():
            assert _positive(value), (case["case"], name)
        # Same weights, same tokens: ours equals transformers (float32) on every compared layer.
        agreement = case["agreement"]
        assert agreement["ok"] and agreement["max_relative_error"] < 1e-4, agreement
        assert agreement["layers"] == [layer for layer in case["layers"] if layer < depth - 1]


def test_smoke_leaves_no_model_behind(smoke_results):
    """After the run neither our model nor the pipeline's (which Beam's Shared would keep alive) holds memory."""
    import gc

    from model.qwen2 import HookedQwen

    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is HookedQwen]


def test_smoke_measures_disk_and_reports_targets(smoke_results):
    disk = smoke_results["disk"]
    assert disk["bytes"] == 32 << 20 and _positive(disk["bytes_per_s"]) and _positive(disk["seconds"])
    targets = smoke_results["targets"]
    # The tiny geometry is none of the targets' models: no target applies, and none is claimed.
    assert targets == []


def test_smoke_table_names_every_case(smoke_results, capsys):
    table = report.format_table(smoke_results)
    assert "tiny/all-layers" in table and "disk:" in table


def test_flops_match_the_documented_count():
    config = QWEN25_GEOMETRIES["qwen2.5-0.5b"]
    per_token = accelerator.flops_per_token(config, 2048, config.num_hidden_layers)
    # docs/benchmarks.md: the 0.5B forward costs about 0.8 GFLOP per token at L=2048 without the LM head.
    assert 0.79e9 < per_token < 0.82e9
    assert accelerator.flops_per_token(config, 2048, 13) == pytest.approx(per_token * 13 / 24)
    # 0.5B: 24 layers of ~14.9M weights, 2 FLOPs each, plus attention 2 * 2 * 2048 * 896 / 2 per layer.
    assert per_token == pytest.approx(24 * (2 * 14.91e6 + 2 * 2048 * 896), rel=2e-3)


@pytest.mark.parametrize("kind, platform, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "gpu", "bfloat16", 756.0),
    ("NVIDIA H200", "gpu", "bfloat16", 989.0),
    ("TPU v5 lite", "tpu", "bfloat16", 197.0),
    ("NVIDIA H100 80GB HBM3", "gpu", "float32", None),
    ("cpu", "cpu", "bfloat16", None),
])
def test_default_peak_tflops(kind, platform, dtype, expected):
    assert accelerator.default_peak_tflops(kind, platform, dtype) == expected


def test_pipeline_rates_leave_startup_outside():
    shards = [{"committed": 100.0 + t, "tokens": 1000, "bytes": 4000, "activation_bytes": 3500}
              for t in (0.0, 1.0, 2.0)]
    rates = end_to_end.pipeline_rates(shards, main_s=30.0, sync_s=1.0)
    assert rates["steady_tok_s"] == pytest.approx(2000 / 2.0)
    assert rates["durable_tok_s"] == pytest.approx(2000 / 3.0)
    assert rates["durable_bytes_per_s"] == pytest.approx(8000 / 3.0)
    assert rates["end_to_end_tok_s"] == pytest.approx(3000 / 31.0)
    assert (rates["tok_s"], rates["rate_basis"]) == (rates["durable_tok_s"], "durable")
    one = end_to_end.pipeline_rates(shards[:1], main_s=10.0, sync_s=0.0)
    assert one["steady_tok_s"] is None and one["rate_basis"] == "end_to_end" and one["tok_s"] == 100.0


def test_targets_pass_fail_and_missing():
    def entry(model, mode, length, **ratios):
        base = dict.fromkeys(("forward_vs_baseline", "pipeline_vs_baseline_copy", "pipeline_vs_disk"))
        return {"model": model, "layers_mode": mode, "case": f"{model}/{mode}", "length": length,
                "ratios": {**base, **ratios}}

    cases = [entry("qwen2.5-0.5b", "one", 2048, forward_vs_baseline=1.9, pipeline_vs_baseline_copy=2.5),
             entry("qwen2.5-0.5b", "all", 2048, pipeline_vs_disk=0.75),
             entry("qwen2.5-7b", "one", 2048)]
    targets = {(t["target"], t["length"]): t for t in report.check_targets(cases, "NVIDIA H100 80GB HBM3")}
    assert targets[("0.5b-forward", 2048)]["passed"] is True
    assert targets[("0.5b-one-layer-pipeline", 2048)]["passed"] is False
    assert targets[("0.5b-all-layers-disk", 2048)]["passed"] is True
    assert targets[("7b-forward", 2048)]["passed"] is None
    assert all(t["binding"] for t in targets.values())
    assert all(t["same_model_checked"] is None for t in targets.values())
    informational = report.check_targets(cases, "cpu")
    assert informational and not any(t["binding"] for t in informational)


def test_case_selection():
    def names(*argv):
        return [c.name for c in settings.parse_settings(list(argv)).cases]

    assert names() == ["qwen2.5-0.5b/one-layer", "qwen2.5-0.5b/all-layers", "qwen2.5-7b/one-layer"]
    assert names("--models=qwen2.5-7b") == ["qwen2.5-7b/one-layer"]
    assert names("--layers=all") == ["qwen2.5-0.5b/all-layers"]
    assert names("--models=qwen2.5-7b", "--layers=all") == ["qwen2.5-7b/all-layers"]
    resolved = settings.parse_settings(["--lengths=1024", "--models=qwen2.5-0.5b"])
    assert settings.batch_size_for(resolved, "qwen2.5-0.5b", 1024) == 64
    assert settings.batch_size_for(resolved, "qwen2.5-7b", 2048) == 8
    with pytest.raises(SystemExit):
        settings.parse_settings(["--models=qwen2.5-9b"])
    with pytest.raises(SystemExit):
        settings.parse_settings(["--layers=some"])


def test_text_corpus_fills_rows_exactly(qwen_tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    total = inputs.write_text_corpus(path, qwen_tokenizer, num_docs=3, doc_tokens=50, seed=0)
    assert total == 150
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert all(len(qwen_tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]) == 50
               for line in lines)


def test_disk_bandwidth_cleans_up(tmp_path):
    result = inputs.disk_write_bandwidth(tmp_path, 3 << 20, chunk_bytes=1 << 20)
    assert result["bytes"] == 3 << 20 and _positive(result["bytes_per_s"])
    assert list(tmp_path.iterdir()) == []


def test_flush_tree_syncs_every_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_bytes(b"data")
    assert inputs.flush_tree(tmp_path) == 3


def test_command_line_help():
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--models", "--lengths", "--layers", "--batch_tokens", "--batch_size", "--steps", "--warmup",
                 "--output_dir", "--skip_baseline", "--skip_pipeline", "--smoke", "--peak_tflops"):
        assert flag in done.stdout


def test_skipped_paths_are_reported_not_faked(tmp_path):
    """Without the baseline and the pipeline (what a TPU host without a torch accelerator gets), ours still runs
    on `random:` weights and every ratio that needs a missing path is absent, not invented."""
    code = driver.main(["--smoke", "--layers=one", "--skip_baseline", "--skip_pipeline", "--skip_disk",
                       "--output_dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(path.read_text())
    (case,) = results["cases"]
    assert _positive(case["ours"]["forward_tok_s"]) and _positive(case["ours"]["copy_tok_s"])
    assert case["baseline"] is None and case["pipeline"] is None and results["disk"] is None
    assert case["agreement"] is None
    assert case["ours"]["forward_mfu"] is None  # CPU float32: no peak rate unless --peak_tflops
    assert set(case["ratios"].values()) == {None}
    assert any(s.startswith("baseline: --skip_baseline") for s in results["skipped"])
    assert any(s.startswith("pipeline: --skip_pipeline") for s in results["skipped"])
    assert any(s.startswith("MFU:") for s in results["skipped"])
    assert "tiny/one-layer" in report.format_table(results)


def test_baseline_device_choice():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about hosts without a torch accelerator")
    assert baseline.choose_baseline_device("auto", "cpu") == ("cpu", None)
    device, reason = baseline.choose_baseline_device("auto", "tpu")
    assert device is None and "--baseline_device=cpu" in reason
    with pytest.raises(settings.BenchError, match="--skip_baseline"):
        baseline.choose_baseline_device("cuda", "gpu")


def test_agreement_flags_different_models():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = {layer: rng.normal(size=(8, 16)).astype(np.float32) for layer in range(4)}
    same = {layer: value * (1 + 1e-6) for layer, value in ref.items()}
    result = ours.agreement(same, ref, num_layers=4, dtype="float32")
    assert result["ok"] and result["layers"] == [0, 1, 2]  # the last layer is transformers' normed output
    other = {layer: rng.normal(size=(8, 16)).astype(np.float32) for layer in range(4)}
    assert ours.agreement(other, ref, num_layers=4, dtype="bfloat16")["ok"] is False
    assert ours.agreement({3: ref[3]}, {3: ref[3]}, num_layers=4, dtype="float32") is None


def test_a_failing_path_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken_pipeline(*args, **kwargs):
        raise settings.BenchError("python -m pipeline.run ... exited with 2")

    monkeypatch.setattr(driver, "run_pipeline", broken_pipeline)
    code = driver.main(["--smoke", "--layers=one", "--skip_baseline", "--skip_disk", "--output_dir", str(tmp_path)])
    assert code == 1
    (path,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(path.read_text())
    (case,) = results["cases"]
    assert _positive(case["ours"]["copy_tok_s"]) and case["pipeline"] is None
    assert results["errors"] == [{"case": "tiny/one-layer", "length": 64, "path": "pipeline",
                                  "error": "BenchError: python -m pipeline.run ... exited with 2"}]
    assert "ERROR pipeline (case=tiny/one-layer, length=64)" in report.format_table(results)


def test_synthetic_activations_have_the_real_shape_and_differ_per_layer():
    import ml_dtypes
    import numpy as np

    from model import CaptureSpec
    from pipeline.bench.host_ceiling import SyntheticActivations

    config = QWEN25_GEOMETRIES["tiny"]
    source = SyntheticActivations(config)
    tokens = np.zeros((2, 16), np.int32)
    spec = CaptureSpec(hooks=("resid_post",), layers=(0, 3), out_dtype="bfloat16")
    first = source.capture(tokens, tokens, tokens, spec)
    assert sorted(first) == ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    for value in first.values():
        assert value.shape == (2, 16, config.hidden_size) and value.dtype == ml_dtypes.bfloat16
        assert value.copy_to_host_async() is None and type(np.asarray(value)) is np.ndarray
    a, b = (np.asarray(v) for v in first.values())
    assert not np.array_equal(a, b)
    again = source.capture(tokens, tokens, tokens, spec)
    assert not np.array_equal(np.asarray(again["blocks.0.hook_resid_post"]), a)
    assert (source.calls, source.token_positions) == (2, 64)
    with pytest.raises(ValueError, match="block hooks only"):
        source.capture(tokens, tokens, tokens, CaptureSpec(hooks=("resid_post",), layers=(0,), logits=True))


def test_synthetic_statistics_equal_the_devices_reductions_of_its_views():
    """The host ceiling's source answers the statistics' reductions from tables: the same as model.statistics
    computes on its views (norms and extrema exact, sums to float64 rounding), runs across block edges too."""
    import numpy as np

    from model import CaptureSpec
    from model.statistics import reduce_outputs
    from pipeline.bench.host_ceiling import SyntheticActivations

    source = SyntheticActivations(QWEN25_GEOMETRIES["tiny"])
    tokens = np.zeros((3, 200), np.int32)
    outputs = source.capture(tokens, tokens, tokens, CaptureSpec(hooks=("resid_post",), layers=(0, 2),
                                                                 out_dtype="bfloat16"))
    mask = np.zeros((3, 200), bool)
    mask[0, :200] = True
    mask[1, 5:70] = mask[1, 128:129] = mask[1, 130:195] = True  # row 2: no real token
    answer = source.reduce_statistics(outputs, mask)
    expected = reduce_outputs({name: np.asarray(value) for name, value in outputs.items()}, mask)
    for name, fields in expected.items():
        for field, value in fields.items():
            value, got = np.asarray(value), np.asarray(answer[name][field])
            if field in ("dim_sum", "dim_sumsq"):
                np.testing.assert_allclose(got, value, rtol=1e-12, atol=1e-12, err_msg=f"{name} {field}")
            elif field == "row_sumsq":
                np.testing.assert_array_equal(got[mask], value[mask], err_msg=name)
            else:
                np.testing.assert_array_equal(got, value, err_msg=f"{name} {field}")


def test_synthetic_forward_is_swapped_in_and_back():
    from model import qwen2
    from pipeline.bench.host_ceiling import SyntheticActivations
    from pipeline.bench.weights import serving

    real = qwen2.load_model
    source = SyntheticActivations(QWEN25_GEOMETRIES["tiny"])
    with serving(source):
        import model

        assert model.load_model("random:tiny", dtype="bfloat16") is source
    assert qwen2.load_model is real


def test_host_ceiling_smoke_runs_the_real_pipeline(tmp_path):
    """All layers of the tiny geometry over 4 ARC samples through pipeline.run.main with the synthetic source:
    every shard committed, rates from the commits, phases, the profile and the verdict recorded."""
    code = driver.main(["--smoke", "--host_ceiling", "--layers=all", "--host_cprofile", "--output_dir",
                        str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(path.read_text())
    assert results["cases"] == [] and results["errors"] == []
    run = results["host_ceiling"]["runs"]["all"]
    depth = QWEN25_GEOMETRIES["tiny"].num_hidden_layers
    assert run["layers"] == depth and run["shards"] >= 2 and run["rate_basis"] == "durable"
    assert run["source_token_positions"] >= run["tokens"] > 0
    assert 1.0 < run["bytes_per_value"] < 3.0  # bf16 values, ZSTD: about 2 bytes or a little less
    assert all(seconds >= 0 for seconds in run["phases_s"].values())
    assert _positive(run["tok_s"]) and _positive(run["vs_disk"]) and run["passed"] is False
    assert _positive(run["cpu"]["process_s"]) and _positive(run["per_core_tok_s"])
    # The statistics (on the synthetic device: the writer's part and the extractor's) are timed in the run.
    assert _positive(run["cpu"]["statistics_s"]) and 0 < run["cpu"]["statistics_share"] < 1
    # Garbage collections are timed too (a run of the pipeline allocates enough for some young ones).
    assert run["cpu"]["gc_collections"][0] > 0 and 0 <= run["cpu"]["gc_full_s"] <= run["cpu"]["gc_s"]
    assert 0 < run["cpu"]["gc_share"] < 1
    assert run["cprofile"]["top_by_own_time"] and Path(run["cprofile"]["path"]).exists()
    assert "all layers" in report.format_table(results)


def test_quick_profile_smoke_builds_the_weights_once_in_memory(tmp_path, monkeypatch):
    """--profile=quick on CPU with the tiny geometry: the baseline's init reaches ours and the pipeline in memory
    (no checkpoint, and no path draws `random:` weights of its own), and all three agree."""
    import model.weights

    def refuse(*args, **kwargs):
        raise AssertionError("with seeded weights no path may draw random: weights of its own")

    monkeypatch.setattr(model.weights, "random_params", refuse)
    code = driver.main(["--smoke", "--profile=quick", "--layers=one", "--output_dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(path.read_text())
    assert results["errors"] == [] and results["settings"]["weights"] == "seeded"
    assert results["settings"]["profile"] == "quick" and results["settings"]["lengths"] == [64]
    (case,) = results["cases"]
    assert case["agreement"]["ok"] and "no checkpoint" in case["weights"]
    assert case["pipeline"]["tokens"] == case["pipeline"]["corpus_tokens"] > 0
    assert _positive(case["ours"]["copy_tok_s"]) and _positive(case["baseline"]["copy_tok_s"])


def test_quick_profile_defaults():
    quick = settings.parse_settings(["--profile=quick"])
    assert [c.name for c in quick.cases] == ["qwen2.5-0.5b/one-layer", "qwen2.5-0.5b/all-layers",
                                              "qwen2.5-7b/one-layer"]
    assert quick.lengths == [2048] and quick.steps == 3 and quick.warmup == 1 and quick.pipeline_steps == 2
    assert quick.seeded_weights and quick.disk_test_bytes == 1 << 30
    assert not settings.parse_settings(["--profile=quick", "--weights=checkpoint"]).seeded_weights
    assert settings.parse_settings(["--profile=quick", "--steps=5"]).steps == 5


@pytest.mark.parametrize("server", ["stock", "zero_copy"])
def test_loader_bench_reads_a_small_output_through_the_emulator(tmp_path, server):
    """benchmarks/loader_bench.py gcs: every token back through the emulator as released and through its
    zero-copy change (the benchmark patches the emulator's handler table; this catches an emulator release that
    moves it), with the emulator's CPU reported, (--reference) the reader reference of the window and (--transport)
    the loader's reads alone before the loader, with the emulator's busy share per epoch."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks" / "loader_bench.py")
    root = str(tmp_path / "out")
    subprocess.run([sys.executable, bench, "write", root, "--tokens", "30000", "--d_model", "64"], check=True,
                   capture_output=True, timeout=300)
    slices = {"stock": "0,0.01", "zero_copy": "24"}[server]  # a chunk in one GET, then in slices of 10 KiB
    more = {"stock": ["--readahead", "0,default"], "zero_copy": ["--epochs", "2", "--reference", "--transport"]}[server]
    done = subprocess.run([sys.executable, bench, "gcs", root, "--batch_tokens", "256", "--server", server,
                           "--gcs_slice_mib", slices, *more], check=True, capture_output=True, text=True,
                          timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    if server == "stock":  # each slice size with each readahead in turn; the loader's default over gs:// is 2
        assert [(r["gcs_slice_mib"], r["readahead"]) for r in results] == [(0, 0), (0, 2), (0.01, 0), (0.01, 2)]
    else:  # the transport run, then the loader's
        assert [(r["gcs_slice_mib"], r["readahead"], r.get("transport")) for r in results] == [(24, 2, True),
                                                                                                (24, 2, None)]
        transport = results.pop(0)
        assert transport["tokens"] == transport["num_tokens"] * 2 == 60000 and transport["server"] == server
        assert len(transport["epoch_tok_s"]) == len(transport["epoch_server_busy"]) == 2
        assert all(share >= 0 for share in transport["epoch_server_busy"] + transport["epoch_server_us_per_token"])
        assert transport["reference_tok_s"] > 0
    epochs = {"stock": 1, "zero_copy": 2}[server]
    for result in results:
        assert result["tokens"] == result["num_tokens"] * epochs == 30000 * epochs and result["server"] == server
        # one rate and CPU figure per epoch
        assert len(result["epoch_tok_s"]) == len(result["epoch_us_per_token"]) == epochs
        assert all(rate > 0 for rate in result["epoch_tok_s"])
        # /proc counts CPU in clock ticks (10 ms): a read this small may take less than one.
        assert result["server_us_per_token"] >= 0 and result["server_cpu_s"] >= 0
        # --reference: issue 11's read_table-plus-decode rate, measured on one core before the read
        assert (result["reference_tok_s"] > 0) if server == "zero_copy" else "reference_tok_s" not in result
    assert "Traceback" not in done.stderr


def test_loader_bench_reads_a_small_output_through_dataloader_workers(tmp_path):
    """benchmarks/loader_bench.py torch: every token through the DataLoader with and without a worker, and the cost
    of moving one batch into shared memory."""
    pytest.importorskip("torch")
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks" / "loader_bench.py")
    root = str(tmp_path / "out")
    subprocess.run([sys.executable, bench, "write", root, "--tokens", "30000", "--d_model", "64"], check=True,
                   capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, bench, "torch", root, "--batch_tokens", "256", "--num_workers", "0,1"],
                          check=True, capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["num_workers"] for r in results] == [0, 1]
    assert all(r["tokens"] == r["num_tokens"] == 30000 and r["share_memory_ms_per_batch"] > 0 for r in results)


def test_collector_clock_times_collections_per_generation():
    import gc
    import time

    from pipeline.bench.host_ceiling import CollectorClock

    with CollectorClock() as clock:
        gc.collect(0)
        since = time.time()
        gc.collect()
    assert clock._callback not in gc.callbacks
    summary = clock.summary(since, process_s=100.0)
    assert summary["gc_collections"][2] == 1 and 0 < summary["gc_full_s"] <= summary["gc_s"]
    assert summary["gc_share"] == summary["gc_s"] / 100.0
    everything = clock.summary(0.0, process_s=100.0)["gc_collections"]
    assert everything[0] >= 1 and everything[2] == 1


def test_host_ceiling_warmup_runs_are_left_out(monkeypatch):
    """--host_warmup=N: N runs of each mode first, with the settings in turn, none of them in the results."""
    from types import SimpleNamespace

    from pipeline.bench import host_ceiling

    calls = []

    def fake_measure(run, host, mode, statistics_on="device"):
        calls.append((mode, os.environ.get("ARC_ACTIVATIONS_STATISTICS")))
        return {"mode": mode, "tok_s": 1.0, "per_core_tok_s": 1.0, "cpu": {}}

    monkeypatch.setattr(host_ceiling, "measure_mode", fake_measure)
    host = host_ceiling.HostSettings(
        model="tiny", dataset="arc-agi-1", modes=("all",), augmentations=1, batch_size=1, max_seq_len=64,
        all_layers_batch_size=1, all_layers_samples=1, one_layer_samples=1, writer_threads=None,
        writer_memory_gib=1.0, cprofile=False, statistics=("on", "off"), repeats=1, warmup=2)
    run = SimpleNamespace(settings=SimpleNamespace(host_ceiling=host), attempt=lambda where, path, f, *a: f(*a))
    result = host_ceiling.measure_host_ceiling(run)
    assert calls == [("all", "on"), ("all", "off"), ("all", "on"), ("all", "off")]
    assert sorted(result["runs"]) == ["all stats=off #1", "all stats=on #1"]
