"""The shuffled, streaming, resumable batch loader behind `ActivationDataset.batches`, and its torch and JAX
adapters (public contract: docs/format.md, "Reading with pipeline.dataset").

The unit of work is one row group of one file. An epoch is a seeded permutation of every (file, row group) of the
hook and layer across the whole output; rank r of w takes the units at positions r, r+w, ... of it, so ranks are
disjoint and together cover every token once. Each rank streams its units into a buffer of `buffer_tokens` and
draws each batch uniformly at random from it (a shuffle buffer at batch granularity).

A vector is copied once into the buffer and once out of it: the buffer's order lives in an index (`_slot`:
position -> row of the vector store), so drawing a batch moves indices, not vectors, and the rows it frees take
the next unit's vectors; `readahead` threads decode the next units and copy them into rows reserved for them.
Vectors move in and out of the store through compiled loops with streaming stores (`pipeline.gather_kernel`).
The iterator's state is explicit (epoch, units consumed, the identity of every buffered token, the random
generator's state), so `load_state_dict` rebuilds the buffer by rereading only the units it came from and yields
exactly the batches that were left. Memory: the store (the buffer plus 1 + `readahead` row groups) and the row
groups being decoded.

Imports numpy and pyarrow only; torch inside `torch_dataset_class`, JAX in the dataset's `jax_batches`.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa

from model import dtypes
from pipeline import gather_kernel

if TYPE_CHECKING:
    from pipeline.dataset import ActivationDataset

__all__ = ["ActivationBatches", "MappedBatches", "DEFAULT_BUFFER_BYTES", "torch_dataset_class"]

# Default shuffle buffer: this many bytes of vectors in the storage dtype (tokens = bytes / (d_model x itemsize)).
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024
# 2: a state may hold a drawn batch not yet yielded (ahead_unit, ahead_row). 1 (never one) still loads.
_STATE_VERSION = 2
_STATE_VERSIONS = (1, 2)
# With epochs=None, this many epochs in a row without a batch (a rank shuffled among several) is refused.
_EMPTY_EPOCHS = 100
# Rows gathered and widened at a time by the numpy path: a tile that stays in the L2 cache between its two passes.
_TILE_ROWS = 256


def _count(name: str, value, minimum: int = 1, allow_none: bool = False, note: str = ""):
    """`value` as an int of at least `minimum` (1 or 0), or None when allowed; a ValueError naming `name` (followed
    by `note`) otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}{note}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class _Drawn(NamedTuple):
    """A batch taken from the buffer: its vectors (or their gather, in flight on the gather thread), the rows of
    the store they occupy until gathered, and the identity of its tokens."""
    vectors: concurrent.futures.Future | np.ndarray
    store: np.ndarray
    columns: dict
    unit: np.ndarray
    row: np.ndarray
    epoch: int


# ---------------------------------------------------------------------------------------- the loader

class ActivationBatches:
    """Iterator of shuffled [batch_tokens, d_model] batches of one hook and layer; `(batch, columns)` with
    with_metadata (columns: dict of numpy arrays, one entry per token of the batch).

    Guarantees: within an epoch every committed token (after `where`) is yielded once across all ranks, ranks are
    disjoint, and the order is a function of (seed, epoch, rank, world_size, the output). Each epoch ends with the
    rank's leftover tokens: fewer than batch_tokens of them, dropped with drop_last=True (the default; so at most
    batch_tokens - 1 per rank and epoch, different ones each epoch) or yielded as one smaller batch. Ranks may
    yield different numbers of batches (their units differ in size): a data-parallel trainer that needs equal
    counts stops at the smallest. epochs=None repeats without end, reshuffling every epoch."""

    def __init__(self, dataset: ActivationDataset, hook: str, layer: int, batch_tokens: int, *, shuffle: bool = True,
                 seed: int = 0, dtype="float32", epochs: int | None = 1, rank: int = 0, world_size: int = 1,
                 where=None, buffer_tokens: int | None = None, with_metadata: bool = False, drop_last: bool = True,
                 readahead: int | None = None):
        self._ds = dataset
        self.hook, self.layer = dataset.check_pair(hook, layer)
        self.batch_tokens = _count("batch_tokens", batch_tokens)
        self.epochs = _count("epochs", epochs, allow_none=True)
        self.world_size = _count("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in 0..{self.world_size - 1} (world_size={world_size}), "
                             f"got {rank!r}")
        self.rank = int(rank)
        self.seed = _count("seed", seed, minimum=0)
        self.shuffle, self.drop_last, self.with_metadata = bool(shuffle), bool(drop_last), bool(with_metadata)
        self.dtype = dtypes.read_dtype(dtype, dataset.storage_dtype)
        self._storage = dtypes.storage_numpy_dtype(dataset.storage_dtype)
        self._bfloat16 = self._storage == dtypes.storage_numpy_dtype("bfloat16")
        if buffer_tokens is None:
            buffer_tokens = max(self.batch_tokens, DEFAULT_BUFFER_BYTES // (dataset.d_model * self._storage.itemsize))
        self.buffer_tokens = _count("buffer_tokens", buffer_tokens)
        if self.shuffle and self.buffer_tokens < self.batch_tokens:
            raise ValueError(f"buffer_tokens={self.buffer_tokens} is smaller than batch_tokens={self.batch_tokens}: "
                             f"the shuffle buffer must hold at least one batch; raise buffer_tokens or leave it out")
        if readahead is None:
            # Over the network a row group takes longer to arrive than to draw from, and the server works only
            # while a request is open: two in flight keep it busy (docs/benchmarks.md, "readahead 2 for gs://").
            readahead = 2 if dataset.remote else 1
        self.readahead = _count("readahead", readahead, minimum=0, note=" (row groups read ahead; 0: none) or None "
                                "(2 for gs://, 1 for a local output)")
        self._where, self._join = dataset.check_where(where)
        self._units = dataset.units(self.hook, self.layer)
        if self.world_size > len(self._units):
            raise ValueError(
                f"world_size={self.world_size} is larger than the {len(self._units)} row groups of "
                f"hook={self.hook} layer={self.layer} in {dataset.output}: some ranks would get no data; use at "
                f"most {len(self._units)} ranks (x DataLoader workers)")
        self._fingerprint = hashlib.sha1(json.dumps(
            [(u.file.path, u.file.sha256, u.row_group, u.rows) for u in self._units]).encode()).hexdigest()
        # The store holds up to buffer_tokens plus the row group being appended and the `readahead` ones being
        # copied in by threads, and (with threads) the batch drawn ahead while the last one is gathered; allocated
        # on first use.
        self._capacity = (self.buffer_tokens if self.shuffle else self.batch_tokens) + (1 + self.readahead) * max(
            u.rows for u in self._units) + (self.batch_tokens if self.readahead else 0)
        self._raw = self._tile = self._slot = self._free = None
        self._free_count = 0
        self._kernel = gather_kernel.load()
        self._columns: dict[str, np.ndarray] = {}
        self._unit_of = np.zeros(0, np.int64)
        self._row_of = np.zeros(0, np.int64)
        self._pool = self._gatherer = None
        self._pending: dict[int, tuple[concurrent.futures.Future, np.ndarray]] = {}  # unit -> (copy, its rows)
        self._give_up = threading.Event()  # set when the reads in flight are no longer wanted
        self._ahead: _Drawn | None = None  # with threads: the next batch, drawn and being gathered
        self._empty_epochs = 0  # epochs in a row that made no batch
        self._reset(epoch=0)
        self._epoch_out = 0

    # ------------------------------------------------------------------------------------ state

    def _reset(self, epoch: int, everything: bool = True) -> None:
        """Starts `epoch` with an empty buffer. Frees every row of the store, or (everything=False, at the end of an
        epoch, while the batch drawn before may still be gathered from its rows) only those of the tokens left in
        the buffer."""
        if self._free is not None and not everything:
            self._release(self._slot[self._head:self._count])
        self._epoch = epoch
        self._cursor = 0          # units of this epoch's order already in the buffer
        self._head = self._count = 0  # buffered tokens are [head, count) of the buffer arrays
        self._batches = 0
        self._done = self.epochs is not None and epoch >= self.epochs
        self._order = self._epoch_order(epoch)
        self._rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size])
        self._cancel_pending()  # before the rows their threads write into are handed out again
        if everything:
            self._drop_ahead()
            if self._free is not None:
                self._free_all()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        everything = (np.random.default_rng([self.seed, epoch]).permutation(len(self._units)) if self.shuffle
                      else np.arange(len(self._units)))
        return everything[self.rank::self.world_size]

    def _config(self) -> dict:
        return {"hook": self.hook, "layer": self.layer, "batch_tokens": self.batch_tokens, "shuffle": self.shuffle,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "where": str(self._where),
                "buffer_tokens": self.buffer_tokens, "with_metadata": self.with_metadata, "epochs": self.epochs,
                "drop_last": self.drop_last, "output": self._fingerprint}

    def state_dict(self) -> dict:
        """Where the iterator stands, as plain Python values only (dicts, lists, ints, strings, bools, None): lists
        naming every buffered token (its unit and row) and the tokens of the batch drawn ahead. Plain values, so
        that it saves with the model's checkpoint by json, torch.save (loaded back by torch.load's default
        weights_only) or orbax, with nothing to unpickle."""
        ahead = self._ahead
        return {"version": _STATE_VERSION, "config": self._config(), "epoch": self._epoch, "cursor": self._cursor,
                "batches": self._batches - (ahead is not None and ahead.epoch == self._epoch), "done": self._done,
                "rng": self._rng.bit_generator.state, "buffer_unit": self._unit_of[self._head:self._count].tolist(),
                "buffer_row": self._row_of[self._head:self._count].tolist(),
                "ahead_unit": ahead.unit.tolist() if ahead else [], "ahead_row": ahead.row.tolist() if ahead else [],
                "ahead_epoch": ahead.epoch if ahead else self._epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continues exactly where `state` was taken: the same remaining batches, in the same order. The iterator
        must be built with the same arguments on the same output; every difference is named (`dtype` and
        `readahead` may differ: they change neither which tokens come nor when; `epochs` may grow, become None, or
        shrink to more than the state's epoch: the batches are then those of the run built with it)."""
        if not isinstance(state, dict) or state.get("version") not in _STATE_VERSIONS:
            raise ValueError(f"not a loader state of version {' or '.join(map(str, _STATE_VERSIONS))}: "
                             f"{str(state)[:200]}")
        mine = self._config()
        for key, value in state["config"].items():
            if key == "epochs" and self._more_epochs_allowed(value, int(state["epoch"])):
                continue
            if mine.get(key) != value:
                what = ("the output's committed files differ from when the state was saved" if key == "output"
                        else f"{key}={value!r} when saved, {mine.get(key)!r} now")
                hint = (f"; or epochs=None or at least {self._fewest_epochs(value, int(state['epoch']))}"
                        if key == "epochs" else "")
                raise ValueError(f"load_state_dict: {what}; build the loader as it was{hint}")
        self._reset(int(state["epoch"]))  # also decides, from this loader's `epochs`, whether it is done
        self._cursor, self._batches = int(state["cursor"]), int(state["batches"])
        self._rng.bit_generator.state = state["rng"]
        buffered = len(state["buffer_unit"])
        units = np.concatenate([np.asarray(state["buffer_unit"], np.int64),
                                np.asarray(state.get("ahead_unit", ()), np.int64)])
        rows = np.concatenate([np.asarray(state["buffer_row"], np.int64),
                               np.asarray(state.get("ahead_row", ()), np.int64)])
        self._ensure_buffer()
        store = self._claim(len(units))
        for unit in np.unique(units):
            wanted = np.flatnonzero(units == unit)
            values, unit_rows, columns = self._ds.read_unit(self._units[int(unit)], self._where, self._join,
                                                            self.with_metadata)
            found = np.searchsorted(unit_rows, rows[wanted])
            if (found >= len(unit_rows)).any() or (unit_rows[np.minimum(found, len(unit_rows) - 1)]
                                                   != rows[wanted]).any():
                raise ValueError(f"load_state_dict: {self._units[unit].file.path} lacks rows the state buffered")
            self._put(store[wanted], values[found])
            for name, column in (columns or {}).items():
                self._column(name, column.dtype)[wanted] = column[found]
        self._unit_of[:len(units)], self._row_of[:len(units)] = units, rows
        self._slot[:len(units)] = store
        self._count = buffered
        if len(units) > buffered:  # the batch that was drawn ahead comes first, as it would have
            ahead = np.arange(buffered, len(units))
            epoch = int(state.get("ahead_epoch", self._epoch))
            self._ahead = _Drawn(self._start_gather(store[ahead]), store[ahead],
                                 {k: v[ahead] for k, v in self._columns.items()}, units[ahead], rows[ahead], epoch)
            self._batches += epoch == self._epoch  # counted when drawn, in its own epoch
        self._epoch_out = self._ahead.epoch if self._ahead is not None else self._epoch

    def _more_epochs_allowed(self, saved, epoch: int) -> bool:
        """Whether a state saved with `epochs=saved`, standing in `epoch`, resumes under this loader's `epochs`: the
        batches of fewer epochs are the first ones of more (each epoch's order depends on the seed and the epoch
        alone), so a run may go on for more epochs (or without end), or stop earlier if it has not reached that
        epoch yet."""
        return self.epochs is None or self.epochs >= self._fewest_epochs(saved, epoch)

    @staticmethod
    def _fewest_epochs(saved, epoch: int) -> int:
        """The fewest `epochs` a state saved with `epochs=saved`, standing in `epoch` (from 0), resumes under."""
        return epoch + 1 if saved is None else min(saved, epoch + 1)

    # -------------------------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def _ensure_buffer(self) -> None:
        if self._raw is None:
            # Every copy goes through unsigned views: numpy moves ml_dtypes.bfloat16 rows element by element.
            self._raw = gather_kernel.empty_aligned((self._capacity, self._ds.d_model), f"u{self._storage.itemsize}")
            self._unit_of = np.empty(self._capacity, np.int64)
            self._row_of = np.empty(self._capacity, np.int64)
            self._slot = np.empty(self._capacity, np.int64)
            self._free = np.empty(self._capacity, np.int64)
            self._free_all()

    def _free_all(self) -> None:
        """Every row of the store free again: a stack popped from the end, so the first unit fills rows 0, 1, ..."""
        self._free[:] = np.arange(self._capacity - 1, -1, -1)
        self._free_count = self._capacity

    def _claim(self, n: int) -> np.ndarray:
        """n free rows of the vector store, ascending (so a unit's vectors are written in address order)."""
        if n > self._free_count:  # the store is sized so that this cannot happen; never hand out a live row
            raise RuntimeError(f"loader store exhausted: {n} rows wanted, {self._free_count} free")
        rows = np.sort(self._free[self._free_count - n:self._free_count])
        self._free_count -= n
        return rows

    def _release(self, rows: np.ndarray) -> None:
        self._free[self._free_count:self._free_count + len(rows)] = rows
        self._free_count += len(rows)

    def _column(self, name: str, dtype) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = np.empty(self._capacity, dtype)
        return self._columns[name]

    def _decode(self, unit: int, give_up: threading.Event):
        return self._ds.read_unit(self._units[unit], self._where, self._join, self.with_metadata, in_place=True,
                                  give_up=give_up)

    def _put(self, store: np.ndarray, values) -> None:
        """Rows `store` of the vector store = values (in the storage dtype; an array, or a list of arrays whose rows
        follow one another, as read_unit gives them in place)."""
        if isinstance(values, list):
            start = 0
            for piece in values:
                self._put(store[start:start + len(piece)], piece)
                start += len(piece)
            return
        values = values.view(self._raw.dtype)
        if self._kernel is not None:
            self._kernel.scatter(self._raw, store, values)
        elif len(store) and store[-1] - store[0] == len(store) - 1:  # contiguous rows: one block copy
            self._raw[store[0]:store[0] + len(store)] = values
        else:
            self._raw[store] = values

    def _cancel_pending(self) -> None:
        futures = [future for future, _ in self._pending.values()]
        if not futures:
            return
        # Reads submitted from now on get a fresh event, even if this wait is interrupted; these ones give up at
        # their next failure (a read retrying through an outage would otherwise hold this wait for minutes).
        give_up, self._give_up = self._give_up, threading.Event()
        give_up.set()
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)  # a running copy must not outlive its rows
        for _, reserved in self._pending.values():
            self._release(reserved)
        self._pending = {}

    def _drop_ahead(self) -> None:
        """Forgets the batch drawn ahead (its gather finished first: it reads rows about to be handed out)."""
        if self._ahead is not None and isinstance(self._ahead.vectors, concurrent.futures.Future):
            concurrent.futures.wait([self._ahead.vectors])
        self._ahead = None

    def _load(self, unit: int, store: np.ndarray, give_up: threading.Event):
        """Decodes `unit` and copies its vectors into rows `store` of the vector store (reserved for it, at least
        as many as the unit has rows); returns (the rows used, row indices in the row group, token columns)."""
        values, rows, columns = self._decode(unit, give_up)
        store = store[:len(rows)]
        self._put(store, values)
        if self.readahead:
            # With several row groups decoding at once Arrow's allocator would keep each one's memory for reuse;
            # handing it back (on this thread, beside the batches being drawn) keeps memory at the store plus the
            # row groups in flight. Alone, the next decode reuses it, which is cheaper.
            del values
            pa.default_memory_pool().release_unused()
        return store, rows, columns

    def _next_unit(self):
        """Loads the unit at the cursor into the store; the next `readahead` units are decoded and copied into rows
        reserved for them by threads meanwhile (numpy and Arrow release the GIL while they copy and decode)."""
        if self.readahead and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.readahead, thread_name_prefix="activations")
        wanted = [int(u) for u in self._order[self._cursor:self._cursor + 1 + self.readahead]]
        unit = wanted[0]
        future, reserved = self._pending.pop(unit, (None, None))
        if future is None:
            reserved = self._claim(self._units[unit].rows)
            # With threads, reads stay on them (a gs:// read keeps a row group's buffer per reading thread).
            future = (self._pool.submit(self._load, unit, reserved, self._give_up) if self._pool is not None
                      else None)
        if self._pool is not None:
            for ahead in wanted[1:]:
                if ahead not in self._pending:
                    reserved_ahead = self._claim(self._units[ahead].rows)
                    self._pending[ahead] = (self._pool.submit(self._load, ahead, reserved_ahead, self._give_up),
                                            reserved_ahead)
        try:
            store, rows, columns = (future.result() if future is not None
                                    else self._load(unit, reserved, self._give_up))
        except BaseException:
            if future is not None and not future.done():  # interrupted while it runs: waited for, or reused, later
                self._pending[unit] = (future, reserved)
            else:  # failed: the next call reads the unit again into fresh rows
                self._release(reserved)
            raise
        self._release(reserved[len(store):])  # rows `where` left unused
        return unit, store, rows, columns

    def _append(self) -> None:
        unit, store, rows, columns = self._next_unit()
        self._cursor += 1
        n = len(rows)
        if self._head:  # FIFO mode: move what is left to the front before appending
            live = slice(self._head, self._count)
            size = self._count - self._head
            for index in (self._slot, self._unit_of, self._row_of, *self._columns.values()):
                index[:size] = index[live]
            self._head, self._count = 0, size
        end = self._count + n
        self._slot[self._count:end] = store
        self._unit_of[self._count:end] = unit
        self._row_of[self._count:end] = rows
        for name, column in (columns or {}).items():
            self._column(name, column.dtype)[self._count:end] = column
        self._count = end

    def _emit(self, n: int) -> _Drawn:
        """Takes the next batch's n tokens out of the buffer; their vectors are gathered from the store (on the
        gather thread, with threads) and their rows freed when the batch is collected (`_collect`)."""
        if not self.shuffle:
            picks = np.arange(self._head, self._head + n)
        else:
            picks = self._rng.choice(self._count, size=n, replace=False)
        store = self._slot[picks]
        drawn = _Drawn(self._start_gather(store), store, {k: v[picks] for k, v in self._columns.items()},
                       self._unit_of[picks], self._row_of[picks], self._epoch)
        if not self.shuffle:
            self._head += n
            if self._head == self._count:
                self._head = self._count = 0
        else:
            # Refill the holes the picks leave below `tail` with the unpicked tokens above it: O(n), not O(buffer).
            tail = self._count - n
            in_tail = picks >= tail
            taken = np.zeros(n, bool)
            taken[picks[in_tail] - tail] = True
            holes, sources = picks[~in_tail], tail + np.flatnonzero(~taken)
            for index in (self._slot, self._unit_of, self._row_of, *self._columns.values()):
                index[holes] = index[sources]
            self._count = tail
        self._batches += 1
        return drawn

    def _start_gather(self, store: np.ndarray):
        """The vectors of rows `store`, in the batch dtype: gathered now, or (with threads) a future of them."""
        if not self.readahead:
            return self._gather(store)
        if self._gatherer is None:
            self._gatherer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="activations-gather")
        return self._gatherer.submit(self._gather, store)

    def _collect(self, drawn: _Drawn):
        """The batch `drawn` as yielded; its rows of the store become free."""
        vectors = drawn.vectors.result() if isinstance(drawn.vectors, concurrent.futures.Future) else drawn.vectors
        self._release(drawn.store)
        self._epoch_out = drawn.epoch
        return (vectors, drawn.columns) if self.with_metadata else vectors

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        if self.dtype == self._storage:
            if self._kernel is not None:
                return self._kernel.gather(self._raw, rows).view(self._storage)
            return np.take(self._raw, rows, axis=0).view(self._storage)
        if self._bfloat16:  # bfloat16 -> float32 is the same bits in the high half of the word: exact
            if self._kernel is not None:
                return self._kernel.gather_widen(self._raw, rows)
            if self._tile is None:
                self._tile = np.empty((_TILE_ROWS, self._ds.d_model), self._raw.dtype)
            return gather_kernel.gather_widen_numpy(self._raw, rows, self._tile)
        return dtypes.widen(np.take(self._raw, rows, axis=0).view(self._storage), self.dtype)

    def _draw(self) -> _Drawn | None:
        """The next batch taken out of the buffer (filling it first), or None when the last epoch is over."""
        while not self._done:
            self._ensure_buffer()
            target = self.buffer_tokens if self.shuffle else self.batch_tokens
            while self._count - self._head < target and self._cursor < len(self._order):
                self._append()
            available = self._count - self._head
            if available >= self.batch_tokens:
                return self._emit(self.batch_tokens)
            if self._cursor < len(self._order):
                continue
            if available and not self.drop_last:
                return self._emit(available)
            self._empty_epochs = self._empty_epochs + 1 if self._batches == 0 else 0
            # A rank reads the same row groups every epoch unless shuffled across several ranks: then one empty
            # epoch means no batch ever; otherwise its share changes per epoch, and only a long run of empty ones
            # says so.
            fixed = self.world_size == 1 or not self.shuffle
            if self.epochs is None and self._empty_epochs >= (1 if fixed else _EMPTY_EPOCHS):
                raise ValueError(
                    f"hook={self.hook} layer={self.layer}: rank {self.rank} of {self.world_size} has "
                    f"{available} token(s) in an epoch{' after where' if self._where is not None else ''}, "
                    f"fewer than batch_tokens={self.batch_tokens}"
                    f"{'' if fixed else f', in each of the last {self._empty_epochs} epochs'}: with epochs=None "
                    f"no batch would ever come; lower batch_tokens or world_size"
                    f"{', or pass drop_last=False' if available else ''}")
            self._reset(self._epoch + 1, everything=False)
        return None

    def __next__(self):
        # With threads, the batch after this one is drawn before this one is collected, so that the gather thread
        # copies it out while the caller works on this one.
        current = self._ahead if self._ahead is not None else self._draw()
        if current is None:
            self._ahead = None
            self.close()
            raise StopIteration
        # Until the next draw succeeds, this batch stays the one drawn ahead: if the draw raises (a failed read, an
        # interrupt), state_dict() still names it and the next call yields it.
        self._ahead = current
        self._ahead = self._draw() if self.readahead else None
        return self._collect(current)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the readahead and gather threads (also done at the end of the last epoch). A batch drawn ahead
        stays in `state_dict()`."""
        self._cancel_pending()
        if self._ahead is not None and isinstance(self._ahead.vectors, concurrent.futures.Future):
            concurrent.futures.wait([self._ahead.vectors])
        for pool in (self._pool, self._gatherer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._gatherer = None

    @property
    def epoch(self) -> int:
        """The epoch of the batch last yielded (before the first: of the next one)."""
        return self._epoch_out


class MappedBatches:
    """An iterator of fn(item) over a loader, keeping the loader's state_dict/load_state_dict."""

    def __init__(self, loader: ActivationBatches, fn):
        self.loader, self._fn = loader, fn

    def __iter__(self):
        return self

    def __next__(self):
        return self._fn(next(self.loader))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


_TORCH_CLASS = None


def _to_torch(torch, values: np.ndarray):
    if values.dtype == dtypes.storage_numpy_dtype("bfloat16"):  # torch does not read ml_dtypes arrays: same bits
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def torch_dataset_class():
    """torch.utils.data.IterableDataset over the loader, built on first use so that importing this module does
    not import torch; published as the module attribute `TorchActivations` so DataLoader workers can unpickle it."""
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        import torch

        class TorchActivations(torch.utils.data.IterableDataset):
            def __init__(self, dataset, hook, layer, batch_tokens, pin_memory, options):
                super().__init__()
                for key in ("rank", "world_size"):
                    options.setdefault(key, {"rank": 0, "world_size": 1}[key])
                self.dataset, self.hook, self.layer, self.batch_tokens = dataset, hook, layer, batch_tokens
                self.pin_memory, self.options = pin_memory, dict(options)
                # Checks the arguments now, in the caller's process, rather than in a worker.
                ActivationBatches(dataset, hook, layer, batch_tokens, **self.options).close()

            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
                options = dict(self.options)
                options["rank"] = options["rank"] * workers + worker
                options["world_size"] = options["world_size"] * workers
                loader = ActivationBatches(self.dataset, self.hook, self.layer, self.batch_tokens, **options)
                try:
                    for item in loader:
                        values, columns = item if isinstance(item, tuple) else (item, None)
                        tensor = _to_torch(torch, values)
                        if self.pin_memory:
                            tensor = tensor.pin_memory()
                        yield (tensor, columns) if columns is not None else tensor
                finally:
                    loader.close()

        TorchActivations.__module__ = __name__
        TorchActivations.__qualname__ = "TorchActivations"
        _TORCH_CLASS = TorchActivations
    return _TORCH_CLASS


def __getattr__(name):
    if name == "TorchActivations":
        return torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
