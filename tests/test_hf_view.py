"""The Hugging Face datasets view (memory-mapped, float activations, hook and layer kept) and the DuckDB and polars
recipes of docs/format.md that decode the activation blob to floats, all on an output the real pipeline wrote."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.dataset import open_activations
from pipeline.hf_view import to_hf_dataset
from tests.pipeline_output import LAYER, pipeline_output

HOOK = "resid_post"


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_checkpoint):
    return pipeline_output(tmp_path_factory, tiny_checkpoint)


def reference(output, where=None):
    """{(sample_id, position): float32 vector} as pipeline.dataset decodes it."""
    values, columns = open_activations(str(output)).to_numpy(HOOK, LAYER, where=where, dtype="float32",
                                                             with_metadata=True)
    return dict(zip(zip(columns["sample_id"].tolist(), columns["position"].tolist()), values))


def assert_same_vectors(keys, vectors, expected):
    assert len(keys) == len(set(keys)) == len(expected)
    np.testing.assert_array_equal(np.stack([expected[k] for k in keys]).view(np.uint32),
                                  np.asarray(vectors, np.float32).view(np.uint32))


def test_hf_view_is_memory_mapped_and_yields_floats(output, tmp_path):
    import datasets
    import torch

    ds = open_activations(str(output))
    allocated = pa.total_allocated_bytes()
    hf = to_hf_dataset(ds, HOOK, LAYER, cache_dir=str(tmp_path))
    # Backed by the Arrow file on disk, not by buffers Arrow allocated: mapped, not copied into memory.
    assert isinstance(hf.data, datasets.table.MemoryMappedTable)
    assert [f["filename"] for f in hf.cache_files] == [str(next(tmp_path.glob("*.arrow")))]
    assert pa.total_allocated_bytes() - allocated < hf.data.nbytes // 10
    assert hf.num_rows == ds.num_tokens(HOOK, LAYER)
    assert hf.features["activation"] == datasets.List(datasets.Value("float32"), length=ds.d_model)

    rows = hf.with_format("numpy")[:]
    assert rows["activation"].dtype == np.float32 and rows["activation"].shape == (hf.num_rows, ds.d_model)
    assert set(rows["hook"].tolist()) == {HOOK} and set(rows["layer"].tolist()) == {LAYER}
    assert_same_vectors(list(zip(rows["sample_id"].tolist(), rows["position"].tolist())), rows["activation"],
                        reference(output))
    batch = hf.with_format("torch")[:5]
    assert batch["activation"].dtype == torch.float32 and tuple(batch["activation"].shape) == (5, ds.d_model)

    again = to_hf_dataset(ds, HOOK, LAYER, cache_dir=str(tmp_path))
    assert again.cache_files == hf.cache_files  # the same committed files: the view is reused


def test_hf_view_with_where_and_bad_arguments(output, tmp_path):
    ds = open_activations(str(output))
    where = pc.field("part") == "test_input"
    hf = to_hf_dataset(ds, HOOK, LAYER, where=where, cache_dir=str(tmp_path))
    rows = hf.with_format("numpy")[:]
    assert set(rows["part"].tolist()) == {"test_input"}
    assert_same_vectors(list(zip(rows["sample_id"].tolist(), rows["position"].tolist())), rows["activation"],
                        reference(output, where))
    assert len(list(tmp_path.glob("*.arrow"))) == 1
    with pytest.raises(ValueError, match="datasets has no bfloat16"):
        to_hf_dataset(ds, HOOK, LAYER, dtype="bfloat16", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="has no activations for hook='attn_out'"):
        to_hf_dataset(ds, "attn_out", LAYER, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="colour"):
        to_hf_dataset(ds, HOOK, LAYER, where=pc.field("colour") == 1, cache_dir=str(tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_hf_view_of_a_gcs_output(output, gcs_emulator, tmp_path):
    from tests.pipeline_output import upload

    ds = open_activations(upload(output, gcs_emulator, "hf/out"))
    rows = ds.to_hf_dataset(HOOK, LAYER, cache_dir=str(tmp_path)).with_format("numpy")[:]
    assert_same_vectors(list(zip(rows["sample_id"].tolist(), rows["position"].tolist())), rows["activation"],
                        reference(output))


# The recipes below are docs/format.md's, verbatim apart from OUTPUT, hook and layer.

def test_duckdb_recipe_decodes_the_blob(output):
    import duckdb

    OUTPUT = str(output)
    def bf16_vector(blobs):  # an Arrow array of bfloat16 vectors (BLOB) -> FLOAT[] of the same values
        blobs = pa.chunked_array([blobs]).combine_chunks()
        width = pc.binary_length(blobs)[0].as_py() if len(blobs) else 0
        fixed = blobs.cast(pa.binary(width))
        bits = np.frombuffer(fixed.buffers()[1], "<u2", count=len(fixed) * width // 2, offset=fixed.offset * width)
        return pa.FixedSizeListArray.from_arrays(pa.array((bits.astype(np.uint32) << 16).view(np.float32)),
                                                 width // 2)

    con = duckdb.connect()
    con.create_function("bf16_vector", bf16_vector, ["BLOB"], "FLOAT[]", type="arrow")
    table = con.sql(f"""
        SELECT sample_id, position, bf16_vector(activation) AS x
        FROM read_parquet('{OUTPUT}/activations/hook=resid_post/layer=1/*.parquet')
    """).to_arrow_table()

    keys = list(zip(table["sample_id"].to_pylist(), table["position"].to_pylist()))
    vectors = np.stack(table["x"].to_numpy(zero_copy_only=False))
    assert_same_vectors(keys, vectors, reference(output))


def test_polars_recipe_decodes_the_blob(output):
    import polars as pl

    OUTPUT, D_MODEL = str(output), open_activations(str(output)).d_model
    frame = (pl.scan_parquet(f"{OUTPUT}/activations/hook=resid_post/layer=1/*.parquet")
             .with_columns(x=pl.col("activation").bin.reinterpret(dtype=pl.Array(pl.UInt16, D_MODEL))
                           .arr.eval((pl.element().cast(pl.UInt32) * 65536).reinterpret(dtype=pl.Float32)))
             .collect())

    keys = list(zip(frame["sample_id"].cast(pl.String).to_list(), frame["position"].to_list()))
    assert frame["x"].dtype == pl.Array(pl.Float32, D_MODEL)
    assert_same_vectors(keys, frame["x"].to_numpy(), reference(output))
