"""Bad input gives a clear error that names the file, key or option at fault (and says what to do)."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model.config import ConfigError, QwenConfig, parse_random_spec
from model.hooks import CaptureSpec, parse_hooks, parse_layers
from model.weights import CheckpointError


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny (tied, single-file) checkpoint."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _load(directory, **kwargs):
    from model import load_model

    return load_model(str(directory), dtype="float32", **kwargs)


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"--model=.*nowhere.*does not exist"):
        _load(tmp_path / "nowhere")


def test_a_file_instead_of_a_directory(checkpoint_copy):
    with pytest.raises(CheckpointError, match=r"config\.json is a file; pass the checkpoint directory"):
        _load(checkpoint_copy / "config.json")


def test_missing_config_json(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"ckpt/config\.json does not exist"):
        _load(checkpoint_copy)


def test_non_qwen2_model_type_names_file_and_key(checkpoint_copy):
    _edit_config(checkpoint_copy, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"ckpt/config\.json: key 'model_type' is 'llama'"):
        _load(checkpoint_copy)


def test_non_qwen2_architecture_names_file_and_key(checkpoint_copy):
    _edit_config(checkpoint_copy, architectures=["Qwen2ForSequenceClassification"])
    with pytest.raises(ConfigError, match=r"config\.json: key 'architectures' is \['Qwen2ForSequenceClassification'\]"):
        _load(checkpoint_copy)


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
])
def test_rope_scaling_is_rejected(checkpoint_copy, key, value):
    _edit_config(checkpoint_copy, **{key: value})
    with pytest.raises(ConfigError, match=rf"config\.json: key '{key}' sets rope_type '(yarn|linear)'"):
        _load(checkpoint_copy)


def test_config_reads_rope_theta_from_both_places():
    base = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert QwenConfig.from_dict({**base, "rope_theta": 12345.0}).rope_theta == 12345.0
    newer = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}, "rope_scaling": None}
    config = QwenConfig.from_dict(newer)
    assert config.rope_theta == 777.0 and config.head_dim == 8
    assert hash(config) == hash(QwenConfig.from_dict(newer, source="elsewhere"))  # usable as a jit static
    with pytest.raises(ConfigError, match=r"x\.json: required key 'intermediate_size' is missing"):
        QwenConfig.from_dict({k: v for k, v in newer.items() if k != "intermediate_size"}, source="x.json")
    with pytest.raises(ConfigError, match=r"rope_theta.*missing"):
        QwenConfig.from_dict(base)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        QwenConfig.from_dict({**newer, "use_sliding_window": True})


def test_shape_mismatch_names_file_key_and_both_shapes(checkpoint_copy):
    def shrink(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]

    _edit_tensors(checkpoint_copy, shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                              r"has shape \[100, 64\], expected \[128, 64\]"):
        _load(checkpoint_copy)


def test_missing_tensor_is_named(checkpoint_copy):
    _edit_tensors(checkpoint_copy, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) .* missing, e\.g\. model\.layers\.0\.self_attn\.k_proj\.bias"):
        _load(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    def add_o_bias(tensors):
        tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)

    _edit_tensors(checkpoint_copy, add_o_bias)
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. model\.layers\.0\.self_attn\.o_proj\.bias "
                                              r"in model\.safetensors"):
        _load(checkpoint_copy)


def test_layer_count_that_does_not_match_the_weights(checkpoint_copy):
    _edit_config(checkpoint_copy, num_hidden_layers=3, layer_types=None)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=3.*missing, e\.g\. model\.layers\.2\."):
        _load(checkpoint_copy)


def test_pickle_only_checkpoint_is_refused_without_unpickling(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    # Not a valid pickle at all: if anything tried to unpickle it, the error would be different.
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*never unpickled"):
        _load(checkpoint_copy)


def test_directory_without_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt has no \*\.safetensors weights"):
        _load(checkpoint_copy)


def test_missing_shard_listed_in_the_index(tiny_checkpoint_untied, tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint_untied, target)
    shard = sorted(target.glob("model-0000*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json lists 1 shard file\(s\) that are "
                                              rf"missing .*{shard.name}"):
        _load(target)


def test_local_directory_without_tokenizer(checkpoint_copy):
    from model.tokenizer import TokenizerNotFound

    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (checkpoint_copy / name).unlink()
    with pytest.raises(TokenizerNotFound, match=r"ckpt has no tokenizer\.json"):
        _load(checkpoint_copy)


def test_hub_id_missing_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen2\.5-0\.5B is not in the Hugging Face cache.*"
                                              r"huggingface-cli download Qwen/Qwen2\.5-0\.5B"):
        _load("Qwen/Qwen2.5-0.5B")


def test_hub_id_found_in_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-qwen" / "snapshots" / commit
    shutil.copytree(tiny_checkpoint, snapshot)
    (cache / "models--someone--tiny-qwen" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = _load("someone/tiny-qwen")
    assert model.source["revision"] == commit
    assert model.config.num_hidden_layers == 2


def test_unknown_hook_and_layer_out_of_range():
    with pytest.raises(ValueError, match=r"--hooks: unknown hook 'resid_posts'; valid hooks are resid_pre, "
                                         r"attn_out, resid_mid, mlp_out, resid_post"):
        parse_hooks("resid_post,resid_posts")
    with pytest.raises(ValueError, match=r"--layers: layer 24 is out of range; valid layers are 0\.\.23"):
        parse_layers("0,24", num_layers=24)
    with pytest.raises(ValueError, match=r"--layers: 'x' is not a layer index"):
        parse_layers("1,x", num_layers=24)
    with pytest.raises(ValueError, match=r"CaptureSpec\.hooks: unknown hook 'q'"):
        CaptureSpec(hooks=("q",), layers=(0,))
    with pytest.raises(ValueError, match=r"CaptureSpec\.out_dtype: 'int8'"):
        CaptureSpec(layers=(0,), out_dtype="int8")
    with pytest.raises(ValueError, match="asks for nothing"):
        CaptureSpec(layers=())


def test_option_parsing_accepts_the_documented_forms():
    assert parse_hooks("resid_post") == ("resid_post",)
    assert parse_hooks(" mlp_out , resid_pre,hook_mlp_out") == ("resid_pre", "mlp_out")
    assert parse_hooks("all") == ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    assert parse_layers("12") == (12,)
    assert parse_layers("12,0,6,6") == (0, 6, 12)
    assert parse_layers("all", num_layers=3) == (0, 1, 2)
    assert parse_layers("2-4,0", num_layers=24) == (0, 2, 3, 4)
    assert parse_layers(5) == (5,)
    with pytest.raises(ValueError, match="needs the model's layer count"):
        parse_layers("all")


def test_capture_with_a_layer_beyond_the_model():
    from model import load_model

    model = load_model("random:tiny?layers=2", dtype="float32")
    tokens = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"layer 5 is out of range; this model's layers are 0\.\.1"):
        model.capture(tokens, tokens + 1, tokens, CaptureSpec(layers=(0, 5)))


def test_bad_random_specs_and_options():
    from model import load_model

    with pytest.raises(ConfigError, match=r"unknown geometry 'qwen2.5-9b'; choose one of qwen2\.5-0\.5b"):
        parse_random_spec("random:qwen2.5-9b")
    with pytest.raises(ConfigError, match=r"layers=30 is out of range 1\.\.24"):
        parse_random_spec("random:qwen2.5-0.5b?layers=30")
    with pytest.raises(ConfigError, match="unknown option 'depth'"):
        parse_random_spec("random:qwen2.5-0.5b?depth=3")
    assert parse_random_spec("random:Qwen2.5-7B?layers=2&seed=4").config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"attention='cudnn' needs a CUDA GPU"):
        load_model("random:tiny", attention="cudnn")
    with pytest.raises(ValueError, match=r"attention='flash' is not one of auto, xla, cudnn"):
        load_model("random:tiny", attention="flash")
    with pytest.raises(ValueError, match=r"dtype 'float8' is not one of"):
        load_model("random:tiny", dtype="float8")


def test_tied_checkpoint_with_a_different_lm_head_is_refused(checkpoint_copy):
    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2

    _edit_tensors(checkpoint_copy, add_head)
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true but lm_head\.weight differs"):
        _load(checkpoint_copy)

    def same_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

    _edit_tensors(checkpoint_copy, same_head)
    assert "lm_head" not in _load(checkpoint_copy).params


def test_mesh_options():
    import jax

    from model.sharding import make_mesh, parse_mesh

    assert parse_mesh("none") is None
    mesh = parse_mesh("1x1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert dict(parse_mesh("model=1").shape) == {"data": len(jax.devices()), "model": 1}
    with pytest.raises(ValueError, match=r"data=3 x model=1 = 3 does not match the 1 devices"):
        make_mesh(data=3, model=1)
    with pytest.raises(ValueError, match=r"--mesh='data=2;model': write data=N,model=M"):
        parse_mesh("data=2;model")
