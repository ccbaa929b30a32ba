"""Device meshes with ("data", "model") axes and the placement of parameters and batches on them.

Parameters are sharded by their logical axes (from the weight table in model/weights.py): attention heads, MLP
features and the vocabulary over "model" (tensor parallelism); batches over "data". A dimension that does not
divide evenly by its mesh axis stays replicated (e.g. Qwen2.5-0.5B's 2 KV heads on a 4-way model axis): the
results are the same, only the memory saving on that tensor is lost.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA_AXIS = "data"
MODEL_AXIS = "model"
LOGICAL_TO_MESH: dict[str, str] = {
    "vocab": MODEL_AXIS,
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "mlp": MODEL_AXIS,
    "batch": DATA_AXIS,
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all). `data` defaults to whatever `model` leaves."""
    devices = list(devices if devices is not None else jax.devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"make_mesh: model={model} must be a positive divisor of the {len(devices)} devices")
    if data is None:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ValueError(
            f"make_mesh: data={data} x model={model} = {data * model} does not match the {len(devices)} devices "
            f"({devices[0].platform}); choose data*model == {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def parse_mesh(text: str, devices=None) -> Mesh | None:
    """"none" / "" -> None; "data=4,model=2" or "4x2" -> make_mesh(4, 2); "model=2" -> data fills the rest."""
    text = (text or "").strip().lower()
    if text in ("", "none", "single"):
        return None
    if "x" in text and "=" not in text:
        data, _, model = text.partition("x")
        try:
            return make_mesh(int(data), int(model), devices)
        except ValueError as e:
            raise ValueError(f"--mesh={text!r}: {e}") from None
    sizes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in (DATA_AXIS, MODEL_AXIS) or not value.strip().isdigit():
            raise ValueError(f"--mesh={text!r}: write data=N,model=M (or NxM, or none)")
        sizes[key.strip()] = int(value)
    return make_mesh(sizes.get(DATA_AXIS), sizes.get(MODEL_AXIS, 1), devices)


def logical_spec(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    used: set[str] = set()
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axis = LOGICAL_TO_MESH.get(axis) if axis else None
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(mesh: Mesh, axes_tree: dict, shapes_tree: dict) -> dict:
    """NamedShardings for a parameter tree, from its logical axes and shapes."""
    return jax.tree.map(
        lambda axes, shape: NamedSharding(mesh, logical_spec(mesh, axes, shape)),
        axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple),
    )


def place_params(params: dict, shardings: dict | None) -> dict:
    """Host arrays -> device arrays, sharded as `shardings` says (or on the default device)."""
    if shardings is None:
        return jax.tree.map(jax.device_put, params)
    return jax.tree.map(lambda value, sharding: jax.device_put(value, sharding), params, shardings)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over the data axis; replicated when the batch does not divide evenly (still correct, less parallel)."""
    data = mesh.shape[DATA_AXIS]
    if shape[0] % data:
        log.warning("batch of %d rows does not divide over %d data-parallel devices: replicating it", shape[0], data)
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (len(shape) - 1))))
