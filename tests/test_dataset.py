"""pipeline.dataset: open_activations, to_numpy with where, and the shuffled resumable loader, on small outputs
written by the real shard writer (row groups shrunk so that each file holds several)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.dtypes import storage_numpy_dtype
from pipeline.dataset import open_activations
from tests.test_write import D_MODEL, extracted, make_batch
from transforms import output_format
from transforms.write import ShardWriter

HOOKS = (("resid_post", 1), ("mlp_out", 0))
BF16 = np.dtype(ml_dtypes.bfloat16)


def write_output(root: str, shards: int = 6, storage="bfloat16", first=0, compression="none") -> dict:
    """Writes `shards` shards; returns {(hook, layer): {(sample_id, position): stored vector}}."""
    truth = {key: {} for key in HOOKS}
    writer = ShardWriter(root, "h000", "random:tiny", "bfloat16", storage, activation_compression=compression)
    for i in range(first, first + shards):
        batch = make_batch(prefix=f"s{i}x", lengths=(5 + i % 8, 9, 3, 12), batch_size=4)
        acts = extracted(batch, hooks=HOOKS, seed=i)
        writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], acts)
        keys = [(s["sample_id"], p) for s in batch["samples"] for p in range(len(s["token_ids"]))]
        for key, values in acts.items():
            stored = values.astype(storage_numpy_dtype(storage))
            truth[key].update(zip(keys, stored))
    return truth


@pytest.fixture(scope="module")
def small_row_groups():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(output_format, "ROW_GROUP_BYTES", 8 * D_MODEL * 2)
        patch.setattr(output_format, "MIN_ROW_GROUP_ROWS", 8)
        yield


@pytest.fixture(scope="module")
def output(tmp_path_factory, small_row_groups):
    root = str(tmp_path_factory.mktemp("acts"))
    return SimpleNamespace(root=root, truth=write_output(root))


def keys_of(columns) -> list:
    return list(zip(columns["sample_id"].tolist(), columns["position"].tolist()))


def bits(array) -> np.ndarray:
    return np.asarray(array).view(np.uint16)


def test_importing_the_reader_imports_neither_beam_nor_jax_nor_torch():
    code = ("import sys, pipeline.dataset, transforms.output_format; "
            "print(sorted(m for m in ('apache_beam', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_open_describes_the_output(output):
    ds = open_activations(output.root)
    assert ds.hooks == ("mlp_out", "resid_post") and ds.layers == (0, 1)
    assert ds.d_model == D_MODEL and ds.storage_dtype == "bfloat16" and ds.source == "commit markers"
    assert ds.num_tokens("resid_post", 1) == len(output.truth[("resid_post", 1)])
    samples = ds.samples()
    assert samples.num_rows == 6 * 4 and set(samples.column_names) >= {"sample_id", "task_id", "token_ids"}
    assert len(ds.units("resid_post", 1)) > 6  # several row groups per file


def test_to_numpy_is_bit_exact_and_widens_exactly(output):
    ds = open_activations(output.root)
    for hook, layer in HOOKS:
        x, columns = ds.to_numpy(hook, layer, with_metadata=True)
        assert x.dtype == BF16 and x.shape == (ds.num_tokens(hook, layer), D_MODEL)
        expected = np.stack([output.truth[(hook, layer)][key] for key in keys_of(columns)])
        np.testing.assert_array_equal(bits(x), bits(expected))
        wide = ds.to_numpy(hook, layer, dtype="float32")
        assert wide.dtype == np.float32
        np.testing.assert_array_equal(wide, expected.astype(np.float32))
    with pytest.raises(ValueError, match="round"):
        ds.to_numpy("resid_post", 1, dtype="float16")


def test_where_filters_tokens_and_joins_sample_fields(output):
    ds = open_activations(output.root)
    _, everything = ds.to_numpy("resid_post", 1, with_metadata=True)
    x, columns = ds.to_numpy("resid_post", 1, where=pc.field("part") == "test_input", with_metadata=True)
    assert len(x) == int((everything["part"] == "test_input").sum()) > 0
    assert set(columns["part"]) == {"test_input"}
    truth = output.truth[("resid_post", 1)]
    np.testing.assert_array_equal(bits(x), bits(np.stack([truth[k] for k in keys_of(columns)])))

    where = (pc.field("task_id") == "s2x1") & (pc.field("position") < 4)
    x, columns = ds.to_numpy("resid_post", 1, where=where, with_metadata=True)
    assert keys_of(columns) == [("s2x1/t0/a0", p) for p in range(4)]
    assert set(columns["dataset"]) == {"arc-agi-1/train"}
    assert ds.to_numpy("resid_post", 1, where=pc.field("task_id") == "nope").shape == (0, D_MODEL)


def test_where_on_a_missing_column_or_not_an_expression(output):
    ds = open_activations(output.root)
    with pytest.raises(ValueError, match="colour.*token columns.*sample_id.*sample fields.*task_id"):
        ds.to_numpy("resid_post", 1, where=pc.field("colour") == 3)
    with pytest.raises(TypeError, match="pyarrow.compute expression"):
        ds.to_numpy("resid_post", 1, where="part == 'test_input'")


def epoch_keys(ds, epochs=1, **options):
    """Per rank: the list of batches' token keys."""
    options.setdefault("drop_last", False)
    return list(ds.batches("resid_post", 1, 7, with_metadata=True, epochs=epochs, **options))


def test_every_token_once_per_epoch_across_disjoint_ranks(output):
    ds = open_activations(output.root)
    truth = output.truth[("resid_post", 1)]
    world = 3
    per_rank = []
    for rank in range(world):
        loader = ds.batches("resid_post", 1, 7, with_metadata=True, epochs=2, drop_last=False, rank=rank,
                            world_size=world, buffer_tokens=20, dtype="bfloat16")
        per_rank.append([(loader.epoch, x, cols) for x, cols in loader])
    for epoch in range(2):
        seen = Counter(k for batches in per_rank for e, _, cols in batches if e == epoch for k in keys_of(cols))
        assert seen == Counter(truth.keys())  # every token exactly once, no rank overlapping another
    for batches in per_rank:
        for _, x, cols in batches:
            assert x.dtype == BF16 and x.shape[1] == D_MODEL and 0 < len(x) <= 7
            np.testing.assert_array_equal(bits(x), bits(np.stack([truth[k] for k in keys_of(cols)])))


@pytest.mark.parametrize("kernel", ["compiled", "streaming", "numpy"])
@pytest.mark.parametrize("shuffle, readahead", [(True, 2), (False, 0)])
def test_float32_batches_are_the_stored_vectors_widened(output, monkeypatch, kernel, shuffle, readahead):
    """Vectors go into freed rows of the loader's store (copied there by readahead threads or inline) and come out
    widened by the compiled gather (with plain or, as for large batches, streaming stores) or numpy's: over epochs
    (every row reused many times) each batch row is its token's stored vector, exactly."""
    from pipeline import gather_kernel

    if kernel == "numpy":
        monkeypatch.setenv(gather_kernel.KERNEL_ENV, "numpy")
    elif gather_kernel.load() is None:
        pytest.skip("no C compiler here: the numpy path serves")
    if kernel == "streaming":
        monkeypatch.setattr(gather_kernel, "STREAM_BYTES", 0)
    ds = open_activations(output.root)
    truth = output.truth[("resid_post", 1)]
    loader = ds.batches("resid_post", 1, 6, with_metadata=True, epochs=3, buffer_tokens=14, shuffle=shuffle,
                        drop_last=False, readahead=readahead)
    assert (loader._kernel is None) == (kernel == "numpy")
    seen = Counter()
    for x, cols in loader:
        assert x.dtype == np.float32
        want = np.stack([truth[k] for k in keys_of(cols)]).astype(np.float32)
        np.testing.assert_array_equal(x.view(np.uint32), want.view(np.uint32))
        seen.update(keys_of(cols))
    assert seen == Counter({k: 3 for k in truth})


def test_drop_last_drops_only_the_final_partial_batch(output):
    ds = open_activations(output.root)
    total = ds.num_tokens("resid_post", 1)
    assert total % 10
    kept = list(ds.batches("resid_post", 1, 10, buffer_tokens=30))
    assert all(b.shape == (10, D_MODEL) and b.dtype == np.float32 for b in kept)
    assert len(kept) == total // 10
    loose = list(ds.batches("resid_post", 1, 10, buffer_tokens=30, drop_last=False))
    assert len(loose) == len(kept) + 1 and len(loose[-1]) == total % 10


def test_same_seed_same_order_new_epoch_and_seed_reshuffle(output):
    ds = open_activations(output.root)

    def order(**options):
        return [keys_of(cols) for _, cols in epoch_keys(ds, buffer_tokens=25, **options)]

    first, again = order(seed=3), order(seed=3)
    assert first == again
    assert order(seed=4) != first
    two = [keys_of(cols) for _, cols in epoch_keys(ds, epochs=2, seed=3, buffer_tokens=25)]
    assert two[:len(first)] == first and two[len(first):] != first
    # Global in effect: the first batch already mixes several shards, though the buffer holds few tokens.
    shards = {sample.split("x")[0] for sample, _ in first[0]}
    assert len(shards) >= 2
    unshuffled = [keys_of(cols) for _, cols in epoch_keys(ds, shuffle=False)]
    flat = [k for batch in unshuffled for k in batch]
    _, columns = ds.to_numpy("resid_post", 1, with_metadata=True)
    assert flat == keys_of(columns)  # no shuffle: path then row order


@pytest.mark.parametrize("options", [dict(shuffle=True, buffer_tokens=30), dict(shuffle=False),
                                     dict(shuffle=True, buffer_tokens=12, where=pc.field("row") >= 0,
                                          world_size=2, rank=1)])
def test_state_dict_resumes_with_exactly_the_batches_left(output, options):
    ds = open_activations(output.root)
    loader = ds.batches("resid_post", 1, 5, epochs=3, with_metadata=True, seed=11, **options)
    for _ in range(13):
        next(loader)
    state = loader.state_dict()
    rest = list(loader)
    resumed = ds.batches("resid_post", 1, 5, epochs=3, with_metadata=True, seed=11, **options)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest) > 0
    for (x, cols), (y, cols2) in zip(rest, again):
        np.testing.assert_array_equal(x, y)
        assert keys_of(cols) == keys_of(cols2)


def test_a_state_holds_the_batch_drawn_ahead_and_old_states_still_load(output):
    """With threads the batch after the one yielded is already drawn: the state names its tokens, and a loader that
    resumes yields it first. A version-1 state (no batch ahead, as readahead=0 saves) resumes the same way."""
    ds = open_activations(output.root)
    options = dict(epochs=2, with_metadata=True, seed=4, buffer_tokens=20)
    loader = ds.batches("resid_post", 1, 6, **options)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    assert state["version"] == 2 and len(state["ahead_unit"]) == len(state["ahead_row"]) == 6
    rest = [keys_of(cols) for _, cols in loader]
    for readahead in (0, 2):
        resumed = ds.batches("resid_post", 1, 6, readahead=readahead, **options)
        resumed.load_state_dict(state)
        assert [keys_of(cols) for _, cols in resumed] == rest

    inline = ds.batches("resid_post", 1, 6, readahead=0, **options)
    for _ in range(7):
        next(inline)
    old = inline.state_dict()
    assert len(old.pop("ahead_unit")) == len(old.pop("ahead_row")) == 0
    old["version"] = 1
    resumed = ds.batches("resid_post", 1, 6, **options)
    resumed.load_state_dict(old)
    assert [keys_of(cols) for _, cols in resumed] == rest


def test_a_state_saves_as_plain_values_and_a_loader_built_otherwise_is_refused(output):
    """A state is plain Python values: it survives json and torch.save / torch.load with torch's default
    weights_only, and resumes exactly; states of int64 arrays (as saved before) still load. `drop_last` changes
    which batches come, so a loader built with another is refused; `dtype` may change."""
    import io
    import json

    ds = open_activations(output.root)
    options = dict(with_metadata=True, seed=5, buffer_tokens=20)
    loader = ds.batches("resid_post", 1, 6, epochs=2, **options)
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    rest = [keys_of(cols) for _, cols in loader]
    copies = [json.loads(json.dumps(state)),
              {k: np.asarray(v, np.int64) if k.endswith(("_unit", "_row")) else v for k, v in state.items()}]
    torch = pytest.importorskip("torch")
    saved = io.BytesIO()
    torch.save({"loader": state}, saved)
    saved.seek(0)
    copies.append(torch.load(saved)["loader"])
    for copy in copies:
        resumed = ds.batches("resid_post", 1, 6, epochs=2, dtype="bfloat16", **options)
        resumed.load_state_dict(copy)
        assert [keys_of(cols) for _, cols in resumed] == rest
    with pytest.raises(ValueError, match=re.escape("drop_last=True when saved, False now")):
        ds.batches("resid_post", 1, 6, epochs=2, drop_last=False, **options).load_state_dict(state)


@pytest.mark.parametrize("readahead", [0, 2])
def test_a_state_resumes_under_more_epochs_or_fewer_not_yet_reached(output, readahead):
    """The batches of fewer epochs are the first ones of more: a state resumes in a loader built to run longer (or
    without end), or shorter if its epoch is not reached yet, and yields what that loader would have yielded after
    the same batches; a loader whose epochs end before the state's epoch is refused, saying what would work."""
    ds = open_activations(output.root)
    options = dict(with_metadata=True, seed=3, buffer_tokens=20, readahead=readahead)

    def run(epochs, skip=0, state=None):
        loader = ds.batches("resid_post", 1, 6, epochs=epochs, **options)
        if state is not None:
            loader.load_state_dict(state)
        batches = []
        for _, cols in loader:
            batches.append((loader.epoch, keys_of(cols)))
            if epochs is None and loader.epoch >= 3:
                break
        return batches[skip:], loader

    three, three_finished = run(3)
    one, finished = run(1)
    assert one == three[:len(one)] and {epoch for epoch, _ in three} == {0, 1, 2}
    assert run(3, state=finished.state_dict())[0] == three[len(one):]  # trained one epoch, then two more
    endless, _ = run(None, state=finished.state_dict())
    assert endless[:len(three) - len(one)] == three[len(one):]

    loader = ds.batches("resid_post", 1, 6, epochs=3, **options)
    for _ in range(len(one) + 2):  # into the second epoch
        next(loader)
    middle = loader.state_dict()
    assert middle["epoch"] == 1
    two, _ = run(2)
    assert run(2, state=middle)[0] == two[len(one) + 2:]  # stops earlier, after the epoch it stands in
    assert run(5, state=middle)[0][:len(three) - len(one) - 2] == three[len(one) + 2:]
    with pytest.raises(ValueError, match=re.escape("epochs=3 when saved, 1 now; build the loader as it was; or "
                                                   "epochs=None or at least 2")):
        ds.batches("resid_post", 1, 6, epochs=1, **options).load_state_dict(middle)
    assert run(3, state=three_finished.state_dict())[0] == []  # as saved: nothing left
    with pytest.raises(ValueError, match=re.escape("epochs=3 when saved, 2 now; build the loader as it was; or "
                                                   "epochs=None or at least 3")):
        ds.batches("resid_post", 1, 6, epochs=2, **options).load_state_dict(three_finished.state_dict())


@pytest.mark.parametrize("readahead", [1, 2])
def test_resume_around_an_epoch_boundary_with_a_batch_drawn_ahead(output, readahead):
    """Stopping just before, at and just after the end of an epoch (where the batch drawn ahead already belongs to
    the next epoch) resumes with exactly the batches left, and `epoch` names each batch's own epoch."""
    ds = open_activations(output.root)
    options = dict(epochs=3, with_metadata=True, seed=9, buffer_tokens=20, drop_last=False, readahead=readahead)
    loader = ds.batches("resid_post", 1, 7, **options)
    full = []
    for x, cols in loader:
        full.append((loader.epoch, keys_of(cols)))
    boundary = next(i for i, (epoch, _) in enumerate(full) if epoch == 1)
    assert sum(len(keys) for epoch, keys in full if epoch == 0) == ds.num_tokens("resid_post", 1)
    for stop in (0, 1, boundary - 1, boundary, boundary + 1, len(full) - 1, len(full)):
        first = ds.batches("resid_post", 1, 7, **options)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        resumed = ds.batches("resid_post", 1, 7, **options)
        resumed.load_state_dict(state)
        rest = []
        for x, cols in resumed:
            rest.append((resumed.epoch, keys_of(cols)))
        assert rest == full[stop:], stop


def test_resume_refuses_a_different_loader(output):
    ds = open_activations(output.root)
    loader = ds.batches("resid_post", 1, 5)
    next(loader)
    with pytest.raises(ValueError, match="seed=0 when saved, 1 now"):
        ds.batches("resid_post", 1, 5, seed=1).load_state_dict(loader.state_dict())


def test_memory_is_the_buffer_plus_a_row_group(output):
    ds = open_activations(output.root)
    loader = ds.batches("resid_post", 1, 4, buffer_tokens=16, readahead=0)
    next(loader)
    largest = max(u.rows for u in ds.units("resid_post", 1))
    assert loader._raw.shape == (16 + largest, D_MODEL) and loader._raw.itemsize == np.dtype(BF16).itemsize
    assert loader._slot.shape == loader._free.shape == (16 + largest,)  # indices, not vectors, move


def test_bad_arguments_name_what_is_wrong(output):
    ds = open_activations(output.root)
    with pytest.raises(ValueError, match=r"hook='attn_out' layer=1; it has: mlp_out@\[0\], resid_post@\[1\]"):
        ds.num_tokens("attn_out", 1)
    with pytest.raises(ValueError, match="hook='resid_post' layer=0"):
        ds.batches("resid_post", 0, 4)
    units = len(ds.units("resid_post", 1))
    with pytest.raises(ValueError, match=f"world_size={units + 1} is larger than the {units} row groups"):
        ds.batches("resid_post", 1, 4, world_size=units + 1)
    with pytest.raises(ValueError, match="rank must be"):
        ds.batches("resid_post", 1, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_tokens must be a positive integer"):
        ds.batches("resid_post", 1, 0)
    with pytest.raises(ValueError, match="buffer_tokens=2 is smaller than batch_tokens=7"):
        ds.batches("resid_post", 1, 7, buffer_tokens=2)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"readahead must be a non-negative integer .*, got {bad!r}"):
            ds.batches("resid_post", 1, 4, readahead=bad)
    total = ds.num_tokens("resid_post", 1)
    with pytest.raises(ValueError, match=f"rank 0 of 1 has {total} token\\(s\\) in an epoch, fewer than "
                                         f"batch_tokens={total + 1}: with epochs=None no batch would ever come"):
        next(ds.batches("resid_post", 1, total + 1, epochs=None))
    with pytest.raises(ValueError, match="has 0 token\\(s\\) in an epoch after where"):
        next(ds.batches("resid_post", 1, 4, epochs=None, drop_last=False, where=pc.field("position") < 0))
    units = len(ds.units("resid_post", 1))
    with pytest.raises(ValueError, match=r"rank 1 of 2 has 0 token\(s\) in an epoch after where, fewer than "
                                         r"batch_tokens=4, in each of the last 100 epochs"):
        next(ds.batches("resid_post", 1, 4, epochs=None, drop_last=False, rank=1, world_size=2,
                        where=pc.field("position") < 0))
    # Shuffled among ranks a rank's share changes per epoch: one that can make a batch is not refused.
    largest = max(u.rows for u in ds.units("resid_post", 1))
    loader = ds.batches("resid_post", 1, largest * ((units + 1) // 2) - 1, epochs=None, rank=0, world_size=2,
                        buffer_tokens=10_000)
    assert loader.batch_tokens > 0 and next(loader) is not None
    with pytest.raises(FileNotFoundError, match="not a directory"):
        open_activations(output.root + "/nope")


@pytest.mark.parametrize("readahead", [0, 1, 2])
def test_a_read_that_fails_mid_epoch_loses_no_token(output, readahead):
    """A row group whose read fails once (a transient error, an interrupt): the error reaches the caller, and
    both carrying on with the same loader and resuming a new one from state_dict() give every token once; no
    row of the store is leaked."""
    ds = open_activations(output.root)
    truth = output.truth[("resid_post", 1)]
    read, calls = ds.read_unit, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("transient failure")
        return read(*args, **kwargs)

    options = dict(with_metadata=True, drop_last=False, buffer_tokens=20, readahead=readahead, seed=2)
    for resume in (False, True):
        calls["n"] = 0
        ds.read_unit = flaky
        loader = ds.batches("resid_post", 1, 7, **options)
        seen, failed = Counter(), 0
        while True:
            try:
                _, cols = next(loader)
            except StopIteration:
                break
            except ValueError as error:
                assert "transient failure" in str(error)
                failed += 1
                if resume:
                    state = loader.state_dict()
                    loader.close()
                    loader = ds.batches("resid_post", 1, 7, **options)
                    loader.load_state_dict(state)
                continue
            seen.update(keys_of(cols))
        assert failed == 1 and seen == Counter(truth.keys()), resume
        assert loader._free_count == loader._capacity  # every row of the store free again at the end
        ds.read_unit = read


def copy_output(output, tmp_path) -> str:
    root = str(tmp_path / "copy")
    shutil.copytree(output.root, root)
    return root


def test_uncommitted_files_are_skipped_never_read(output, tmp_path):
    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=resid_post", "layer=1")
    source = sorted(os.listdir(folder))[0]
    shutil.copy(os.path.join(folder, source), os.path.join(folder, "h001-00000000000000aa.parquet"))
    with open(os.path.join(folder, ".tmp-0123-h001-00000000000000bb.parquet"), "wb") as handle:
        handle.write(b"partial")
    ds = open_activations(root)
    assert ds.skipped == ("activations/hook=resid_post/layer=1/.tmp-0123-h001-00000000000000bb.parquet",
                          "activations/hook=resid_post/layer=1/h001-00000000000000aa.parquet")
    assert ds.num_tokens("resid_post", 1) == len(output.truth[("resid_post", 1)])
    assert len(ds.to_numpy("resid_post", 1)) == len(output.truth[("resid_post", 1)])


def test_a_shard_committing_while_the_output_opens_is_skipped_not_called_damaged(output, tmp_path, monkeypatch,
                                                                                  small_row_groups):
    """A writer commits a shard (activation files, then its marker) and renames temporary files while a reader
    lists the output: the markers are listed first, so a shard committing in between is skipped as uncommitted,
    and a file that vanishes between listing and stat is not an error."""
    from pipeline import dataset as dataset_module

    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=resid_post", "layer=1")
    open(os.path.join(folder, ".tmp-0123-h001-00000000000000bb.parquet"), "wb").write(b"partial")
    listing, getsize = dataset_module._LocalStore.list, os.path.getsize

    def list_then_commit(store, reldir):
        found = listing(store, reldir)
        if reldir == output_format.SAMPLES_DIR:
            write_output(root, shards=1, first=70)
        return found

    def vanished(path):
        if ".tmp-" in os.path.basename(path):
            raise FileNotFoundError(path)
        return getsize(path)

    monkeypatch.setattr(dataset_module._LocalStore, "list", list_then_commit)
    monkeypatch.setattr(os.path, "getsize", vanished)
    ds = open_activations(root)
    assert ds.num_tokens("resid_post", 1) == len(output.truth[("resid_post", 1)])
    assert len(ds.skipped) == len(HOOKS) and not any(".tmp-" in p for p in ds.skipped)  # the new shard's files


def test_damaged_footers_samples_files_and_failing_where_name_what_failed(output, tmp_path):
    """A committed file whose footer does not parse, a samples file with a damaged page, and a `where` that fails
    while it is evaluated: each error names the file (or the expression) and what to do; a healthy file is never
    called damaged."""
    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=resid_post", "layer=1")
    victim = os.path.join(folder, sorted(os.listdir(folder))[0])
    size = os.path.getsize(victim)
    open(victim, "wb").write(bytes(size))  # zeros of the right size: the markers' sizes still match
    ds = open_activations(root)
    for read in (lambda: ds.to_numpy("resid_post", 1), lambda: next(iter(ds.batches("resid_post", 1, 8)))):
        with pytest.raises(ValueError, match=f"{os.path.basename(victim)}: its Parquet footer does not read .*"
                                             f"damaged: run python -m pipeline.verify .* --repair"):
            read()
    ds = open_activations(output.root)
    for where in (pc.field("position") / 0 > 1, pc.multiply_checked(pc.field("color"), 100) > 1000):
        with pytest.raises(ValueError, match=r"where=.*: evaluating it on the tokens of .*failed: "
                                             r"(divide by zero|overflow)$"):
            ds.to_numpy("resid_post", 1, where=where)
    root = copy_output(output, tmp_path / "samples")
    marker = os.path.join(root, "samples", sorted(os.listdir(os.path.join(root, "samples")))[0])
    footer = pq.ParquetFile(marker).metadata
    chunk = footer.row_group(0).column(footer.schema.to_arrow_schema().get_field_index("task_id"))
    data = bytearray(open(marker, "rb").read())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + chunk.total_compressed_size - 3] ^= 0x01
    open(marker, "wb").write(bytes(data))
    ds = open_activations(root)
    for read in (ds.samples, lambda: ds.to_numpy("resid_post", 1, where=pc.field("task_id") == "x")):
        with pytest.raises(ValueError, match=f"{os.path.basename(marker)} \\(a samples file\\): .*CRC.*"
                                             f"pipeline.verify .* --repair"):
            read()


def test_the_system_refusing_a_file_is_not_called_damage(output, monkeypatch):
    """An OSError with an errno (permissions, too many open files) says nothing of the file's bytes: it passes as it
    is, never as "damaged: run pipeline.verify --repair", which would uncommit a healthy shard."""
    from pipeline import dataset as dataset_module

    ds = open_activations(output.root)

    def refused(store, relpath):
        raise PermissionError(13, "Permission denied", store.path(relpath))

    monkeypatch.setattr(dataset_module._LocalStore, "open", refused)
    for read in (lambda: ds.to_numpy("resid_post", 1), ds.samples):
        with pytest.raises(PermissionError, match="Permission denied"):
            read()

    not_damage = [PermissionError(13, "Permission denied", "x"), dataset_module.StorageReadError("gs://b/x: 503"),
                  FileNotFoundError("gs://b/x.parquet"),  # the gs:// store's "gone", without an errno
                  pa.ArrowMemoryError("malloc of size 1 failed"), pa.ArrowNotImplementedError("codec 9")]
    damage = [OSError("Couldn't deserialize thrift: No more data to read."), pa.ArrowInvalid("CRC failed"),
              pa.ArrowIOError("Unexpected end of stream"), ValueError("its 'files' metadata is not JSON")]
    assert [dataset_module.is_file_damage(err) for err in not_damage + damage] == [False] * 5 + [True] * 4


@pytest.mark.parametrize("files", ["[not json", '{"path": "x"}', '[{"path": "x", "hook": "h"}]',
                                   '[{"path": "x", "hook": "h", "layer": true, "rows": 1, "bytes": 1}]'])
def test_a_marker_whose_files_metadata_does_not_decode_is_named(output, tmp_path, files):
    """A commit marker whose `files` metadata is not JSON, or not a list of files with a path, hook, layer, rows and
    bytes: the reader's error names the marker (no bare JSON error, no KeyError), and inspect counts it a problem."""
    from pipeline.inspect import inspect_output

    root = copy_output(output, tmp_path)
    marker = os.path.join(root, "samples", sorted(os.listdir(os.path.join(root, "samples")))[0])
    assert not os.path.exists(os.path.join(root, "manifest.json"))  # read from the commit markers
    table = pq.read_table(marker)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"files": files.encode()}), marker)
    with pytest.raises(ValueError, match=f"{os.path.basename(marker)}: not a readable Parquet commit marker "
                                         r"\(its 'files' metadata is not"):
        open_activations(root)
    problems = [p for p in inspect_output(root)["problems"] if os.path.basename(marker) in p]
    assert len(problems) == 1 and "its 'files' metadata is not" in problems[0], problems


@pytest.mark.parametrize("damage", ["drops_a_file", "lists_an_unknown_file", "files_null", "not_an_object",
                                    "marker_missing"])
def test_a_manifest_that_disagrees_with_the_markers_or_is_malformed_is_refused(output, tmp_path, damage):
    """A manifest that leaves out a file its commit markers list would have its tokens skipped in silence; one of
    the wrong shape, or listing a samples file that is gone, is named with what to do."""
    import json

    from pipeline.manifest import rebuild_manifest

    root = copy_output(output, tmp_path)
    manifest = rebuild_manifest(root)
    files = manifest["files"]
    activation = next(f for f in files if f["kind"] == "activations")
    marker = next(f for f in files if f["kind"] == "samples")
    expected = {
        "drops_a_file": (lambda: files.remove(activation),
                         f"disagrees with the commit markers: the commit markers list {activation['path']}, the "
                         f"manifest does not; rebuild it with python -m pipeline.manifest"),
        "lists_an_unknown_file": (lambda: files.append(dict(activation, path="activations/x.parquet")),
                                  "the manifest lists activations/x.parquet, no commit marker does"),
        "files_null": (lambda: manifest.update(files=None), "manifest.json is not a manifest of this format: its "
                                                            "'files' is null, not a list; rebuild it"),
        "not_an_object": (None, "its top level is a JSON list, not an object"),
        "marker_missing": (lambda: os.remove(os.path.join(root, marker["path"])),
                           f"{marker['path']} is listed by the manifest but missing: the output is damaged; run "
                           f"python -m pipeline.verify"),
    }
    change, message = expected[damage]
    if change is None:
        manifest = [manifest]
    else:
        change()
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(ValueError, match=re.escape(message)):
        open_activations(root)


def test_truncated_or_corrupt_committed_files_are_refused(output, tmp_path):
    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=mlp_out", "layer=0")
    victim = os.path.join(folder, sorted(os.listdir(folder))[1])
    data = open(victim, "rb").read()
    with open(victim, "wb") as handle:
        handle.write(data[:-100])
    with pytest.raises(ValueError, match=f"{os.path.basename(victim)} is {len(data) - 100} bytes.*truncated"):
        open_activations(root)
    with open(victim, "wb") as handle:  # same size, one byte changed
        handle.write(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    open_activations(root)  # sizes match: only a checksum tells
    with pytest.raises(ValueError, match=f"{os.path.basename(victim)}: sha256 .* corrupt"):
        open_activations(root, check_sha256=True)
    os.remove(victim)
    with pytest.raises(ValueError, match=f"{os.path.basename(victim)} is listed by the commit markers but missing"):
        open_activations(root)


def test_a_damaged_page_is_refused_unless_page_checks_are_off(output, tmp_path):
    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=resid_post", "layer=1")
    victim = os.path.join(folder, sorted(os.listdir(folder))[0])
    data = bytearray(open(victim, "rb").read())
    footer = pq.ParquetFile(victim).metadata
    chunk = footer.row_group(0).column(footer.schema.to_arrow_schema().get_field_index(
        output_format.ACTIVATION_COLUMN))
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x40  # a value in the chunk's last page
    open(victim, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"{os.path.basename(victim)}, row group .*CRC.*pipeline.verify"):
        list(open_activations(root).batches("resid_post", 1, 8, readahead=0))
    with pytest.raises(ValueError, match=f"{os.path.basename(victim)}, row group .*CRC.*pipeline.verify"):
        open_activations(root).to_numpy("resid_post", 1, where=pc.field("position") >= 0)  # decoded by pyarrow
    unchecked = open_activations(root, check_pages=False)
    assert sum(len(b) for b in unchecked.batches("resid_post", 1, 8, drop_last=False)) == unchecked.num_tokens(
        "resid_post", 1)  # read, altered: what a trainer gets when nothing checks the pages


def test_shards_that_disagree_on_storage_dtype_are_refused(output, tmp_path, small_row_groups):
    root = copy_output(output, tmp_path)
    write_output(root, shards=1, storage="float32", first=50)
    with pytest.raises(ValueError, match=r"shards disagree on storage_dtype: .*samples/h000-.*'bfloat16', "
                                         r".*samples/h000-.*'float32'"):
        open_activations(root)


def test_the_manifest_lists_what_is_read_once_the_run_finished(output, tmp_path, small_row_groups):
    from pipeline.manifest import rebuild_manifest

    root = copy_output(output, tmp_path)
    rebuild_manifest(root)
    write_output(root, shards=1, first=60)  # committed after the manifest: a later run's, not this one's
    ds = open_activations(root)
    assert ds.source == "manifest"
    assert ds.num_tokens("resid_post", 1) == len(output.truth[("resid_post", 1)])
    os.remove(os.path.join(root, "manifest.json"))
    assert open_activations(root).num_tokens("resid_post", 1) > len(output.truth[("resid_post", 1)])


def test_gcs_output_reads_like_a_local_one(output, gcs_emulator, small_row_groups):
    root = f"{gcs_emulator.root}/dataset/out"
    truth = write_output(root, shards=3)
    ds = open_activations(root)
    assert ds.hooks == ("mlp_out", "resid_post") and ds.num_tokens("mlp_out", 0) == len(truth[("mlp_out", 0)])
    x, columns = ds.to_numpy("mlp_out", 0, with_metadata=True)
    np.testing.assert_array_equal(bits(x), bits(np.stack([truth[("mlp_out", 0)][k] for k in keys_of(columns)])))
    seen = [k for _, cols in ds.batches("mlp_out", 0, 6, drop_last=False, with_metadata=True, buffer_tokens=10)
            for k in keys_of(cols)]
    assert Counter(seen) == Counter(truth[("mlp_out", 0)].keys())
    assert ds.samples().num_rows == 12
    # Over the network two row groups are read ahead by default, from a local disk one.
    assert ds.remote and ds.batches("mlp_out", 0, 6).readahead == 2
    local = open_activations(output.root)
    assert not local.remote and local.batches("resid_post", 1, 6).readahead == 1


def test_gcs_output_through_sliced_reads_and_forked_dataloader_workers(gcs_emulator, small_row_groups, monkeypatch):
    """The same through the emulator with every chunk fetched in slices of 100 bytes, first in this process (its
    sessions and slice threads made), then by two forked DataLoader workers, each with connections of its own."""
    torch = pytest.importorskip("torch")
    from pipeline import dataset as dataset_module

    monkeypatch.setattr(dataset_module._GcsStore, "_SLICE", 100)
    root = f"{gcs_emulator.root}/dataset/sliced"
    truth = write_output(root, shards=2)
    ds = open_activations(root)
    x, columns = ds.to_numpy("mlp_out", 0, with_metadata=True)
    np.testing.assert_array_equal(bits(x), bits(np.stack([truth[("mlp_out", 0)][k] for k in keys_of(columns)])))
    loader = torch.utils.data.DataLoader(ds.torch_iterable("mlp_out", 0, 6, drop_last=False, with_metadata=True,
                                                           buffer_tokens=10), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    seen = []
    for tensor, cols in loader:
        keys = keys_of(cols)
        np.testing.assert_array_equal(tensor.numpy(), np.stack([truth[("mlp_out", 0)][k] for k in keys]).astype(
            np.float32))
        seen += keys
    assert Counter(seen) == Counter(truth[("mlp_out", 0)].keys())


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_gcs_vectors_come_in_one_ranged_read_per_chunk_and_a_damaged_page_is_refused(gcs_emulator, monkeypatch,
                                                                                     small_row_groups, compression):
    """A gs:// output's uncompressed activation chunks are read in one ranged GET each and copied from its pages
    (their CRCs checked here, as for a mapped file); compressed ones are decoded by pyarrow through the object,
    which checks their CRCs. One flipped value is refused either way, naming the object."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from pipeline import dataset as dataset_module

    root = f"{gcs_emulator.root}/dataset/ranged-{compression}"
    truth = write_output(root, shards=2, compression=compression)
    ranges = []
    original = dataset_module._GcsStore.read_range

    def spy(self, relpath, start, size, **options):
        ranges.append((relpath, start, size))
        return original(self, relpath, start, size, **options)

    monkeypatch.setattr(dataset_module._GcsStore, "read_range", spy)
    ds = open_activations(root)
    got = {k: x for x, cols in ds.batches("mlp_out", 0, 5, drop_last=False, with_metadata=True, dtype="bfloat16")
           for k, x in zip(keys_of(cols), x)}
    assert len(ranges) == (len(ds.units("mlp_out", 0)) if compression == "none" else 0)
    # Without the token columns, an uncompressed chunk needs no open object (a metadata request each) either.
    opened, ranges[:] = [], []
    open_object = dataset_module._GcsStore.open
    monkeypatch.setattr(dataset_module._GcsStore, "open",
                        lambda self, relpath: opened.append(relpath) or open_object(self, relpath))
    vectors = np.concatenate(list(ds.batches("mlp_out", 0, 5, drop_last=False, dtype="bfloat16", shuffle=False)))
    assert len(vectors) == len(truth[("mlp_out", 0)])
    if compression == "none":
        assert opened == [] and len(ranges) == len(ds.units("mlp_out", 0))
    else:
        assert len(opened) == len(ds.units("mlp_out", 0)) and ranges == []
    assert got.keys() == truth[("mlp_out", 0)].keys()
    assert all(np.array_equal(bits(got[k]), bits(v)) for k, v in truth[("mlp_out", 0)].items())

    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(gcs_emulator.bucket)
    relpath = ds.files("mlp_out", 0)[0]
    blob = bucket.blob(f"dataset/ranged-{compression}/{relpath}")
    data = bytearray(blob.download_as_bytes())
    footer = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata
    chunk = footer.row_group(0).column(footer.schema.to_arrow_schema().get_field_index(
        output_format.ACTIVATION_COLUMN))
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x40
    blob.upload_from_string(bytes(data))
    with pytest.raises(ValueError, match=f"{os.path.basename(relpath)}, row group 0.*(CRC|checksum).*pipeline.verify"):
        list(open_activations(root).batches("mlp_out", 0, 5, readahead=0, shuffle=False))
    if compression == "none":  # a flipped byte of compressed data may not decode at all
        unchecked = open_activations(root, check_pages=False)
        assert sum(len(b) for b in unchecked.batches("mlp_out", 0, 5, drop_last=False)) == len(
            truth[("mlp_out", 0)])


def test_gcs_ranged_reads_use_scoped_credentials_and_name_the_object_when_refused(monkeypatch):
    """google.auth.default() gives credentials without scopes (service-account keys need them); the ranged read
    scopes them as storage.Client does, and a refusal is a StorageReadError naming the object, not damage."""
    import google.api_core.exceptions
    import google.auth.transport.requests
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    from pipeline import dataset as dataset_module

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    credentials = service_account.Credentials.from_service_account_info(
        {"type": "service_account", "project_id": "p", "private_key_id": "k", "private_key": key,
         "client_email": "reader@p.iam.gserviceaccount.com", "client_id": "1",
         "token_uri": "http://127.0.0.1:9/token"})
    assert credentials.requires_scopes
    used = []

    class Refusing:
        def __init__(self, credentials):
            used.append(credentials)

        def get(self, url, **kwargs):
            raise google.api_core.exceptions.Forbidden("caller does not have storage.objects.get access")

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(google.auth.transport.requests, "AuthorizedSession", Refusing)
    store = dataset_module._GcsStore("gs://bucket/out")
    store._auth = (credentials, "p")
    with pytest.raises(dataset_module.StorageReadError,
                       match=r"gs://bucket/out/activations/x.parquet: reading 100 bytes at offset 4 failed: 403 "
                             r".*check access to the bucket and the network"):
        store.read_range("activations/x.parquet", 4, 100)
    assert used and "https://www.googleapis.com/auth/devstorage.read_only" in used[0].scopes


class _FlakyRangeServer:
    """A GCS media endpoint on 127.0.0.1 serving one object's byte ranges, misbehaving on the first requests as
    `faults` says: "cut" (the connection closes mid-body), "stall" (no byte after the headers), "short" (a complete
    response with fewer bytes than asked: the object is shorter than its footer says), "past_end" (416: the object
    ends before the range starts), "unavailable" (503, which google-cloud-storage retries)."""

    def __init__(self, data: bytes, faults: list[str], keep_alive: bool = False):
        import http.server
        import threading

        outer, self.requests, self.connections = self, 0, set()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_GET(self):
                outer.connections.add(self.client_address)
                first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                body = data[int(first):int(last) + 1]
                fault = faults[outer.requests] if outer.requests < len(faults) else "ok"
                outer.requests += 1
                if fault == "short":
                    body = body[:len(body) // 2]
                if fault in ("past_end", "unavailable"):
                    self.send_response(416 if fault == "past_end" else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self.close_connection = True
                    return
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(body[:len(body) // 3])
                elif fault == "stall":
                    outer.release.wait(30)
                else:
                    self.wfile.write(body)
                self.close_connection = not keep_alive or fault != "ok"

            def log_message(self, *args):
                pass

        self.release = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fault", ["cut", "stall", "short"])
def test_gcs_ranged_read_retries_a_broken_connection_and_refuses_a_short_object(monkeypatch, fault):
    """A ranged read's body goes straight into the buffer (http.client's readinto), bypassing urllib3's error
    handling, so its failures are re-raised as what urllib3 raises: a connection cut or stalled mid-body is retried
    and the read returns the right bytes; a complete but short answer is damage, named, not retried."""
    from pipeline import dataset as dataset_module
    from pipeline import parquet_pages

    data = bytes(np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8))
    server = _FlakyRangeServer(data, [fault])
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
        store = dataset_module._GcsStore("gs://bucket/out")
        monkeypatch.setattr(store, "_TIMEOUT", (5, 0.5))
        if fault == "short":
            with pytest.raises(parquet_pages.DamagedPage,
                               match=r"gs://bucket/out/x.parquet: 1000000 bytes at offset 1000, .*shorter"):
                store.read_range("x.parquet", 1000, 2_000_000)
            assert server.requests == 1
        else:
            got = store.read_range("x.parquet", 1000, 2_000_000)
            assert bytes(got) == data[1000:2_001_000] and server.requests == 2
    finally:
        server.stop()


def test_gcs_slice_past_the_end_of_a_cut_object_is_damage(monkeypatch):
    """An object cut at a slice boundary answers the next slice with 416: the file is damaged (run verify), not an
    access or network failure."""
    from pipeline import dataset as dataset_module
    from pipeline import parquet_pages

    data = bytes(np.random.default_rng(6).integers(0, 256, 300_000, dtype=np.uint8))
    server = _FlakyRangeServer(data, ["past_end"])
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
        store = dataset_module._GcsStore("gs://bucket/out")
        with pytest.raises(parquet_pages.DamagedPage, match=r"gs://bucket/out/x.parquet: no bytes at offset 200000, "
                                                             r"where the footer says 100000 more are: .*shorter"):
            store.read_range("x.parquet", 200_000, 100_000)
        assert server.requests == 1
    finally:
        server.stop()


def test_gcs_outputs_without_credentials_or_network_fail_naming_the_object(monkeypatch, gcs_emulator, output):
    """google-auth's and google-cloud-storage's own failures (no credentials; retries exhausted while listing,
    opening or reading) are StorageReadError naming the object and what to check, never a bare library
    traceback, nor a damaged file."""
    import google.api_core.exceptions
    import google.auth.exceptions
    from google.cloud import storage

    from pipeline import dataset as dataset_module
    from tests.pipeline_output import upload

    def no_credentials(*args, **kwargs):
        raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")

    with monkeypatch.context() as patch:
        patch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        patch.setattr("google.auth.default", no_credentials)
        with pytest.raises(dataset_module.StorageReadError, match=r"gs://bucket/out/manifest.json: looking it up "
                                                                  r"failed: Your default credentials .*gcloud auth"):
            open_activations("gs://bucket/out")
    root = upload(output.root, gcs_emulator, "unreachable")
    ds = open_activations(root)

    def retries_exhausted(*args, **kwargs):
        raise google.api_core.exceptions.RetryError("Timeout of 120.0s exceeded, last exception: refused", None)

    monkeypatch.setattr(storage.fileio.BlobReader, "read", retries_exhausted)
    with pytest.raises(dataset_module.StorageReadError, match=r"/unreachable/samples/.*\.parquet: reading it "
                                                              r"failed: Timeout of 120.0s exceeded"):
        ds.samples()
    monkeypatch.setattr(storage.Blob, "open", retries_exhausted)
    with pytest.raises(dataset_module.StorageReadError, match=r"/unreachable/activations/.*\.parquet: opening it "
                                                              r"failed: Timeout of 120.0s exceeded"):
        ds.to_numpy("resid_post", 1)
    monkeypatch.setattr(storage.Bucket, "list_blobs", retries_exhausted)
    with pytest.raises(dataset_module.StorageReadError, match=r"/unreachable/samples: listing failed"):
        open_activations(root)


def test_gcs_ranged_reads_keep_their_connection(monkeypatch):
    """A body read to its end through http.client gives its connection back to the pool, as urllib3 does: against
    a keep-alive server, consecutive ranged reads of a thread share one connection (no handshake per row group)."""
    from pipeline import dataset as dataset_module

    data = bytes(np.random.default_rng(1).integers(0, 256, 1_000_000, dtype=np.uint8))
    server = _FlakyRangeServer(data, [], keep_alive=True)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
        store = dataset_module._GcsStore("gs://bucket/out")
        for start in range(0, 900_000, 100_000):
            assert bytes(store.read_range("x.parquet", start, 50_000)) == data[start:start + 50_000]
        assert server.requests == 9 and len(server.connections) == 1
    finally:
        server.stop()


def _sliced_store(monkeypatch, data: bytes, slice_bytes: int, fail=lambda start, attempt: None):
    """A _GcsStore whose ranged GETs are answered from `data` in memory; `fail(start, attempt)` may raise instead.
    Returns the store and the log of (start, size, attempt, finished) per GET."""
    import threading
    import time

    from pipeline import dataset as dataset_module

    store = dataset_module._GcsStore("gs://bucket/out")
    monkeypatch.setattr(store, "_SLICE", slice_bytes)
    log, lock = [], threading.Lock()

    def get_range(relpath, start, view):
        with lock:
            attempt = sum(1 for entry in log if entry["start"] == start)
            entry = {"start": start, "size": len(view), "attempt": attempt, "finished": False}
            log.append(entry)
        try:
            time.sleep(0.05 if start % 3 else 0.0)  # slices end out of order
            fail(start, attempt)
            view[:] = data[start:start + len(view)]
        finally:
            entry["finished"] = True

    monkeypatch.setattr(store, "_get_range", get_range)
    return store, log


def test_gcs_ranged_read_comes_in_equal_slices_at_once(monkeypatch):
    """A range longer than _SLICE is fetched as the fewest slices of equal size, several at a time (one HTTP stream
    from GCS is slower than the loader), each into its place in the buffer."""
    data = bytes(np.random.default_rng(2).integers(0, 256, 1_000_000, dtype=np.uint8))
    store, log = _sliced_store(monkeypatch, data, 100_000)
    got = store.read_range("x.parquet", 1234, 950_003)
    assert bytes(got) == data[1234:951_237] and got.readonly
    assert sorted((e["start"], e["size"]) for e in log) == [(1234 + i * 95_001, 95_001) for i in range(9)] + [
        (1234 + 9 * 95_001, 94_994)]
    log.clear()
    assert bytes(store.read_range("x.parquet", 7, 100_000)) == data[7:100_007] and len(log) == 1


def test_gcs_slice_is_retried_alone_and_a_failure_waits_for_every_slice(monkeypatch):
    """A slice that fails with an error google-cloud-storage retries is fetched again by itself; one that fails for
    good raises StorageReadError naming the object, only after every other slice has ended, so no thread writes
    into the buffer after the read returned."""
    import google.api_core.exceptions
    import urllib3.exceptions

    from pipeline import dataset as dataset_module

    data = bytes(np.random.default_rng(3).integers(0, 256, 600_000, dtype=np.uint8))

    def cut_once(start, attempt):
        if start == 200_000 and attempt == 0:
            raise urllib3.exceptions.ProtocolError("connection cut")

    store, log = _sliced_store(monkeypatch, data, 100_000, cut_once)
    assert bytes(store.read_range("x.parquet", 0, 600_000)) == data
    assert Counter(e["start"] for e in log) == {0: 1, 100_000: 1, 200_000: 2, 300_000: 1, 400_000: 1, 500_000: 1}

    def refused(start, attempt):
        if start == 0:
            raise google.api_core.exceptions.Forbidden("caller does not have storage.objects.get access")

    store, log = _sliced_store(monkeypatch, data, 100_000, refused)
    with pytest.raises(dataset_module.StorageReadError,
                       match=r"gs://bucket/out/x.parquet: reading 600000 bytes at offset 0 failed: 403"):
        store.read_range("x.parquet", 0, 600_000)
    assert len(log) == 6 and all(e["finished"] for e in log)


def test_gcs_read_interrupted_while_slices_run_leaves_its_buffer_to_them(monkeypatch):
    """Ctrl-C while slices are still arriving: the read raises at once, and the next read of that thread gets a
    buffer of its own, so a slice finishing late cannot write into the bytes it returns."""
    import concurrent.futures
    import threading

    data = bytes(np.random.default_rng(5).integers(0, 256, 400_000, dtype=np.uint8))
    release = threading.Event()

    def late(start, attempt):
        if start == 0 and attempt == 0:
            release.wait(30)

    store, log = _sliced_store(monkeypatch, data, 100_000, late)
    waited = concurrent.futures.wait

    def interrupted(futures, *args, **kwargs):
        monkeypatch.setattr(concurrent.futures, "wait", waited)
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.read_range("x.parquet", 0, 400_000)
    assert getattr(store._local, "buffer", None) is None
    got = store.read_range("x.parquet", 100_000, 100_000)  # one slice, read on this thread
    release.set()
    store._slicers.shutdown(wait=True)  # the late slice has written its bytes by now
    assert bytes(got) == data[100_000:200_000]


def test_gcs_slices_stop_retrying_once_their_read_is_interrupted(monkeypatch):
    """Ctrl-C while slices are retrying (a network outage): nobody will read what they fetch, so each gives up at its
    next failure instead of backing off and retrying for _RETRY_S."""
    import concurrent.futures
    import time

    import urllib3.exceptions

    data = bytes(np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8))

    def outage(start, attempt):
        raise urllib3.exceptions.ProtocolError("connection refused")

    store, log = _sliced_store(monkeypatch, data, 100_000, outage)
    monkeypatch.setattr(store, "_BACKOFF", (4.0, 4.0, 2.0))  # every back-off waits 0-4 s
    monkeypatch.setattr(store, "_RETRY_S", 10)  # (were the slices not given up, shutdown() below would wait this)
    waited = concurrent.futures.wait

    def interrupted_later(futures, *args, **kwargs):
        monkeypatch.setattr(concurrent.futures, "wait", waited)
        time.sleep(0.3)  # the slices fail and back off meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures, "wait", interrupted_later)
    with pytest.raises(KeyboardInterrupt):
        store.read_range("x.parquet", 0, 300_000)
    interrupted = time.monotonic()
    store._slicers.shutdown(wait=True)
    assert time.monotonic() - interrupted < 2.0
    assert len(log) <= 6 and all(entry["finished"] for entry in log)
    store, log = _sliced_store(monkeypatch, data, 100_000)
    assert bytes(store.read_range("x.parquet", 0, 300_000)) == data  # later reads are not given up


def test_gcs_back_off_is_google_cloud_storages_and_stops_at_the_deadline(monkeypatch):
    """The back-off is ours (so that it can be cut short) but copies DEFAULT_RETRY's delays, and, as DEFAULT_RETRY
    does, no back-off that would end past _RETRY_S is started: the read fails at once, naming the object."""
    import time

    import urllib3.exceptions
    from google.cloud.storage.retry import DEFAULT_RETRY

    from pipeline import dataset as dataset_module

    assert dataset_module._GcsStore._BACKOFF == (DEFAULT_RETRY._initial, DEFAULT_RETRY._maximum,
                                                DEFAULT_RETRY._multiplier)
    data = bytes(300_000)

    def outage(start, attempt):
        raise urllib3.exceptions.ProtocolError("connection refused")

    store, log = _sliced_store(monkeypatch, data, 100_000, outage)
    monkeypatch.setattr(store, "_RETRY_S", 2)
    monkeypatch.setattr(store, "_BACKOFF", (6.0, 6.0, 1.0))  # every back-off draws 0-6 s: most end past 2 s
    started = time.monotonic()
    with pytest.raises(dataset_module.StorageReadError, match=r"gs://bucket/out/x.parquet: reading 300000 bytes at "
                                                              r"offset 0 failed: .*Timeout of 2.0s exceeded"):
        store.read_range("x.parquet", 0, 300_000)  # (a back-off that ends before the deadline is waited, then retried)
    assert time.monotonic() - started < 2.5


def test_reads_after_a_loader_drops_its_pending_ones_are_retried_as_before(gcs_emulator, small_row_groups,
                                                                           monkeypatch):
    """load_state_dict (like close) gives up the reads in flight; the reads that follow get a fresh event and retry
    a transient failure as usual: every token still comes back."""
    import urllib3.exceptions

    from pipeline import dataset as dataset_module

    root = f"{gcs_emulator.root}/dataset/dropped"
    truth = write_output(root, shards=3)
    ds = open_activations(root)
    loader = ds.batches("mlp_out", 0, 6, buffer_tokens=6, readahead=2, drop_last=False)
    next(loader)
    assert loader._pending  # row groups read ahead, given up by the load_state_dict below
    state = ds.batches("mlp_out", 0, 6, buffer_tokens=6, readahead=2, drop_last=False).state_dict()
    original, failed = dataset_module._GcsStore._get_range, set()

    def fails_once(self, relpath, start, view):
        if (relpath, start) not in failed:
            failed.add((relpath, start))
            raise urllib3.exceptions.ProtocolError("connection reset")
        return original(self, relpath, start, view)

    monkeypatch.setattr(dataset_module._GcsStore, "_get_range", fails_once)
    monkeypatch.setattr(dataset_module._GcsStore, "_BACKOFF", (0.05, 0.05, 1.0))
    loader.load_state_dict(state)
    assert sum(len(batch) for batch in loader) == len(truth[("mlp_out", 0)]) and failed


_EXIT_DURING_OUTAGE = """
import concurrent.futures, os, time
from tests.test_dataset import _FlakyRangeServer
server = _FlakyRangeServer(bytes(400_000), ["unavailable"] * 10_000)
os.environ["STORAGE_EMULATOR_HOST"] = server.host
from pipeline import dataset
store = dataset._GcsStore("gs://bucket/out")
store._SLICE, store._RETRY_S = 100_000, 120
reads = concurrent.futures.ThreadPoolExecutor(1)  # as the loader reads ahead
reads.submit(store.read_range, "x.parquet", 0, 400_000)
time.sleep(1.5)
print("leaving", server.requests, flush=True)
"""


def test_the_interpreter_exits_at_once_while_gs_reads_retry():
    """A script that stops (or is interrupted) while its loader's reads are retrying through an outage exits
    within seconds: the interpreter joins the read threads before it exits, and they give up rather than retry for
    _RETRY_S (here 120 s). The server answers 503 to everything, on 127.0.0.1, inside the child."""
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _EXIT_DURING_OUTAGE], capture_output=True, text=True, timeout=100,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    word, requests = done.stdout.split()
    assert word == "leaving" and int(requests) > 0  # the reads were retrying when the script ended
    assert time.monotonic() - started < 20


_CTRL_C_IN_A_WITH_BLOCK = """
import os, signal, sys, threading, time
import urllib3.exceptions
from pipeline import dataset
signal.signal(signal.SIGINT, signal.default_int_handler)
ds = dataset.open_activations(sys.argv[1])
ds.units("mlp_out", 0)  # (its footers are read before the outage)

attempts = []

def outage(self, relpath, start, view):
    attempts.append(start)
    raise urllib3.exceptions.ProtocolError("connection refused")

dataset._GcsStore._get_range, dataset._GcsStore._RETRY_S = outage, 120
def interrupt_once_reads_fail():
    global interrupted
    while not attempts:
        time.sleep(0.01)
    time.sleep(0.5)
    interrupted = time.monotonic()
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt_once_reads_fail, daemon=True).start()
try:
    with ds.batches("mlp_out", 0, 6, readahead=2) as loader:
        next(loader)
except KeyboardInterrupt:
    print(f"closed {time.monotonic() - interrupted:.1f} s after Ctrl-C, {len(attempts)} attempts", flush=True)
"""


def test_ctrl_c_in_a_loader_with_block_during_an_outage_returns_at_once(gcs_emulator, small_row_groups):
    """Ctrl-C while the loader waits for row groups that the network does not deliver: leaving the `with` block
    closes the loader, which waits for its reads in flight; they give up at once instead of retrying for _RETRY_S
    (here 120 s)."""
    root = f"{gcs_emulator.root}/dataset/outage"
    write_output(root, shards=3)
    done = subprocess.run([sys.executable, "-c", _CTRL_C_IN_A_WITH_BLOCK, root], capture_output=True, text=True,
                          timeout=100, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.startswith("closed"), done.stderr[-3000:]
    words = done.stdout.split()
    assert float(words[1]) < 5 and int(words[5]) > 0, done.stdout


def _read_in_child(store, data, queue):
    try:
        queue.put(all(bytes(store.read_range("x.parquet", s, 50_000)) == data[s:s + 50_000]
                      for s in (0, 100_000, 200_000)))
    except BaseException as err:  # reported to the parent, which asserts on it
        queue.put(repr(err))


def test_gcs_store_in_a_forked_child_opens_its_own_connections(monkeypatch):
    """A DataLoader worker is forked with its parent's dataset: its reads must not go through the parent's pooled
    keep-alive connections (two processes on one TCP connection mix their answers)."""
    import multiprocessing

    from pipeline import dataset as dataset_module

    data = bytes(np.random.default_rng(4).integers(0, 256, 300_000, dtype=np.uint8))
    server = _FlakyRangeServer(data, [], keep_alive=True)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
        store = dataset_module._GcsStore("gs://bucket/out")
        assert bytes(store.read_range("x.parquet", 0, 50_000)) == data[:50_000]
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_read_in_child, args=(store, data, queue))
        child.start()
        assert queue.get(timeout=60) is True
        child.join(60)
        assert bytes(store.read_range("x.parquet", 1000, 50_000)) == data[1000:51_000]
        assert server.requests == 5 and len(server.connections) == 2
    finally:
        server.stop()


def test_gcs_ranged_read_goes_straight_into_the_buffer(gcs_emulator, monkeypatch):
    """The body of a ranged read is received by http.client's readinto (one copy); urllib3's readinto, a read into
    a temporary object and a second copy, is not used while urllib3 wraps an http.client response."""
    import urllib3.response
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from pipeline import dataset as dataset_module

    data = bytes(range(256)) * 4096
    storage.Client(project="test", credentials=AnonymousCredentials()).bucket(gcs_emulator.bucket).blob(
        "direct/x.bin").upload_from_string(data)

    def refused(*args, **kwargs):
        raise AssertionError("urllib3's readinto was used")

    monkeypatch.setattr(urllib3.response.HTTPResponse, "readinto", refused)
    store = dataset_module._GcsStore(f"{gcs_emulator.root}/direct")
    assert bytes(store.read_range("x.bin", 5, 300_000)) == data[5:300_005]


def test_torch_iterable_splits_across_dataloader_workers_without_duplicates(output):
    torch = pytest.importorskip("torch")
    ds = open_activations(output.root)
    dataset = ds.torch_iterable("resid_post", 1, 6, drop_last=False, with_metadata=True, buffer_tokens=12)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    seen = []
    for tensor, columns in loader:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape[1] == D_MODEL
        seen += list(zip(columns["sample_id"].tolist(), columns["position"].tolist()))
    assert Counter(seen) == Counter(output.truth[("resid_post", 1)].keys())
    bf16 = next(iter(ds.torch_iterable("resid_post", 1, 6, dtype="bfloat16")))
    assert bf16.dtype == torch.bfloat16


def test_jax_batches_are_placed_with_the_sharding(output):
    jax = pytest.importorskip("jax")
    ds = open_activations(output.root)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    batches = ds.jax_batches("resid_post", 1, 8, sharding=sharding, seed=5, dtype="bfloat16")
    first = next(batches)
    assert isinstance(first, jax.Array) and first.sharding == sharding and first.shape == (8, D_MODEL)
    plain = next(ds.batches("resid_post", 1, 8, seed=5, dtype="bfloat16"))
    np.testing.assert_array_equal(bits(np.asarray(first)), bits(plain))
    state = batches.state_dict()
    assert state["batches"] == 1


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("check_pages", [True, False])
def test_vectors_read_in_place_or_by_pyarrow_are_the_stored_ones(tmp_path, small_row_groups, compression,
                                                                  check_pages):
    """Uncompressed vectors are copied straight from the file's pages (a list of views per row group); compressed
    ones are decoded by pyarrow: the loader, to_numpy and both kinds of read give the same, stored, bits."""
    root = str(tmp_path / "out")
    writer = ShardWriter(root, "h000", "random:tiny", "bfloat16", "bfloat16", activation_compression=compression)
    batch = make_batch(prefix="s0x", lengths=(9, 12, 7), batch_size=3)
    acts = extracted(batch, hooks=HOOKS, seed=3)
    writer.write_shard(batch["batch_id"], batch["samples"], batch["placements"], acts)
    keys = [(s["sample_id"], p) for s in batch["samples"] for p in range(len(s["token_ids"]))]
    truth = dict(zip(keys, acts[("resid_post", 1)].astype(storage_numpy_dtype("bfloat16"))))
    ds = open_activations(root, check_pages=check_pages)
    units = ds.units("resid_post", 1)
    assert len(units) > 1
    every = []
    for unit in units:
        in_place, rows, _ = ds.read_unit(unit, None, False, False, in_place=True)
        copied, _, _ = ds.read_unit(unit, None, False, False)
        assert isinstance(in_place, list) == (compression == "none") and isinstance(copied, np.ndarray)
        pieces = in_place if isinstance(in_place, list) else [in_place]
        np.testing.assert_array_equal(bits(np.concatenate(pieces)), bits(copied))
        every.append(copied)
    np.testing.assert_array_equal(bits(ds.to_numpy("resid_post", 1, dtype="bfloat16")), bits(np.concatenate(every)))
    seen = 0
    for batch_values, cols in ds.batches("resid_post", 1, 5, with_metadata=True, drop_last=False,
                                         dtype="bfloat16"):
        np.testing.assert_array_equal(bits(batch_values), bits(np.stack([truth[k] for k in keys_of(cols)])))
        seen += len(batch_values)
    assert seen == len(truth)


def test_no_flipped_byte_in_a_column_chunk_is_read_as_data(output, tmp_path):
    """Hostile bytes: one byte flipped at seeded places of the activation chunk (page headers, levels and values,
    which the reader's own page walk parses). Each read either fails with the damaged-file error or returns the
    stored vectors: never other values."""
    root = copy_output(output, tmp_path)
    folder = os.path.join(root, "activations", "hook=resid_post", "layer=1")
    victim = os.path.join(folder, sorted(os.listdir(folder))[0])
    intact = open(victim, "rb").read()
    footer = pq.ParquetFile(victim).metadata
    chunk = footer.row_group(0).column(footer.schema.to_arrow_schema().get_field_index(
        output_format.ACTIVATION_COLUMN))
    start, size = chunk.data_page_offset, chunk.total_compressed_size

    def victims_unit(ds):
        return next(u for u in ds.units("resid_post", 1)
                    if u.row_group == 0 and u.file.path.endswith("/" + os.path.basename(victim)))

    clean = open_activations(root)
    expected = clean.read_unit(victims_unit(clean), None, False, False)
    places = sorted({start, start + 1, start + 2, start + 5, start + 9, start + size - 1,
                     *np.random.default_rng(7).integers(start, start + size, 40).tolist()})
    outcomes = Counter()
    for place in places:
        for flip in (0x01, 0x80):
            damaged = bytearray(intact)
            damaged[place] ^= flip
            open(victim, "wb").write(bytes(damaged))
            ds = open_activations(root)
            unit = victims_unit(ds)
            try:
                values, rows, _ = ds.read_unit(unit, None, False, False, in_place=True)
            except ValueError as error:
                assert os.path.basename(victim) in str(error) and "pipeline.verify" in str(error)
                outcomes["refused"] += 1
                continue
            got = np.concatenate(values) if isinstance(values, list) else values
            np.testing.assert_array_equal(bits(got), bits(expected[0]), err_msg=f"byte {place} ^ {flip:#x}")
            outcomes["intact values"] += 1
    open(victim, "wb").write(intact)
    assert outcomes["refused"] > len(places), outcomes  # most flips hit CRC-covered bytes
