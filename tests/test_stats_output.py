"""Statistics committed with each shard, merged into stats.json by the manifest, and recomputed from the stored
activations by `python -m pipeline.stats`: equal to numpy float64 on the decoded activations, after a resumed
run too; disagreements named; outputs written before statistics existed get theirs with --write."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline import stats as pipeline_stats
from pipeline.manifest import read_manifest, rebuild_manifest
from pipeline.verify import verify_output
from tests.stats_reference import check_stats_against_numpy
from tests.test_write import extracted, make_batch
from transforms import activation_stats as S
from transforms.write import ShardWriter, committed_sample_ids

HOOKS = (("resid_post", 1), ("mlp_out", 0))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def output(tmp_path):
    """Three shards by two workers (as two hosts would write them), and a manifest."""
    root = str(tmp_path / "out")
    for worker, prefix, lengths in (("h000", "a", (5, 9, 3)), ("h000", "b", (7, 2)), ("h001", "c", (11, 4, 6))):
        batch = make_batch(prefix, lengths)
        ShardWriter(root, worker, "random:tiny", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], extracted(batch, hooks=HOOKS))
    rebuild_manifest(root)
    return root


def test_stats_file_is_committed_before_the_marker_and_listed_in_it(output):
    marker = pq.read_metadata(next(os.scandir(os.path.join(output, "samples"))).path).metadata
    entry = json.loads(marker[S.MARKER_KEY.encode()])
    assert entry["kind"] == "stats" and entry["layers"] == 2 and os.path.getsize(os.path.join(output, entry["path"])) \
        == entry["bytes"]
    manifest = read_manifest(output)
    assert len([f for f in manifest["files"] if f["kind"] == "stats"]) == 3
    assert manifest["stats"]["path"] == "stats.json" and manifest["stats"]["shards"] == 3
    assert verify_output(output).ok


def test_merged_stats_equal_numpy_and_the_recomputation(output, capsys):
    stored = pipeline_stats.read_stats(output)
    assert check_stats_against_numpy(output, stored) == 5 + 9 + 3 + 7 + 2 + 11 + 4 + 6
    assert pipeline_stats.compare(stored, pipeline_stats.recompute(output)) == []
    assert pipeline_stats.main([output]) == 0
    assert "OK" in capsys.readouterr().out
    # A rebuild reads each committed shard once: the same file, bit for bit.
    before = open(os.path.join(output, "stats.json"), "rb").read()
    rebuild_manifest(output)
    assert open(os.path.join(output, "stats.json"), "rb").read() == before


def test_a_disagreement_is_named(output, capsys):
    path = os.path.join(output, "stats.json")
    doc = json.load(open(path))
    record = next(r for r in doc["layers"] if r["hook"] == "mlp_out")
    sums = S._array(record["dim"]["sum"], record["d_model"]).copy()
    sums[3] += 1.0
    record["dim"]["sum"] = S._floats(sums)
    record["tokens"] += 1
    open(path, "w").write(json.dumps(doc))
    assert pipeline_stats.main([output]) == 1
    err = capsys.readouterr().err
    assert "hook=mlp_out layer=0: tokens" in err and "hook=mlp_out layer=0: dim_sum[3]" in err
    assert not verify_output(output).ok  # stats.json no longer has the sha256 the manifest names


def test_output_written_before_statistics_gets_them_with_write(output, capsys):
    # Make it look like an output of the previous version: no stats files, markers without the stats key.
    for entry in os.scandir(os.path.join(output, "samples")):
        table = pq.read_table(entry.path)
        metadata = {k: v for k, v in table.schema.metadata.items() if k != S.MARKER_KEY.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), entry.path)
    for entry in os.scandir(os.path.join(output, "stats")):
        os.remove(entry.path)
    os.remove(os.path.join(output, "stats.json"))
    manifest = rebuild_manifest(output)
    assert manifest["stats"] == {"path": None, "shards": 0, "shards_without_stats": 3}
    assert any("no statistics file" in w for w in manifest["warnings"])
    assert not os.path.exists(os.path.join(output, "stats.json"))
    assert pipeline_stats.main([output]) == 1
    assert "--write" in capsys.readouterr().err
    read, write = os.pipe()
    os.close(read)  # `stats --write --json | head -1`: the reader is gone before the summary is printed
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.stats", output, "--write", "--json"], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"))
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done
    assert os.path.exists(os.path.join(output, "stats.json"))  # written before anything was printed
    assert pipeline_stats.main([output, "--write"]) == 0
    assert read_manifest(output)["stats"]["path"] == "stats.json" and not read_manifest(output)["warnings"]
    assert pipeline_stats.main([output]) == 0
    check_stats_against_numpy(output, pipeline_stats.read_stats(output))
    assert verify_output(output).ok


def test_resumed_run_counts_every_token_once(tiny_checkpoint, tmp_path):
    from tests.arc_fixtures import write_challenges
    from tests.test_end_to_end import run_here

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=4, bad=False)
    output = tmp_path / "out"
    common = [f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=0,1",
              "--hooks=resid_post", "--batch_size=1", "--max_seq_len=2048", "--progress_interval=0"]
    run_here(*common, "--max_samples=2")
    first = committed_sample_ids(str(output))
    # A killed attempt: one shard lost its commit marker, its activation and stats files stay behind.
    victim = sorted(os.scandir(output / "samples"), key=lambda e: e.name)[0]
    os.remove(victim.path)
    assert os.path.exists(output / "stats" / (victim.name[:-len(".parquet")] + ".json"))
    run_here(*common, "--resume")
    assert committed_sample_ids(str(output)) > first and len(committed_sample_ids(str(output))) == 4
    stored = pipeline_stats.read_stats(str(output))
    samples = pq.ParquetDataset(str(output / "samples")).read(columns=["num_tokens"])
    assert check_stats_against_numpy(str(output), stored) == sum(samples["num_tokens"].to_pylist())
    assert read_manifest(str(output))["stats"]["shards"] == len(os.listdir(output / "samples"))
    assert pipeline_stats.main([str(output)]) == 0


def test_a_changed_shard_stats_file_is_left_out_and_named(output):
    path = sorted(os.scandir(os.path.join(output, "stats")), key=lambda e: e.name)[0].path
    with open(path, "ab") as handle:
        handle.write(b" ")
    manifest = rebuild_manifest(output)
    assert manifest["stats"]["shards"] == 2 and manifest["stats"]["shards_without_stats"] == 1
    assert any(os.path.basename(path) in w and "sha256 differ" in w for w in manifest["warnings"])
    assert pipeline_stats.main([output]) == 1  # stats.json now lacks a shard the activations hold
    assert not verify_output(output).ok
