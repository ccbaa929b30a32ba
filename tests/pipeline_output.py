"""One small output written by the real pipeline (tiny random Qwen2, four real ARC-AGI tasks plus one bad task that
goes to the dead letter), shared by the read-back tests of one pytest session."""
from __future__ import annotations

from pathlib import Path

from tests.arc_fixtures import write_challenges

HOOKS = ("resid_post", "mlp_out")
LAYER = 1

_OUTPUTS: dict[str, Path] = {}


def pipeline_output(tmp_path_factory, tiny_checkpoint) -> Path:
    """OUTPUT of `pipeline.run` (in this process) with hooks resid_post and mlp_out at layer 1, bfloat16 storage,
    two shards; written once per session."""
    from tests.test_end_to_end import run_here

    key = str(tiny_checkpoint)
    if key not in _OUTPUTS:
        work = tmp_path_factory.mktemp("read-back")
        dataset, _ = write_challenges(work / "challenges.json", count=4, bad=True)
        output = work / "out"
        run_here(f"--model={tiny_checkpoint}", f"--dataset={dataset}", f"--output={output}", f"--layers={LAYER}",
                 f"--hooks={','.join(HOOKS)}", "--batch_size=2", "--max_seq_len=2048", "--progress_interval=0")
        _OUTPUTS[key] = output
    return _OUTPUTS[key]


def upload(output: Path, gcs_emulator, prefix: str) -> str:
    """Copies a local output into the test GCS emulator's bucket under `prefix`; returns its gs:// root."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(gcs_emulator.bucket)
    for path in sorted(p for p in Path(output).rglob("*") if p.is_file()):
        bucket.blob(f"{prefix}/{path.relative_to(output).as_posix()}").upload_from_filename(str(path))
    return f"{gcs_emulator.root}/{prefix}"
