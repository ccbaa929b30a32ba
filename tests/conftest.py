import os

# Never probe the GCE metadata server, never reach the hub: tests run offline.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI shares 2 cores with whatever else runs: slow example generation there is load, not a property of the code.
settings.register_profile("shared-cores", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("shared-cores")

from tests.checkpoints import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with tied embeddings and the real Qwen2.5 tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_checkpoint_untied(tmp_path_factory):
    """Untied embeddings, written as several safetensors shards with model.safetensors.index.json."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-untied"), tie_word_embeddings=False, num_hidden_layers=3,
        max_shard_size="20MB", seed=1,
    )


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from model.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def gcs_emulator():
    """One local GCS emulator (gcp-storage-emulator on 127.0.0.1) for the session; gs://<bucket>/... reaches it
    through STORAGE_EMULATOR_HOST, here and in subprocesses started with this environment. Stopped at the end."""
    import socket
    from types import SimpleNamespace

    from gcp_storage_emulator.server import create_server

    from pipeline.storage import use_storage_emulator_if_configured

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bucket = "arc-activations-test"
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    host = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    use_storage_emulator_if_configured()
    try:
        yield SimpleNamespace(host=host, port=port, bucket=bucket, root=f"gs://{bucket}")
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
