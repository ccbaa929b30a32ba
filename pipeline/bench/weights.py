"""Where the paths of one geometry get their weights: the baseline's random init saved as a checkpoint that ours
and the pipeline load (the default), or (`--weights=seeded`) the same init handed to JAX in memory, so a large
model is built from one seed in both frameworks without writing a checkpoint of its size."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.bench.settings import BenchError


@contextlib.contextmanager
def serving(model):
    """While open, the pipeline's workers in this process get `model` instead of loading their own: the
    pipeline's one seam to the model is `model.qwen2.load_model`, which the extractor calls when it sets up."""
    from model import qwen2

    def load_model(spec, dtype="bfloat16", mesh=None, attention="auto"):
        return model

    real, qwen2.load_model = qwen2.load_model, load_model
    try:
        yield model
    finally:
        qwen2.load_model = real


@dataclasses.dataclass
class Weights:
    """One geometry's weights as the paths see them: `source` is the pipeline's --model (and what the results
    record). In memory, `host_params` hold them until ours is built, and the pipeline is served ours."""
    source: str
    description: str
    host_params: Optional[dict] = None
    in_memory: bool = False

    def load(self, dtype: str, mesh, attention: str):
        from model import load_model

        if not self.in_memory:
            return load_model(self.source, dtype=dtype, mesh=mesh, attention=attention)
        if self.host_params is None:
            raise BenchError(f"the in-memory weights of {self.source} were already released")
        return in_memory_model(self.source, self.host_params, dtype, mesh, attention)

    def pipeline_context(self, ours):
        """What the pipeline run sits in: ours served to it (in-memory weights), or nothing (it loads `source`)."""
        if not self.in_memory:
            return contextlib.nullcontext()
        if ours is None:
            raise BenchError(f"ours could not be built from the in-memory weights of {self.source}, so the "
                             "pipeline has no model with the same weights to run")
        return serving(ours)


def random_weights(model_name: str, seed: int) -> Weights:
    source = f"random:{model_name}?seed={seed}"
    return Weights(source, source)


def checkpoint_weights(reference, directory: Path, seed: int) -> Weights:
    from pipeline.bench.baseline import save_checkpoint

    return Weights(str(save_checkpoint(reference, directory)),
                   f"transformers Qwen2ForCausalLM random init (seed {seed}), saved with save_pretrained and "
                   "loaded by ours and the pipeline")


def seeded_weights(reference, model_name: str, config, dtype: str, seed: int) -> Weights:
    """The baseline's random init (torch.manual_seed(seed)) converted in memory through the weight table that
    reads checkpoints, so ours and the pipeline run exactly the baseline's values."""
    from model.dtypes import numpy_dtype
    from model.weights import expected_keys, table_for
    from pipeline.bench.baseline import torch_to_numpy

    target = numpy_dtype(dtype)
    params: dict = {}
    leaves = {}
    for entry in table_for(config):
        leaves[entry.path] = np.empty(entry.param_shape(config), dtype=target)
        functools.reduce(lambda tree, part: tree.setdefault(part, {}), entry.path[:-1], params)[entry.path[-1]] = (
            leaves[entry.path])
    state = reference.state_dict()
    for key, (entry, layer) in expected_keys(config).items():
        value = entry.to_param(torch_to_numpy(state[key].detach().cpu()), config)
        leaves[entry.path][() if layer is None else layer] = value
    return Weights(f"random:{model_name}", f"transformers Qwen2ForCausalLM random init (seed {seed}), "
                   "converted in memory to ours and served to the pipeline (no checkpoint)", params, in_memory=True)


def in_memory_model(source: str, host_params: dict, dtype: str, mesh, attention: str):
    """A HookedQwen over `host_params`, placed as load_model places a checkpoint's."""
    from model import sharding as sharding_lib
    from model.config import QWEN25_GEOMETRIES
    from model.qwen2 import HookedQwen, describe_spec, resolve_attention
    from model.tokenizer import load_tokenizer
    from model.weights import logical_axes_tree, param_shapes

    config = QWEN25_GEOMETRIES[source.removeprefix("random:").split("?")[0]]
    shardings = None if mesh is None else sharding_lib.param_shardings(
        mesh, logical_axes_tree(config), param_shapes(config))
    params: Any = sharding_lib.place_params(host_params, shardings)
    return HookedQwen(config=config, params=params, tokenizer=load_tokenizer(), dtype=dtype,
                      attention=resolve_attention(attention, dtype, mesh), mesh=mesh, source=describe_spec(source))

