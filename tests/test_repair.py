"""verify's advice and `--repair`: every advice verify can print is produced by a fault made here, and the
commands it names make the output whole again; Parquet page checksums catch a flipped byte in a data page."""
from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as manifest_module
from pipeline import verify as verify_module
from pipeline.manifest import build_manifest, write_manifest
from pipeline.verify import (
    ADVICE,
    REBUILD_MANIFEST,
    REMOVE,
    REWRITE_DEAD_LETTERS,
    UNCOMMIT,
    verify_output,
)
from tests.test_manifest import HOOKS, RUN_INFO, build_output
from tests.test_write import extracted, make_batch
from transforms.write import ShardWriter, committed_sample_ids, write_dead_letters

ROOT = Path(__file__).resolve().parents[1]


def finish(root):
    write_manifest(root, build_manifest(root, RUN_INFO))


def activation_files(root):
    return sorted(glob.glob(os.path.join(root, "activations/**/*.parquet"), recursive=True))


def flip_in_data_page(path, column="activation"):
    """Flips one bit in the middle of a column's first data page (not in a header or the footer)."""
    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns)
                 if group.column(i).path_in_schema.split(".")[0] == column)
    offset = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01
    Path(path).write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- faults

def flip_activation_byte(root, batches):
    victim = activation_files(root)[2]
    flip_in_data_page(victim)
    return os.path.relpath(victim, root)


def truncate_activation(root, batches):
    victim = activation_files(root)[5]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[:len(data) // 2])
    return os.path.relpath(victim, root)


def delete_activation(root, batches):
    victim = activation_files(root)[0]
    os.remove(victim)
    return os.path.relpath(victim, root)


def damage_samples_file(root, batches):
    victim = sorted(glob.glob(os.path.join(root, "samples/*.parquet")))[1]
    flip_in_data_page(victim, column="token_ids")
    return os.path.relpath(victim, root)


def duplicate_sample(root, batches):
    duplicate = make_batch(prefix="a", lengths=(3,))
    ShardWriter(root, "h001", "random:tiny", "bfloat16", "float32").write_shard(
        duplicate["batch_id"], duplicate["samples"], duplicate["placements"], extracted(duplicate, hooks=HOOKS))
    finish(root)
    return f"samples/h001-{duplicate['batch_id']}.parquet"


def stray_file(name, relpath, data):
    """A fault that leaves one file the writer did not make at `relpath`."""

    def fault(root, batches):
        Path(root, relpath).write_bytes(data)
        return relpath

    fault.__name__ = name
    return fault


foreign_activation_file = stray_file("foreign_activation_file", "activations/hook=resid_post/layer=0/notes.txt",
                                     b"not ours")
other_hosts_uncommitted_file = stray_file(
    "other_hosts_uncommitted_file", "activations/hook=resid_post/layer=0/h007-0123456789abcdef.parquet", b"x")
temporary_file = stray_file("temporary_file", "samples/.tmp-0123abcd-h000-0000000000000000.parquet", b"half a file")


def foreign_samples_file(root, batches):
    relpath = "samples/h000-00000000000000ff.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), os.path.join(root, relpath))
    return relpath


def delete_manifest(root, batches):
    os.remove(os.path.join(root, "manifest.json"))
    return "manifest.json"


def manifest_not_a_manifest(root, batches):
    Path(root, "manifest.json").write_text('{"files": null}')
    return "manifest.json"


def manifest_leaves_out_an_activation_file(root, batches):
    """A manifest whose files are not those the commit markers list (a reader of the manifest would skip one)."""
    manifest = json.loads(Path(root, "manifest.json").read_text())
    dropped = next(f for f in manifest["files"] if f["kind"] == "activations")
    manifest["files"].remove(dropped)
    Path(root, "manifest.json").write_text(json.dumps(manifest))
    return dropped["path"]


def shard_committed_after_manifest(root, batches):
    late = make_batch(prefix="d", lengths=(4, 2))
    ShardWriter(root, "h000", "random:tiny", "bfloat16", "float32").write_shard(
        late["batch_id"], late["samples"], late["placements"], extracted(late, hooks=HOOKS))
    return f"samples/h000-{late['batch_id']}.parquet"


def alter_dead_letter(root, batches):
    victim = sorted(glob.glob(os.path.join(root, "dead_letter/*.jsonl")))[0]
    with open(victim, "a", encoding="utf-8") as handle:
        handle.write('{"source": "y", "stage": "read", "reason": "appended later", "record": "{}"}\n')
    return os.path.relpath(victim, root)


FAULTS = [
    (flip_activation_byte, UNCOMMIT, True),
    (truncate_activation, UNCOMMIT, True),
    (delete_activation, UNCOMMIT, True),
    (damage_samples_file, UNCOMMIT, True),
    (duplicate_sample, UNCOMMIT, True),
    (foreign_activation_file, REMOVE, True),
    (other_hosts_uncommitted_file, REMOVE, True),
    (foreign_samples_file, REMOVE, True),
    (temporary_file, REMOVE, False),  # a warning: a writer may still be running
    (delete_manifest, REBUILD_MANIFEST, True),
    (manifest_not_a_manifest, REBUILD_MANIFEST, True),
    (manifest_leaves_out_an_activation_file, REBUILD_MANIFEST, True),
    (shard_committed_after_manifest, REBUILD_MANIFEST, True),
    (alter_dead_letter, REWRITE_DEAD_LETTERS, True),
]


def test_every_advice_has_a_fault():
    assert {advice.key for _, advice, _ in FAULTS} == set(ADVICE)


def emulated_resume(root, batches, late_samples):
    """What `pipeline.run --resume` does, without a model: writes every batch none of whose samples is committed
    (the samples of an uncommitted shard), rewrites this host's dead letters, rebuilds the manifest. The real
    command is run end to end in test_repair_then_resume_recomputes_the_damaged_shard."""
    done = committed_sample_ids(root)
    writer = ShardWriter(root, "h000", "random:tiny", "bfloat16", "float32")
    for i, batch in enumerate(batches):
        if not {s["sample_id"] for s in batch["samples"]} & done:
            writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"],
                               extracted(batch, hooks=HOOKS, seed=i))
    letters = [{"source": f"x.jsonl:{i}", "stage": "validate" if i % 3 else "tokenize", "reason": "bad",
                "record": "{}"} for i in range(7)]
    write_dead_letters(root, "h000", 0, letters[:4])
    write_dead_letters(root, "h000", 1, letters[4:])
    finish(root)


def run_advice(advice, root, batches, capsys):
    for command in advice.commands:
        argv = shlex.split(command.format(output=root).replace("<the run's options>", "--options"))
        assert argv[:2] == ["python", "-m"], command
        module, args = argv[2], argv[3:]
        if module == "pipeline.run":
            assert args[-1] == "--resume"
            emulated_resume(root, batches, None)
        elif module == "pipeline.verify":
            verify_module.main(args)
        elif module == "pipeline.manifest":
            assert manifest_module.main(args) == 0
        else:
            raise AssertionError(f"advice names an unknown command: {command}")
    return capsys.readouterr().out


@pytest.mark.parametrize("fault, advice, is_error", FAULTS, ids=[fault.__name__ for fault, _, _ in FAULTS])
def test_each_advice_fixes_its_fault(tmp_path, capsys, fault, advice, is_error):
    root = str(tmp_path / "out")
    batches = build_output(root)
    finish(root)
    original = committed_sample_ids(root)
    relpath = fault(root, batches)
    report = verify_output(root)
    messages = report.errors if is_error else report.warnings
    named = [m for m in messages if m.startswith(relpath)]
    assert named, report.format()
    assert all(advice.text(root) in m for m in named), report.format()
    # Every error verify printed carries an advice (and one of those enumerated in ADVICE).
    assert all(any(a.text(root) in m for a in ADVICE.values()) for m in report.errors + report.warnings
               if "non-finite" not in m)

    out = run_advice(advice, root, batches, capsys)
    after = verify_output(root, deep=True)
    assert after.ok and not after.warnings, out + after.format()
    assert original <= committed_sample_ids(root)
    if fault is not shard_committed_after_manifest:
        assert committed_sample_ids(root) == original


def test_repair_prints_what_it_did_and_the_output_then_verifies(tmp_path, capsys):
    root = str(tmp_path / "out")
    batches = build_output(root)
    finish(root)
    flipped = flip_activation_byte(root, batches)
    foreign = foreign_activation_file(root, batches)
    temporary = temporary_file(root, batches)
    shard = Path(flipped).stem
    assert verify_module.main([root]) == 1
    capsys.readouterr()
    assert verify_module.main([root, "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"uncommitted shard {shard}" in out and flipped in out and "sha256" in out
    assert f"deleted {foreign}" in out and f"deleted {temporary}" in out and "rebuilt manifest.json" in out
    assert "--resume" in out
    # The marker and every file of the shard are gone, and nothing else of the other shards.
    assert not glob.glob(os.path.join(root, f"**/{shard}.parquet"), recursive=True)
    assert len(activation_files(root)) == 2 * len(HOOKS)
    (damaged,) = [b for b in batches if shard.endswith(b["batch_id"])]
    remaining = {s["sample_id"] for b in batches for s in b["samples"]} - committed_sample_ids(root)
    assert remaining == {s["sample_id"] for s in damaged["samples"]}


def test_page_checksums_catch_a_flipped_byte_in_a_data_page(tmp_path):
    root = str(tmp_path / "out")
    build_output(root)
    finish(root)
    victim = activation_files(root)[1]
    intact = pq.read_table(victim)
    flip_in_data_page(victim)
    # Without verification pyarrow returns the altered row as if nothing happened.
    altered = pq.read_table(victim)
    assert not altered.equals(intact)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(victim, page_checksum_verification=True)
    dataset = ds.dataset(victim, format=ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)))
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        dataset.to_table()
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        verify_module._read_table(victim)
    errors = [e for e in verify_output(root).errors if e.startswith(os.path.relpath(victim, root))]
    assert any("sha256" in e and UNCOMMIT.text(root) in e for e in errors), errors


def test_cli_repair_in_a_subprocess(tmp_path, capsys):
    import json

    root = str(tmp_path / "out")
    batches = build_output(root)
    finish(root)
    deleted = delete_activation(root, batches)
    env = dict(os.environ, NO_GCE_CHECK="true", PYTHONPATH=str(ROOT))

    assert verify_module.main([root, "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert {(f["path"], f["advice"]) for f in findings} == {(deleted, "uncommit")}
    done = subprocess.run([sys.executable, "-m", "pipeline.verify", root, "--repair", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["findings"] == [] and any("uncommitted shard" in action for action in report["repaired"])


def read_back(output):
    from transforms.write import activations_to_numpy

    table = ds.dataset(os.path.join(output, "activations"), format="parquet", partitioning="hive").to_table()
    keys = list(zip(table["layer"].to_pylist(), table["sample_id"].to_pylist(), table["position"].to_pylist()))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [keys[i] for i in order], activations_to_numpy(table)[order]


def test_repair_then_resume_recomputes_the_damaged_shard(tmp_path, tiny_checkpoint):
    import json

    from tests.arc_fixtures import write_challenges
    from tests.test_end_to_end import run_here, verify_here

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=3, bad=False)
    output = str(tmp_path / "out")
    options = [f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=0,1",
               "--hooks=resid_post", "--dtype=float32", "--batch_size=1", "--max_seq_len=1024",
               "--progress_interval=0"]
    run_here(*options)
    clean = json.loads(Path(output, "manifest.json").read_text())["counts"]
    clean_keys, clean_values = read_back(output)
    assert clean["shards"] >= 2

    victim = activation_files(output)[1]
    flip_in_data_page(victim)
    shard = Path(victim).stem
    failed = verify_here(output)
    assert failed.returncode == 1 and os.path.relpath(victim, output) in failed.stdout
    assert UNCOMMIT.text(output) in failed.stdout

    repaired = verify_here(output, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"uncommitted shard {shard}" in repaired.stdout
    assert not glob.glob(os.path.join(output, f"**/{shard}.parquet"), recursive=True)

    resumed = run_here(*options, "--resume")
    assert "already committed" in resumed.stderr
    deep = verify_here(output, "--deep")
    assert deep.returncode == 0 and "OK" in deep.stdout
    counts = json.loads(Path(output, "manifest.json").read_text())["counts"]
    for key in ("samples", "tokens", "activation_rows", "tokens_per_hook_layer"):
        assert counts[key] == clean[key], key
    keys, values = read_back(output)
    assert keys == clean_keys
    assert (values == clean_values).all()


def test_repair_on_gcs(gcs_emulator):
    from apache_beam.io.filesystems import FileSystems

    root = f"{gcs_emulator.root}/repair/out"
    build_output(root)
    finish(root)
    victim = sorted(m.path for m in FileSystems.match([f"{root}/activations/**"])[0].metadata_list)[3]
    with FileSystems.open(victim) as handle:
        data = bytearray(handle.read())
    data[len(data) // 2] ^= 0x01
    with FileSystems.create(victim) as handle:
        handle.write(bytes(data))
    with FileSystems.create(f"{root}/samples/stray.txt") as handle:
        handle.write(b"x")
    report = verify_output(root)
    assert any(e.startswith(victim[len(root) + 1:]) and UNCOMMIT.text(root) in e for e in report.errors)
    assert any(e.startswith("samples/stray.txt") and REMOVE.text(root) in e for e in report.errors)
    actions, _ = verify_module.repair_output(root)
    assert any(a.startswith("uncommitted shard") for a in actions) and any("stray.txt" in a for a in actions)
    assert verify_output(root, deep=True).ok
    assert len(committed_sample_ids(root)) == 6
