import os

# Never probe the GCE metadata server, never reach the hub: tests run offline.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

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
