"""--output=gs://... end to end against a local GCS emulator (gcp-storage-emulator on 127.0.0.1)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq

from tests.arc_fixtures import write_challenges
from tests.test_end_to_end import run_here, verify_here

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_writes_to_gcs_and_verifies(gcs_emulator, tiny_checkpoint, tmp_path):
    from apache_beam.io.filesystems import FileSystems

    from pipeline.storage import use_storage_emulator_if_configured

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=2, bad=True)
    output = f"{gcs_emulator.root}/runs/first"
    run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", "--layers=0,1",
             "--hooks=resid_post", "--batch_size=2", "--max_seq_len=1024", "--progress_interval=0", "--packing=rows",
             env_extra={"STORAGE_EMULATOR_HOST": gcs_emulator.host})

    use_storage_emulator_if_configured()
    files = [m.path for m in FileSystems.match([f"{output}/**"])[0].metadata_list]
    assert any("/activations/hook=resid_post/layer=1/" in f for f in files)
    with FileSystems.open(f"{output}/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["counts"]["samples"] == 2
    activation_files = [f for f in files if "/activations/" in f and f.endswith(".parquet")]
    rows = 0
    for path in activation_files:
        with FileSystems.open(path) as f:
            table = pq.read_table(io.BytesIO(f.read()))
        rows += table.num_rows
        assert b"blocks." in table.schema.metadata[b"hook_name"] if b"hook_name" in (table.schema.metadata or {}) \
            else any(b"blocks." in v for v in table.schema.metadata.values())
    assert rows == 2 * manifest["counts"]["tokens"] if "tokens" in manifest["counts"] else rows > 0
    assert not [f for f in files if "/.tmp" in f or f.split("/")[-1].startswith(".tmp")]

    verify = verify_here(output)
    assert verify.returncode == 0, verify.stdout + verify.stderr
