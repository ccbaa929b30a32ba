import json
import os

import pyarrow.dataset as ds

from pipeline.manifest import build_manifest, read_manifest, write_manifest
from tests.test_write import extracted, make_batch
from transforms import write
from transforms.write import ShardWriter, write_dead_letters

HOOKS = (("resid_post", 0), ("resid_post", 1), ("mlp_out", 0), ("mlp_out", 1))
RUN_INFO = {"model": {"spec": "random:tiny"}, "hooks": ["resid_post", "mlp_out"], "layers": [0, 1],
            "compute_dtype": "bfloat16", "storage_dtype": "float32", "counts": {"records_read": 9}}


def build_output(root: str, worker: str = "h000", prefixes=("a", "b", "c"), storage_dtype="float32"):
    """Three committed shards of 2 hooks x 2 layers, and two dead-letter files of 7 letters."""
    writer = ShardWriter(root, worker, "random:tiny", "bfloat16", storage_dtype)
    batches = []
    for i, prefix in enumerate(prefixes):
        batch = make_batch(prefix=prefix, lengths=(3 + i, 7, 2 * i + 1))
        writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"],
                           extracted(batch, hooks=HOOKS, seed=i))
        batches.append(batch)
    letters = [{"source": f"x.jsonl:{i}", "stage": "validate" if i % 3 else "tokenize", "reason": "bad",
                "record": "{}"} for i in range(7)]
    write_dead_letters(root, worker, 0, letters[:4])
    write_dead_letters(root, worker, 1, letters[4:])
    return batches


def test_manifest_counts_add_up(tmp_path):
    root = str(tmp_path / "out")
    batches = build_output(root)
    stray = tmp_path / "out/activations/hook=mlp_out/layer=1/h000-00000000deadbeef.parquet"
    stray.write_bytes(b"uncommitted")
    manifest = build_manifest(root, RUN_INFO)
    counts = manifest["counts"]
    samples = [s for b in batches for s in b["samples"]]
    tokens = sum(len(s["token_ids"]) for s in samples)
    assert counts["shards"] == 3 and counts["samples"] == len(samples) == 9 and counts["tokens"] == tokens
    assert counts["tokens_per_hook_layer"] == {"mlp_out": {"0": tokens, "1": tokens},
                                             "resid_post": {"0": tokens, "1": tokens}}
    assert counts["activation_rows"] == 4 * tokens
    assert counts["rejected"] == 7 and counts["rejected_by_stage"] == {"tokenize": 3, "validate": 4}
    assert counts["records_read"] == 9  # from the driver's run_info, kept
    kinds = [f["kind"] for f in manifest["files"]]
    assert kinds.count("samples") == 3 and kinds.count("activations") == 12 and kinds.count("dead_letter") == 2
    for entry in manifest["files"]:
        path = os.path.join(root, entry["path"])
        assert os.path.getsize(path) == entry["bytes"] and len(entry["sha256"]) == 64
    assert counts["bytes"] == sum(f["bytes"] for f in manifest["files"])
    assert sum(f["rows"] for f in manifest["files"] if f["kind"] == "activations") == \
        ds.dataset(root + "/activations", format="parquet", partitioning="hive",
                   exclude_invalid_files=True).count_rows() == 4 * tokens
    assert manifest["model"] == {"spec": "random:tiny"} and manifest["format_version"] == write.FORMAT_VERSION == 2
    assert any("h000-00000000deadbeef" in w and "uncommitted" in w for w in manifest["warnings"])

    path = write_manifest(root, manifest)
    assert path.endswith("manifest.json")
    assert read_manifest(root) == json.loads(json.dumps(manifest))
    assert not [f for f in os.listdir(root) if f.startswith(".")]


def test_manifest_of_an_empty_output(tmp_path):
    manifest = build_manifest(str(tmp_path), {"model": "m"})
    assert manifest["counts"]["samples"] == 0 and manifest["files"] == [] and manifest["warnings"] == []


def test_resume_must_match_the_committed_shards(tmp_path):
    """check_resume_matches names the file, the setting and the flag to pass."""
    import pytest
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ExtractOptions, OptionError
    from pipeline.run import check_resume_matches
    from transforms.write import committed_shards

    root = str(tmp_path / "out")
    batch = make_batch()
    ShardWriter(root, "h000", "random:tiny", "bfloat16", "bfloat16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"],
        extracted(batch, hooks=[(hook, layer) for hook in ("mlp_out", "resid_post") for layer in (0, 1)]))
    shards = committed_shards(root)

    def opts(*flags):
        return PipelineOptions([f"--output={root}", "--resume", *flags]).view_as(ExtractOptions)

    check_resume_matches(opts(), shards, ("mlp_out", "resid_post"), (0, 1))  # auto storage of bf16: bfloat16
    with pytest.raises(OptionError, match=r"samples/h000-.*storage_dtype='bfloat16'.*'float32'.*--activation_dtype"):
        check_resume_matches(opts("--activation_dtype=float32"), shards, ("mlp_out", "resid_post"), (0, 1))
    with pytest.raises(OptionError, match=r"dtype='bfloat16'.*--dtype"):
        check_resume_matches(opts("--dtype=float32", "--activation_dtype=bfloat16"), shards,
                             ("mlp_out", "resid_post"), (0, 1))
    with pytest.raises(OptionError, match="hooks and layers"):
        check_resume_matches(opts(), shards, ("resid_post",), (0, 1))
    shards = {name: dict(meta, format_version="1") for name, meta in shards.items()}
    with pytest.raises(OptionError, match="format_version='1'.*format version"):
        check_resume_matches(opts(), shards, ("mlp_out", "resid_post"), (0, 1))
