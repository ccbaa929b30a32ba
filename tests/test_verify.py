import json
import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline import verify as verify_module
from pipeline.manifest import build_manifest, write_manifest
from pipeline.verify import check_rows, verify_output
from tests.test_manifest import HOOKS, RUN_INFO, build_output
from tests.test_write import extracted, make_batch
from transforms import write
from transforms.write import ShardWriter, samples_table


def finish(root):
    write_manifest(root, build_manifest(root, RUN_INFO))


@pytest.fixture
def output(tmp_path):
    root = str(tmp_path / "out")
    batches = build_output(root)
    finish(root)
    return root, batches


def activation_files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "activations")) for f in fs)


def test_a_good_output_passes(output):
    root, batches = output
    report = verify_output(root, deep=True)
    assert report.ok, report.format()
    assert report.stats["samples"] == 9 and report.stats["shards"] == 3 and report.stats["hooks_layers"] == 4
    assert report.stats["files_checked"] == 3 + 12 + 3 + 2 and report.stats["non_finite_values"] == 0


def test_cli_exit_codes(output, capsys):
    root, _ = output
    assert verify_module.main([root]) == 0 and "OK" in capsys.readouterr().out
    os.remove(activation_files(root)[0])
    assert verify_module.main([root]) == 1 and "listed but missing" in capsys.readouterr().out


def test_corrupted_file_is_named(output):
    root, _ = output
    victim = activation_files(root)[2]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 3] ^= 0xFF  # same size, different content
    open(victim, "wb").write(bytes(data))
    report = verify_output(root)
    relpath = os.path.relpath(victim, root)
    assert not report.ok
    assert any(relpath in e and "sha256" in e for e in report.errors), report.format()


def test_missing_file_is_named(output):
    root, _ = output
    victim = activation_files(root)[0]
    os.remove(victim)
    report = verify_output(root)
    assert any(os.path.relpath(victim, root) in e and "missing" in e for e in report.errors), report.format()


def test_unlisted_activation_file_and_missing_manifest(output):
    root, _ = output
    extra = os.path.join(root, "activations/hook=resid_post/layer=0/h007-0123456789abcdef.parquet")
    open(extra, "wb").write(b"x")
    os.remove(os.path.join(root, "manifest.json"))
    report = verify_output(root)
    assert any("h007-0123456789abcdef" in e and "no commit marker" in e for e in report.errors)
    assert any("manifest.json" in e for e in report.errors)


def edit_manifest(root, edit):
    path = os.path.join(root, "manifest.json")
    with open(path) as handle:
        manifest = json.load(handle)
    with open(path, "w") as handle:
        json.dump(edit(manifest), handle)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: [], "its top level is a JSON list, not an object"),
    (lambda m: {**m, "files": None}, "its 'files' is null, not a list"),
    (lambda m: {**m, "files": m["files"] + ["samples/x.parquet"]},
     "a 'files' entry \"samples/x.parquet\" is not an object"),
    (lambda m: {**m, "counts": None}, "its counts is null, not an object"),
    (lambda m: {**m, "stats": [1]}, "its stats is [1], not an object"),
    (lambda m: {**m, "identity": "x"}, "its identity is \"x\", not an object"),
])
def test_a_manifest_of_the_wrong_shape_is_a_finding(output, capsys, edit, problem):
    root, _ = output
    edit_manifest(root, edit)
    report = verify_output(root)
    errors = [e for e in report.errors if e.startswith("manifest.json: ")]
    assert len(errors) == 1 and problem in errors[0], report.format()
    assert f"fix: `python -m pipeline.manifest {root}`" in errors[0]
    assert report.stats["shards"] == 3 and report.stats["samples"] == 9  # the files are still checked
    assert verify_module.main([root]) == 1 and problem in capsys.readouterr().out
    finish(root)
    assert verify_output(root).ok


def test_a_manifest_that_disagrees_with_the_commit_markers(output):
    root, _ = output
    dropped = []

    def drop_one_and_invent_one(manifest):
        dropped.append(next(f for f in manifest["files"] if f["kind"] == "activations"))
        invented = {**dropped[0], "path": dropped[0]["path"].replace(".parquet", "0.parquet")}
        return {**manifest, "files": [f for f in manifest["files"] if f is not dropped[0]] + [invented]}

    edit_manifest(root, drop_one_and_invent_one)
    report = verify_output(root)
    fix = f"fix: `python -m pipeline.manifest {root}`"
    assert [f.advice.key for f in report.findings] == ["rebuild_manifest"] * 2, report.format()
    left_out, invented = report.errors
    assert left_out.startswith(f"{dropped[0]['path']}: listed by its commit marker samples/") and fix in left_out
    assert "but not by manifest.json" in left_out
    assert invented.startswith(dropped[0]["path"].replace(".parquet", "0.parquet") + ": listed by manifest.json")
    assert "by no commit marker" in invented and fix in invented
    finish(root)
    assert verify_output(root).ok


def test_duplicate_sample_across_shards(tmp_path):
    root = str(tmp_path / "out")
    build_output(root)
    # A second shard (another batch composition) holding a sample that an existing shard already has.
    duplicate = make_batch(prefix="a", lengths=(3,))
    ShardWriter(root, "h001", "random:tiny", "bfloat16").write_shard(
        duplicate["batch_id"], duplicate["samples"], duplicate["placements"], extracted(duplicate, hooks=HOOKS))
    finish(root)
    report = verify_output(root)
    assert any("'a0/t0/a0'" in e and "duplicate sample id" in e for e in report.errors), report.format()


def test_missing_position_is_found(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    real_table = write.activation_table

    def drop_a_row(samples, placements, activation, hook, layer, storage_dtype="float32", tokens=None):
        table = real_table(samples, placements, activation, hook, layer, storage_dtype, tokens)
        if hook == "mlp_out" and layer == 1:
            table = table.take([i for i in range(table.num_rows) if i != 1])
        return table

    monkeypatch.setattr(write, "activation_table", drop_a_row)
    # The shard's statistics would refuse the short table (its token columns are the shard's); verify is what
    # this test is about.
    monkeypatch.setenv(write.STATISTICS_ENV, "off")
    batches = build_output(root)
    monkeypatch.undo()
    finish(root)
    report = verify_output(root)
    # Checksums and row counts agree with the markers; only the completeness check can see it.
    assert not any("sha256" in e for e in report.errors)
    missing = [e for e in report.errors if "positions missing" in e]
    assert len(missing) == 3 and all("hook=mlp_out/layer=1" in e for e in missing), report.format()
    first = batches[0]["samples"][0]["sample_id"]
    assert any(f"{first}@" in e for e in missing)


def test_check_rows_reports_duplicates_and_wrong_tokens():
    batch = make_batch(lengths=(4, 3))
    samples = samples_table(batch["samples"])
    ids = samples["sample_id"].to_pylist()
    expected = verify_module._expected_rows(samples)
    table = write.activation_table(batch["samples"], batch["placements"], np.zeros((7, 2), np.float32),
                                   "resid_post", 0)
    assert check_rows("f", ids, expected, table) == []
    duplicated = table.take([0, 1, 1, 2, 3, 4, 5, 6])
    assert any("1 positions duplicated" in e for e in check_rows("f", ids, expected, duplicated))
    tokens = table["token_id"].to_numpy().copy()
    tokens[5] += 1
    wrong = table.set_column(2, "token_id", pa.array(tokens))
    assert any("token_id differs" in e and f"{ids[1]}@1" in e for e in check_rows("f", ids, expected, wrong))
