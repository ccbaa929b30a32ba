"""A Hugging Face `datasets.Dataset` view of one hook and layer of an output, memory-mapped from an Arrow file.

    from pipeline.dataset import open_activations
    from pipeline.hf_view import to_hf_dataset
    hf = to_hf_dataset(open_activations("out/arc-agi-1"), "resid_post", 6)
    hf.with_format("torch")[:8]["activation"]          # float32 [8, d_model]

Parquet pages are compressed, so no reader can map them: the view decodes the committed files once (through
`ds.batches(..., shuffle=False)`, one batch of tokens in memory at a time) into an uncompressed Arrow stream file
in the `datasets` cache and opens it with `Dataset.from_file`, which memory-maps it. The file's name is a hash of
the committed files (path, sha256, row groups), hook, layer, `where` and dtype: the same view is reused, a
changed output or another filter gets a new file. `activation` is a `List(Value(dtype), length=d_model)` feature,
an Arrow fixed_size_list, so `.with_format("numpy"|"torch"|"jax")` yields [rows, d_model] float arrays; `hook` and
`layer` are columns, as are the token columns.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import numpy as np
import pyarrow as pa

from transforms import output_format as fmt

__all__ = ["to_hf_dataset", "hf_features"]

_VIEW_VERSION = 1
_BATCH_TOKENS = 65_536
_TOKEN_TYPES = (("sample_id", "string"), ("position", "int32"), ("token_id", "int32"), ("part", "string"),
                ("example_index", "int16"), ("row", "int16"), ("col", "int16"), ("color", "int8"))


def hf_features(d_model: int, dtype: str = "float32"):
    """The `datasets.Features` of the view: token columns, hook, layer, and activation as a fixed-length float list."""
    import datasets

    columns = {name: datasets.Value(kind) for name, kind in _TOKEN_TYPES}
    # datasets 4 renamed Sequence to List; both map length=d_model to an Arrow fixed_size_list.
    fixed_list = getattr(datasets, "List", None) or datasets.Sequence
    columns.update(hook=datasets.Value("string"), layer=datasets.Value("int32"),
                   activation=fixed_list(datasets.Value(dtype), length=int(d_model)))
    return datasets.Features(columns)


def _view_dtype(dtype: str, storage_dtype: str) -> str:
    # Arrow and `datasets` have no bfloat16; float32 holds bfloat16 and float16 exactly.
    allowed = {"float32"} | ({"float16"} if storage_dtype == "float16" else set())
    if dtype not in allowed:
        raise ValueError(f"to_hf_dataset: dtype={dtype!r}; for {storage_dtype} storage use "
                         f"{' or '.join(sorted(allowed))} (datasets has no bfloat16; narrowing would round)")
    return dtype


def to_hf_dataset(ds, hook: str, layer: int, where=None, *, dtype: str = "float32", cache_dir: str | None = None):
    """A memory-mapped `datasets.Dataset` of every committed token of `hook` / `layer` (after `where`, a
    pyarrow.compute expression as for `ds.to_numpy`), rows in path then file order. `cache_dir` holds the Arrow
    file (default: `datasets`' cache, `HF_DATASETS_CACHE`, under `arc_activations/`)."""
    import datasets

    units = ds.units(hook, layer)  # also checks the hook and layer
    dtype = _view_dtype(dtype, ds.storage_dtype)
    key = json.dumps({"view": _VIEW_VERSION, "output": ds.output, "hook": hook, "layer": int(layer),
                      "where": None if where is None else str(where), "dtype": dtype,
                      "units": [(u.file.path, u.file.sha256, u.row_group, u.rows) for u in units]})
    cache_dir = cache_dir or os.path.join(str(datasets.config.HF_DATASETS_CACHE), "arc_activations")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{hook}-{int(layer)}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.arrow")
    if not os.path.exists(path):
        _write_view(ds, hook, int(layer), where, dtype, path)
    return datasets.Dataset.from_file(path)


def _write_view(ds, hook: str, layer: int, where, dtype: str, path: str) -> None:
    schema = hf_features(ds.d_model, dtype).arrow_schema
    temp = os.path.join(os.path.dirname(path), f"{fmt.TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with pa.OSFile(temp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            loader = ds.batches(hook, layer, _BATCH_TOKENS, shuffle=False, with_metadata=True, where=where,
                                drop_last=False, dtype=dtype)
            with loader:
                for values, columns in loader:
                    writer.write_batch(_record_batch(schema, values, columns, hook, layer))
        # A reader never sees a partial view: the complete file is renamed into place.
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _record_batch(schema: pa.Schema, values: np.ndarray, columns: dict, hook: str, layer: int) -> pa.RecordBatch:
    rows, d_model = values.shape
    arrays = {name: pa.array(columns[name], schema.field(name).type) for name, _ in _TOKEN_TYPES}
    arrays["hook"] = pa.array([hook] * rows, pa.string())
    arrays["layer"] = pa.array(np.full(rows, layer, np.int32))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    arrays["activation"] = pa.FixedSizeListArray.from_arrays(flat, d_model)
    return pa.RecordBatch.from_arrays([arrays[name].cast(schema.field(name).type) for name in schema.names],
                                      schema=schema)
