import concurrent.futures
import json
import os
import zlib

import apache_beam as beam
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import write
from transforms.annotations import PART_CODES
from transforms.batching import pack_samples
from transforms.write import (
    ShardWriter,
    WriteDeadLetters,
    WriteShards,
    activation_table,
    activations_to_numpy,
    clean_uncommitted,
    committed_sample_ids,
    committed_shards,
    remove_dead_letters,
    samples_table,
    write_dead_letters,
)

D_MODEL = 16


def make_sample(sample_id: str, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([zlib.crc32(sample_id.encode()), seed])
    return {
        "sample_id": sample_id, "dataset": "arc-agi-1/train", "task_id": sample_id.split("/")[0],
        "test_index": 0, "augmentation": '{"index": 0}', "prompt": f"prompt of {sample_id}",
        "token_ids": rng.integers(0, 151_000, length).astype(np.int32),
        "annotations": {
            "part": rng.integers(0, len(PART_CODES), length).astype(np.int8),
            "example_index": rng.integers(-1, 4, length).astype(np.int16),
            "row": rng.integers(-1, 30, length).astype(np.int16),
            "col": rng.integers(-1, 30, length).astype(np.int16),
            "color": rng.integers(-1, 10, length).astype(np.int8),
        },
    }


def make_batch(prefix="task", lengths=(5, 9, 3), batch_size=2):
    samples = [make_sample(f"{prefix}{i}/t0/a0", n) for i, n in enumerate(lengths)]
    (batch,) = pack_samples(samples, batch_size, (32,))
    return batch


def bf16_activations(n: int, d: int = D_MODEL, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((n, d)) * 3).astype(ml_dtypes.bfloat16)
    flat = values.reshape(-1)
    # Edge values a lossy path would change: tiny subnormals, the largest bf16, negative zero.
    flat[:4] = np.array([1e-40, -3.3e38, -0.0, 1.0e-3], np.float32).astype(ml_dtypes.bfloat16)
    return values


def extracted(batch, hooks=(("resid_post", 1), ("mlp_out", 0)), dtype=ml_dtypes.bfloat16, seed=0):
    n = sum(p[3] for p in batch["placements"])
    return {key: bf16_activations(n, seed=seed + i).astype(dtype) for i, key in enumerate(hooks)}


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_activation_table_schema_and_rows():
    batch = make_batch()
    acts = extracted(batch)[("resid_post", 1)]
    table = activation_table(batch["samples"], batch["placements"], acts, "resid_post", 1, "float32")
    assert table.schema.field("sample_id").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("activation").type == pa.binary(4 * D_MODEL)
    assert table.schema.metadata[b"activation_encoding"] == b"float32-le"
    assert table.schema.metadata[b"format_version"] == b"2"
    # Each row's vector is its d_model values, little-endian, in the storage dtype.
    first_vector = np.frombuffer(table["activation"][0].as_py(), "<f4")
    np.testing.assert_array_equal(first_vector, acts[0].astype(np.float32))
    assert [table.schema.field(c).type for c in ("position", "token_id", "example_index", "row", "col", "color")] \
        == [pa.int32(), pa.int32(), pa.int16(), pa.int16(), pa.int16(), pa.int8()]
    assert "hook" not in table.column_names and "layer" not in table.column_names
    assert table.schema.metadata[b"hook_name"] == b"blocks.1.hook_resid_post"
    n = sum(p[3] for p in batch["placements"])
    assert table.num_rows == n
    first = batch["samples"][0]
    k = len(first["token_ids"])
    assert table["sample_id"].to_pylist()[:k] == [first["sample_id"]] * k
    assert table["position"].to_pylist()[:k] == list(range(k))
    assert table["token_id"].to_pylist()[:k] == first["token_ids"].tolist()
    names = {code: name for name, code in PART_CODES.items()}
    assert table["part"].to_pylist()[:k] == [names[c] for c in first["annotations"]["part"].tolist()]
    with pytest.raises(ValueError, match=r"expected \(17, d_model\)"):
        activation_table(batch["samples"], batch["placements"], acts[:-1], "resid_post", 1)
    broken = dict(first, annotations={k: v for k, v in first["annotations"].items() if k != "row"})
    with pytest.raises(ValueError, match=r"lacks annotations\['row'\]"):
        activation_table([broken], [(0, 0, 0, k)], acts[:k], "resid_post", 1)
    with pytest.raises(ValueError, match="float64"):
        activation_table(batch["samples"], batch["placements"], acts.astype(np.float64), "resid_post", 1)


def test_samples_table():
    batch = make_batch()
    table = samples_table(batch["samples"])
    assert table.schema.field("token_ids").type == pa.list_(pa.int32())
    assert table["num_tokens"].to_pylist() == [len(s["token_ids"]) for s in batch["samples"]]
    assert table["token_ids"].to_pylist()[1] == batch["samples"][1]["token_ids"].tolist()
    assert table.schema.field("test_index").type == pa.int32()


def test_bf16_round_trip_bit_exact_through_float32(tmp_path):
    root = str(tmp_path / "out")
    batch = make_batch()
    acts = extracted(batch)
    stats = ShardWriter(root, "h000", "random:tiny", "bfloat16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"], acts)
    assert stats["rows"] == 2 * 17 and stats["samples"] == 3 and stats["tokens"] == 17 and stats["files"] == 3
    table = ds.dataset(root + "/activations", format="parquet", partitioning="hive").to_table()
    assert table.schema.field("hook").type == pa.string()
    assert pa.types.is_integer(table.schema.field("layer").type)
    for (hook, layer), expected in acts.items():
        part = table.filter((ds.field("hook") == hook) & (ds.field("layer") == layer))
        got = activations_to_numpy(part)
        assert got.dtype == np.float32
        # Bit for bit: bf16 widened to f32 keeps the 16 high bits and zero low bits, -0.0 and subnormals included.
        np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    footer = pq.read_metadata(root + f"/activations/hook=resid_post/layer=1/h000-{batch['batch_id']}.parquet")
    meta = {k.decode(): v.decode() for k, v in footer.metadata.items() if k != b"ARROW:schema"}
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["model"] == "random:tiny" and meta["dtype"] == "bfloat16" and meta["storage_dtype"] == "float32"
    assert meta["d_model"] == str(D_MODEL) and meta["shard"] == f"h000-{batch['batch_id']}"
    col = footer.row_group(0).column(3)
    assert col.path_in_schema == "activation"
    assert col.physical_type == "FIXED_LEN_BYTE_ARRAY" and col.compression == "UNCOMPRESSED"
    assert "PLAIN" in col.encodings and not col.is_stats_set
    assert footer.row_group(0).column(1).compression == "ZSTD"  # the small columns stay compressed


def test_zstd_activation_column_reads_back_the_same_values(tmp_path):
    batch = make_batch()
    acts = extracted(batch)
    roots = {codec: str(tmp_path / codec) for codec in ("none", "zstd")}
    for codec, root in roots.items():
        ShardWriter(root, "h000", "random:tiny", "bfloat16", "bfloat16", activation_compression=codec).write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], acts)
    path = f"/activations/hook=resid_post/layer=1/h000-{batch['batch_id']}.parquet"
    assert pq.read_metadata(roots["zstd"] + path).row_group(0).column(3).compression == "ZSTD"
    tables = [pq.read_table(root + path) for root in roots.values()]
    np.testing.assert_array_equal(activations_to_numpy(tables[0]).view(np.uint16),
                                  activations_to_numpy(tables[1]).view(np.uint16))
    with pytest.raises(ValueError, match="activation compression 'lz4'"):
        ShardWriter(roots["zstd"], "h000", "random:tiny", "bfloat16", "bfloat16", activation_compression="lz4")


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_format_1_files_still_read(tmp_path, storage):
    """Outputs written before format 2 (fixed_size_list values, bf16 bits as uint16) read back the same."""
    batch = make_batch()
    acts = extracted(batch)[("resid_post", 1)]
    table = activation_table(batch["samples"], batch["placements"], acts, "resid_post", 1, storage)
    values = activations_to_numpy(table)
    stored = values.view(np.uint16) if storage == "bfloat16" else values
    metadata = {**table.schema.metadata, b"format_version": b"1",
                b"activation_encoding": {"float32": b"float32", "float16": b"float16",
                                         "bfloat16": b"bfloat16-bits-in-uint16"}[storage]}
    lists = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), D_MODEL)
    old = table.set_column(table.schema.get_field_index("activation"), "activation", lists)
    path = str(tmp_path / "v1.parquet")
    pq.write_table(old.replace_schema_metadata(metadata), path,
                   column_encoding={"activation.list.element": "BYTE_STREAM_SPLIT"}, use_dictionary=False)
    got = activations_to_numpy(pq.read_table(path))
    assert got.dtype == values.dtype and got.shape == (17, D_MODEL)
    np.testing.assert_array_equal(got.view(np.uint8), values.view(np.uint8))


def test_activations_to_numpy_errors():
    vectors = pa.table({"activation": pa.array([b"\0" * 6], pa.binary(6))})
    with pytest.raises(ValueError, match="names no storage dtype"):
        activations_to_numpy(vectors)
    assert activations_to_numpy(vectors, dtype="float16").shape == (1, 3)
    with pytest.raises(ValueError, match="not a whole number of float32"):
        activations_to_numpy(vectors, dtype="float32")
    with pytest.raises(ValueError, match="neither fixed_size_binary"):
        activations_to_numpy(pa.table({"activation": pa.array([1.0])}))


def test_float16_overflow_is_counted(tmp_path):
    root = str(tmp_path / "out")
    batch = make_batch()
    acts = extracted(batch, hooks=(("resid_post", 0),), dtype=np.float32)
    acts[("resid_post", 0)][0, :3] = [70000.0, -1e6, 65504.0]  # two overflow, the float16 maximum does not
    stats = ShardWriter(root, "h000", "m", "float32", "float16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"], acts)
    assert stats["float16_overflow"] == 2
    marker = committed_shards(root)[f"h000-{batch['batch_id']}"]
    assert marker["float16_overflow"] == "2" and marker["files"][0]["float16_overflow"] == 2
    table = pq.read_table(root + f"/activations/hook=resid_post/layer=0/h000-{batch['batch_id']}.parquet")
    assert table.schema.metadata[b"float16_overflow"] == b"2"
    got = activations_to_numpy(table)
    assert got.dtype == np.float16 and np.isinf(got).sum() == 2 and got[0, 2] == 65504
    # Already float16 on arrival (converted on the device): infinities are still counted.
    again = activation_table(batch["samples"], batch["placements"], acts[("resid_post", 0)].astype(np.float16),
                             "resid_post", 0, "float16")
    assert again.schema.metadata[b"float16_overflow"] == b"2"


def test_bfloat16_storage_is_exact_and_readable(tmp_path):
    batch = make_batch()
    acts = extracted(batch, hooks=(("resid_pre", 2),))
    root = str(tmp_path / "out")
    ShardWriter(root, "h000", "m", "bfloat16", "bfloat16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"], acts)
    table = pq.read_table(root + f"/activations/hook=resid_pre/layer=2/h000-{batch['batch_id']}.parquet")
    assert table.schema.field("activation").type == pa.binary(2 * D_MODEL)
    assert table.schema.metadata[b"activation_encoding"] == b"bfloat16-le"
    got = activations_to_numpy(table)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), acts[("resid_pre", 2)].view(np.uint16))
    with pytest.raises(ValueError, match="would round"):
        activation_table(batch["samples"], batch["placements"], np.full((17, 4), 1.0001, np.float32),
                         "resid_pre", 2, "bfloat16")


def test_statistics_switch_for_benchmarks(tmp_path, monkeypatch):
    """ARC_ACTIVATIONS_STATISTICS=off (what the benchmarks set to measure the statistics' cost) gives shards
    without a statistics file or marker entry; anything but on or off is refused."""
    batch = make_batch()
    root = str(tmp_path / "out")
    monkeypatch.setenv(write.STATISTICS_ENV, "off")
    summary = ShardWriter(root, "h000", "m", "bfloat16").write_shard(
        batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    assert summary["stats_bytes"] == 0 and not os.path.exists(os.path.join(root, "stats"))
    marker = committed_shards(root)[f"h000-{batch['batch_id']}"]
    assert "stats" not in marker
    assert ShardWriter(root, "h000", "m", "bfloat16", statistics=True).statistics
    monkeypatch.setenv(write.STATISTICS_ENV, "maybe")
    with pytest.raises(ValueError, match="on or off"):
        ShardWriter(root, "h000", "m", "bfloat16")


def test_retried_write_is_idempotent_and_leaves_no_temp_files(tmp_path):
    root = str(tmp_path / "out")
    batch = make_batch()
    writer = ShardWriter(root, "h000", "m", "bfloat16")
    first = writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    files = listing(root)
    assert len(files) == 4 and not any(os.path.basename(f).startswith(".") for f in files)
    second = writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    timing = "stats_cpu_s"  # CPU seconds: a measurement, not content
    assert first.pop(timing) >= 0 and second.pop(timing) >= 0
    assert listing(root) == files and first == second
    # What WriteShards does on a Beam retry: a committed shard is left as it is, even if recomputed values differ.
    before = committed_shards(root)
    skipping = ShardWriter(root, "h000", "m", "bfloat16", skip_committed=True)
    third = skipping.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch, seed=9))
    assert third.pop(timing) == 0.0 and third == dict(first, already_committed=True)
    assert listing(root) == files and committed_shards(root) == before
    assert committed_sample_ids(root) == {s["sample_id"] for s in batch["samples"]}


def test_failed_attempt_cleans_its_temp_file_and_is_not_committed(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    batch, other = make_batch(), make_batch(prefix="other", lengths=(4,))
    writer = ShardWriter(root, "h000", "m", "bfloat16")
    writer.write_shard(other["batch_id"], other["samples"], other["placements"], extracted(other))
    real_rename = FileSystems.rename

    def failing_rename(sources, destinations):
        if "/samples/" in destinations[0]:
            raise IOError("injected failure before the commit marker")
        return real_rename(sources, destinations)

    monkeypatch.setattr(FileSystems, "rename", staticmethod(failing_rename))
    with pytest.raises(IOError, match="injected"):
        writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    monkeypatch.setattr(FileSystems, "rename", staticmethod(real_rename))
    files = listing(root)
    assert not any(os.path.basename(f).startswith(".tmp-") for f in files), files
    shard = f"h000-{batch['batch_id']}"
    assert sum(shard in f for f in files) == 3  # the two activation files and the stats file, no marker
    assert set(committed_shards(root)) == {f"h000-{other['batch_id']}"}
    assert committed_sample_ids(root) == {"other0/t0/a0"}

    # A killed writer's temp file and another worker's uncommitted file.
    stray = tmp_path / "out/activations/hook=mlp_out/layer=0" / f".tmp-abc123-{shard}.parquet"
    stray.write_bytes(b"partial")
    foreign = tmp_path / "out/activations/hook=mlp_out/layer=0/h001-0123456789abcdef.parquet"
    foreign.write_bytes(b"x")
    removed = clean_uncommitted(root, "h000")
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [f"{shard}.parquet", f"{shard}.parquet", f"{shard}.json", stray.name])
    assert foreign.exists()
    assert len(listing(root)) == 4 + 1  # the committed shard (with its stats file) and the other worker's file
    # The retry then completes the shard.
    writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    assert len(committed_shards(root)) == 2


@pytest.mark.parametrize("threads", [0, 2])
def test_failure_between_activation_files_leaves_nothing(tmp_path, monkeypatch, threads):
    """Sequential (no executor) and with the files written in parallel on an executor."""
    root = str(tmp_path / "out")
    batch = make_batch()
    executor = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    real_upload, calls = write._upload, []

    def failing_upload(data, path):
        calls.append(path)
        if len(calls) == 2:
            raise IOError("injected upload failure")
        return real_upload(data, path)

    monkeypatch.setattr(write, "_upload", failing_upload)
    with pytest.raises(IOError, match="injected"):
        ShardWriter(root, "h000", "m", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], extracted(batch), executor)
    # The first file was uploaded under its temporary name, never renamed, and then deleted.
    assert os.path.basename(calls[0]).startswith(".tmp-")
    assert listing(root) == []
    with pytest.raises(ValueError, match="disagree on d_model"):
        acts = extracted(batch)
        acts[("mlp_out", 0)] = acts[("mlp_out", 0)][:, :8]
        monkeypatch.undo()
        ShardWriter(root, "h000", "m", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], acts, executor)
    assert listing(root) == []


def test_files_written_in_parallel_are_the_same_files(tmp_path):
    batch = make_batch()
    acts = extracted(batch, hooks=[(hook, layer) for hook in ("mlp_out", "resid_post") for layer in range(5)])
    summaries = {}
    for name, executor in (("serial", None), ("parallel", concurrent.futures.ThreadPoolExecutor(3))):
        summaries[name] = ShardWriter(str(tmp_path / name), "h000", "m", "bfloat16", "bfloat16").write_shard(
            batch["batch_id"], batch["samples"], batch["placements"], acts, executor)
    for summary in summaries.values():
        assert summary.pop("stats_cpu_s") > 0  # CPU seconds: a measurement, not content
    assert summaries["serial"] == summaries["parallel"] and summaries["serial"]["files"] == 11
    serial, parallel = (committed_shards(str(tmp_path / name)) for name in ("serial", "parallel"))
    assert serial[f"h000-{batch['batch_id']}"]["files"] == parallel[f"h000-{batch['batch_id']}"]["files"]


def test_writer_holds_the_extractor_back_by_bytes(tmp_path, monkeypatch):
    """Batches waiting for their writers never exceed the byte budget (one batch always fits), and every batch
    is still written exactly once."""
    import time

    root = str(tmp_path / "out")
    batches = [make_batch(prefix=p, lengths=(6, 2)) for p in "abcdef"]
    elements = [{"batch_id": b["batch_id"], "samples": b["samples"], "placements": b["placements"],
                 "activations": extracted(b)} for b in batches]
    size = write._activation_bytes(elements[0])
    fn = write._WriteShardFn(root, "h000", "m", "bfloat16", "bfloat16", threads=4, memory_bytes=2 * size + 1)
    fn.setup()
    real = fn._writer.write_shard

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return real(*args, **kwargs)

    fn._writer.write_shard = slow
    fn.start_bundle()
    summaries, most = [], 0
    for element in elements:
        summaries += list(fn.process(element))
        most = max(most, fn._pending_bytes)
        assert fn._pending_bytes <= 2 * size + 1 and len(fn._pending) <= 2
    summaries += [value.value for value in fn.finish_bundle()]
    fn.teardown()
    assert most >= size
    assert sorted(s["shard"] for s in summaries) == sorted(f"h000-{b['batch_id']}" for b in batches)
    assert len(committed_shards(root)) == 6
    # A batch larger than the budget still goes, alone.
    other = str(tmp_path / "other")
    one_at_a_time = write._WriteShardFn(other, "h000", "m", "bfloat16", "bfloat16", threads=4, memory_bytes=1)
    one_at_a_time.setup()
    one_at_a_time.start_bundle()
    written = []
    for element in elements[:3]:
        written += list(one_at_a_time.process(element))
        assert len(one_at_a_time._pending) <= 1
    written += [value.value for value in one_at_a_time.finish_bundle()]
    one_at_a_time.teardown()
    assert len(written) == 3 and len(committed_shards(other)) == 3


def test_worker_prefix_is_checked(tmp_path):
    for bad in ("h-0", ".h", "_h", "a/b", ""):
        with pytest.raises(ValueError, match="worker prefix"):
            ShardWriter(str(tmp_path), bad, "m", "float32")
    with pytest.raises(ValueError, match="storage dtype"):
        ShardWriter(str(tmp_path), "h0", "m", "float32", "int8")


def test_write_shards_transform(tmp_path):
    root = str(tmp_path / "out")
    batches = [make_batch(prefix=p, lengths=(6, 2)) for p in ("a", "b", "c")]
    elements = [{"batch_id": b["batch_id"], "samples": b["samples"], "placements": b["placements"],
                 "activations": extracted(b)} for b in batches]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        summaries = (p | beam.Create(elements)
                     | WriteShards(root, "h000", "random:tiny", "bfloat16", "float32")
                     | beam.Map(lambda s: (s["shard"], s["samples"], s["rows"])))
        assert_that(summaries, equal_to([(f"h000-{b['batch_id']}", 2, 16) for b in batches]))
    assert len(committed_shards(root)) == 3
    table = ds.dataset(root + "/activations", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3 * 8 * 2


def test_dead_letters(tmp_path):
    root = str(tmp_path / "out")
    letters = [{"source": f"f.jsonl:{i}", "stage": "validate", "reason": "grid is ragged",
                "record": json.dumps({"i": i})} for i in range(10)]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        stats = p | beam.Create(letters) | WriteDeadLetters(root, "h000", num_shards=3)
        assert_that(stats | beam.Map(lambda s: s["rows"]) | beam.CombineGlobally(sum), equal_to([10]))
    files = sorted(os.listdir(tmp_path / "out/dead_letter"))
    assert all(f.startswith("h000-") and f.endswith(".jsonl") for f in files) and 1 <= len(files) <= 3
    lines = [json.loads(line) for f in files for line in (tmp_path / "out/dead_letter" / f).read_text().splitlines()]
    assert sorted(lines, key=lambda d: d["source"]) == sorted(letters, key=lambda d: d["source"])
    assert list(lines[0]) == ["source", "stage", "reason", "record"]
    write_dead_letters(root, "h001", 0, letters[:1])
    removed = remove_dead_letters(root, "h000")
    assert len(removed) == len(files)
    assert os.listdir(tmp_path / "out/dead_letter") == ["h001-00000.jsonl"]
    with pytest.raises(ValueError, match="lacks reason"):
        write_dead_letters(root, "h000", 0, [{"source": "s", "stage": "x", "record": "r"}])


def test_module_constants_match_design():
    assert write.transformer_lens_name("resid_mid", 3) == "blocks.3.hook_resid_mid"
    assert write.transformer_lens_name("ln_final", 23) == "ln_final.hook_normalized"
    with pytest.raises(ValueError, match="unknown hook"):
        write.transformer_lens_name("resid", 0)


def test_writer_resume_and_verify_on_gcs_emulator(gcs_emulator):
    """The same code on gs:// (through Beam's GCS filesystem) against a local emulator."""
    import pyarrow.fs

    from pipeline.manifest import build_manifest, write_manifest
    from pipeline.verify import verify_output

    root = f"{gcs_emulator.root}/writer/run"
    batch, other = make_batch(), make_batch(prefix="other", lengths=(4,))
    writer = ShardWriter(root, "h000", "m", "bfloat16")
    writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], extracted(batch))
    # An uncommitted shard: its activation files are there, its samples file is not.
    writer.write_shard(other["batch_id"], other["samples"], other["placements"], extracted(other))
    FileSystems.delete([f"{root}/samples/h000-{other['batch_id']}.parquet"])
    assert set(committed_shards(root)) == {f"h000-{batch['batch_id']}"}
    removed = clean_uncommitted(root, "h000")
    assert len(removed) == 3 and all(other["batch_id"] in p for p in removed)  # 2 activation files + stats
    write_manifest(root, build_manifest(root, {"hooks": ["mlp_out", "resid_post"], "layers": [0, 1]}))
    report = verify_output(root)
    # hooks x layers asks for 4 files per shard; this writer wrote 2 (mlp_out 0, resid_post 1).
    assert not report.ok and all("shard has no activation file" in e for e in report.errors)
    write_manifest(root, build_manifest(root, {}))
    assert verify_output(root, deep=True).ok
    gcs = pyarrow.fs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{gcs_emulator.port}",
                                   scheme="http")
    table = ds.dataset(f"{gcs_emulator.bucket}/writer/run/activations", format="parquet", partitioning="hive",
                       filesystem=gcs).to_table()
    assert table.num_rows == 2 * 17


def test_host_storage_conversion():
    import warnings

    from model.dtypes import to_storage

    values = bf16_activations(5)
    assert to_storage(values, "bfloat16")[0] is values  # the default: what left the device is what is stored
    widened, overflow = to_storage(values, "float32")
    assert overflow == 0
    np.testing.assert_array_equal(widened.astype(ml_dtypes.bfloat16).view(np.uint16), values.view(np.uint16))
    assert to_storage(widened, "float32")[0] is widened  # a second call (the writer's) changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stored, overflow = to_storage(np.array([[1e6, np.inf]], np.float32), "float16")
        assert np.isinf(stored).all() and overflow == 1  # an overflow here; the model's own inf is not one
        assert to_storage(stored, "float16")[1] == 2  # arriving as float16, every inf counts
    with pytest.raises(ValueError, match="unknown storage dtype 'int8'"):
        to_storage(values, "int8")
    with pytest.raises(ValueError, match="convert on the device"):
        to_storage(values.astype(np.float64), "float32")
