"""Read an output back: `open_activations(OUTPUT)` and a shuffled, streaming, resumable batch loader.

    from pipeline.dataset import open_activations
    ds = open_activations("out/arc-agi-1")            # or gs://bucket/prefix
    x = ds.to_numpy("resid_post", 6, where=pc.field("part") == "test_input")
    for batch in ds.batches("resid_post", 6, 4096, seed=0, epochs=None): ...

Only committed files are read: those the manifest lists when a run finished, else those the commit markers (the
samples files' `files` metadata) list while a run is going. Activation files no marker lists (a running or
killed writer's) are skipped and named in `ds.skipped`; a listed file that is missing or whose size differs from
its marker's is refused with an error naming it; `check_sha256=True` also hashes every listed file at open.

Batches come from pipeline.loader (the loader's guarantees and state are described there and in
docs/format.md).

Imports pyarrow, numpy and ml_dtypes only; google-cloud-storage for gs:// outputs; torch and JAX only inside
`torch_iterable` and `jax_batches`.
"""
from __future__ import annotations

import atexit
import contextlib
import concurrent.futures
import concurrent.futures.thread  # before _give_up_reads_at_exit is registered (see there)
import functools
import hashlib
import http.client
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model import dtypes
from model.hooks import BLOCK_HOOKS, FINAL_NORM_HOOK
from pipeline import parquet_pages
from pipeline.loader import DEFAULT_BUFFER_BYTES, ActivationBatches, MappedBatches, torch_dataset_class
from transforms import output_format as fmt

__all__ = ["open_activations", "ActivationDataset", "ActivationBatches", "DEFAULT_BUFFER_BYTES"]

# Column chunks are read through a buffer of this size, page by page, instead of whole: a row group in flight
# then costs its decoded size, not twice that.
_READ_BUFFER = 4 * 1024 * 1024

# The types a `where` expression sees: token columns decoded from their dictionaries, then the joined sample fields.
_TOKEN_SCHEMA = pa.schema([("sample_id", pa.string()), ("position", pa.int32()), ("token_id", pa.int32()),
                           ("part", pa.string()), ("example_index", pa.int16()), ("row", pa.int16()),
                           ("col", pa.int16()), ("color", pa.int8())])
_SAMPLE_SCHEMA = pa.schema([("dataset", pa.string()), ("task_id", pa.string()), ("test_index", pa.int32()),
                            ("augmentation", pa.string()), ("num_tokens", pa.int32())])
_HOOK_ORDER = BLOCK_HOOKS + (FINAL_NORM_HOOK,)


# ------------------------------------------------------------------------------------------- storage

class _LocalStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def __str__(self):
        return self.root

    def path(self, relpath: str) -> str:
        return os.path.join(self.root, *relpath.split("/"))

    def list(self, reldir: str) -> dict[str, int]:
        """relpath -> size of every file under `reldir`."""
        found = {}
        base = self.path(reldir)
        for directory, _, names in os.walk(base):
            for name in names:
                full = os.path.join(directory, name)
                try:
                    size = os.path.getsize(full)
                except FileNotFoundError:  # a running writer renamed or removed it since the listing
                    continue
                found[os.path.relpath(full, self.root).replace(os.sep, "/")] = size
        return found

    def exists(self, relpath: str) -> bool:
        return os.path.isfile(self.path(relpath))

    def open(self, relpath: str):
        # Mapped: pages are read straight from the page cache, without a copy through a read buffer.
        return pa.memory_map(self.path(relpath), "r")

    def read_bytes(self, relpath: str) -> bytes:
        with open(self.path(relpath), "rb") as handle:
            return handle.read()


class StorageReadError(OSError):
    """A file of the output could not be read from its storage (access, network): not damage to the file."""


def is_file_damage(err: BaseException) -> bool:
    """Whether `err`, raised while reading a file of the output, says the file's bytes do not read (a footer or a
    page that does not parse, a CRC that fails), rather than the storage failing (StorageReadError) or the system
    refusing the file (an OSError with an errno: permissions, too many open files), the file being gone (a
    FileNotFoundError, with or without an errno: the gs:// store raises it without one), memory running out, or
    a feature this pyarrow lacks. Metadata that does not decode (a ValueError) is damage. Only damage is worth
    `pipeline.verify --repair`, which uncommits the file's shard."""
    if isinstance(err, (StorageReadError, FileNotFoundError, MemoryError, NotImplementedError)):
        return False
    if isinstance(err, OSError) and err.errno is not None:
        return False
    return isinstance(err, (OSError, pa.ArrowException, ValueError))


def one_line(err: BaseException) -> str:
    """An error's message on one line (Parquet's thrift errors end in a newline, google's span several)."""
    return " ".join(str(err).split())


class _GcsStore:
    """gs://bucket/prefix through google-cloud-storage (honours STORAGE_EMULATOR_HOST). pyarrow's GcsFileSystem
    did not return from reads against the test emulator, and gcsfs pins its own fsspec release."""

    _CHUNK = 16 * 1024 * 1024
    # A ranged read: seconds to connect, seconds without a byte before the read is retried, and seconds of retries.
    _TIMEOUT = (60, 60)
    _RETRY_S = 600
    # google-cloud-storage's back-off between retries (DEFAULT_RETRY's initial, maximum, multiplier); the wait is
    # ours, so that a read given up on stops waiting at once.
    _BACKOFF = (1.0, 60.0, 2.0)
    _READ_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_only",)
    # A row group's range is fetched as slices of at most _SLICE bytes, up to _CONNECTIONS at once per store: one
    # HTTP stream from GCS is slower than the loader, and a failed slice is retried alone. docs/benchmarks.md
    # ("gs:// reads in slices") has the measurements behind the sizes.
    _SLICE = 24 * 1024 * 1024
    _CONNECTIONS = 4

    def __init__(self, root: str):
        bucket, _, prefix = root[len("gs://"):].partition("/")
        if not bucket:
            raise ValueError(f"{root}: a gs:// output needs a bucket, e.g. gs://bucket/prefix")
        self.root, self.bucket_name, self.prefix = root.rstrip("/"), bucket, prefix.strip("/")
        self._reset()

    def __str__(self):
        return self.root

    def __getstate__(self):
        return {"root": self.root, "bucket_name": self.bucket_name, "prefix": self.prefix}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _reset(self) -> None:
        # Clients, sessions (their pooled connections), buffers and slice threads belong to one process: a forked
        # child (e.g. a DataLoader worker) that used its parent's would share TCP connections with it. The lock is
        # new too: a forked copy may be held by a thread the child does not have.
        self._lock, self._local, self._auth, self._slicers = threading.Lock(), threading.local(), None, None
        _GCS_STORES.add(self)

    def _bucket(self):
        # A client per thread: the readahead threads download in parallel.
        bucket = getattr(self._local, "bucket", None)
        if bucket is None:
            from google.cloud import storage

            with self._lock:
                if self._auth is None:
                    # Looked up once per store, shared by the threads' clients.
                    if os.environ.get("STORAGE_EMULATOR_HOST"):
                        from google.auth.credentials import AnonymousCredentials

                        self._auth = (AnonymousCredentials(), "emulator")
                    else:
                        import google.auth

                        self._auth = google.auth.default()
            credentials, project = self._auth
            client = storage.Client(project=project, credentials=credentials)
            bucket = self._local.bucket = client.bucket(self.bucket_name)
        return bucket

    def _name(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    @contextlib.contextmanager
    def _reading(self, relpath: str, what: str):
        """google-cloud-storage's and google-auth's failures (after their own retries) as StorageReadError naming
        the object and what to check."""
        import google.api_core.exceptions
        import google.auth.exceptions

        try:
            yield
        except google.api_core.exceptions.NotFound:
            raise FileNotFoundError(self.path(relpath)) from None
        except (google.api_core.exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as err:
            reason = one_line(err)[:500]
            raise StorageReadError(f"{self.path(relpath)}: {what} failed: {reason}; check the credentials (gcloud "
                                   f"auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS), access to "
                                   f"the bucket and the network, then run again") from err

    def list(self, reldir: str) -> dict[str, int]:
        start = len(self.prefix) + 1 if self.prefix else 0
        with self._reading(reldir, "listing"):
            return {blob.name[start:]: int(blob.size)
                    for blob in self._bucket().list_blobs(prefix=self._name(reldir).rstrip("/") + "/")}

    def exists(self, relpath: str) -> bool:
        with self._reading(relpath, "looking it up"):
            return self._bucket().blob(self._name(relpath)).exists()

    def open(self, relpath: str):
        with self._reading(relpath, "opening it"):
            blob = self._bucket().get_blob(self._name(relpath))
            if blob is None:
                raise FileNotFoundError(self.path(relpath))
            return pa.PythonFile(_ReadingErrors(blob.open("rb", chunk_size=self._CHUNK), self, relpath), mode="r")

    def read_bytes(self, relpath: str) -> bytes:
        with self._reading(relpath, "reading it"):
            return self._bucket().blob(self._name(relpath)).download_as_bytes()

    def read_range(self, relpath: str, start: int, size: int, give_up: threading.Event | None = None) -> memoryview:
        """`size` bytes of the object from `start`, read straight into this thread's buffer by ranged GETs of the
        JSON API's media download: slices of at most _SLICE bytes, up to _CONNECTIONS at once, each retried on the
        errors google-cloud-storage retries, for up to _RETRY_S seconds. The view is valid until this thread's next
        read_range: the loader copies the vectors out first, on the same thread. The bytes are checked by the
        Parquet page CRCs they hold; no whole-object checksum exists for a range. StorageReadError when the read
        fails (access, network, retries exhausted). Slices still retrying give up when the caller is interrupted,
        `give_up` is set (the loader no longer wants the bytes) or the interpreter exits (`_give_up_reads_at_exit`):
        the back-off stops at once, an attempt under way ends first (within _TIMEOUT)."""
        import google.api_core.exceptions
        import google.auth.exceptions

        # Reused: a fresh buffer of a row group's size costs its page faults and zeroing on every read.
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._local.buffer = np.empty(size, np.uint8)
        view = memoryview(buffer)[:size]
        abandoned = threading.Event()
        with _READS_LOCK:
            _READS_IN_FLIGHT.add(abandoned)
            if _EXITING.is_set():
                abandoned.set()
        read = self._retrying(relpath, start, size, (abandoned,) if give_up is None else (abandoned, give_up))
        try:
            if size <= self._SLICE:
                read(relpath, start, view)
            else:
                with self._lock:
                    if self._slicers is None:
                        self._slicers = concurrent.futures.ThreadPoolExecutor(self._CONNECTIONS,
                                                                              thread_name_prefix="gcs-slices")
                step = -(-size // -(-size // self._SLICE))  # as few slices as the limit allows, of equal size
                slices = []
                # Every slice ends before the buffer can be read, reused or left behind by an error.
                try:
                    for offset in range(0, size, step):
                        slices.append(self._slicers.submit(read, relpath, start + offset, view[offset:offset + step]))
                    concurrent.futures.wait(slices)
                except BaseException:  # e.g. KeyboardInterrupt: slices still running write into this buffer
                    abandoned.set()  # nobody will read what they fetch: no more retries
                    for pending in slices:
                        pending.cancel()
                    self._local.buffer = None
                    raise
                for done in slices:
                    done.result()
        except (google.api_core.exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as err:
            raise StorageReadError(f"{self.path(relpath)}: reading {size} bytes at offset {start} failed: {err}; "
                                   f"check access to the bucket and the network, then run again") from err
        return view.toreadonly()

    def _retrying(self, relpath: str, start: int, size: int, stop_events: tuple[threading.Event, ...]):
        """_get_range retried as google-cloud-storage retries a download (its DEFAULT_RETRY: the same errors, the same
        back-off, for up to _RETRY_S seconds, none started past it), except that the back-off watches `stop_events`
        (it waits on the first, this read's own, and looks at the others every _GIVE_UP_POLL_S): once one is set, a
        failure raises StorageReadError instead of waiting and trying again."""
        import google.api_core.exceptions
        from google.api_core.retry import exponential_sleep_generator
        from google.cloud.storage.retry import DEFAULT_RETRY

        # Retry's own sleep, after the back-off below, is made negligible (its minimum must be above 0).
        retry = DEFAULT_RETRY.with_timeout(self._RETRY_S).with_delay(initial=1e-3, maximum=1e-3)

        def get_range(*args):
            delays = exponential_sleep_generator(*self._BACKOFF)  # per slice, as each Retry call has its own
            deadline = time.monotonic() + self._RETRY_S

            def back_off_unless_given_up(err: Exception):
                end = time.monotonic() + next(delays)
                if end > deadline:  # as DEFAULT_RETRY: no back-off that would end past the deadline
                    raise google.api_core.exceptions.RetryError(
                        f"Timeout of {self._RETRY_S:.1f}s exceeded, last exception: {err}", err) from err
                while not any(event.is_set() for event in stop_events):
                    if time.monotonic() >= end:
                        return
                    stop_events[0].wait(min(end - time.monotonic(), _GIVE_UP_POLL_S))
                raise StorageReadError(f"{self.path(relpath)}: reading {size} bytes at offset {start} was given up "
                                       f"(interrupted, no longer wanted, or the interpreter is exiting) after: {err}"
                                       ) from err

            return retry(self._get_range, on_error=back_off_unless_given_up)(*args)

        return get_range

    def _get_range(self, relpath: str, start: int, view: memoryview) -> None:
        # TODO(https://github.com/googleapis/google-resumable-media-python/pull/47, whose review names it):
        # Blob.download_as_bytes moves a download through Python in 8 KiB pieces (Download._write_to_stream); this
        # GET reads the body into one buffer in large reads instead. Drop it when the library reads large ranges in
        # large pieces.
        import google.api_core.exceptions
        import google.auth.credentials
        import urllib3.exceptions
        from google.auth.transport.requests import AuthorizedSession

        size = len(view)
        session = getattr(self._local, "session", None)
        if session is None:
            bucket = self._bucket()  # also looks up the credentials once per store
            # google.auth.default() gives credentials without scopes; storage.Client scopes its own copy.
            credentials = google.auth.credentials.with_scopes_if_required(self._auth[0], self._READ_SCOPES)
            session = self._local.session = AuthorizedSession(credentials)
            self._local.endpoint = bucket.client.api_endpoint.rstrip("/")
        url = (f"{self._local.endpoint}/download/storage/v1/b/{self.bucket_name}/o/"
               f"{quote(self._name(relpath), safe='')}?alt=media")
        with session.get(url, headers={"Range": f"bytes={start}-{start + size - 1}",
                                       "Accept-Encoding": "identity"}, stream=True, timeout=self._TIMEOUT) as response:
            if response.status_code == 404:
                raise FileNotFoundError(self.path(relpath))
            if response.status_code == 416:  # the object ends before `start`
                raise parquet_pages.DamagedPage(f"{self.path(relpath)}: no bytes at offset {start}, where the footer "
                                                f"says {size} more are: the object is shorter than its footer says")
            if response.status_code not in (200, 206):
                raise google.api_core.exceptions.from_http_response(response)
            if response.status_code == 200 and start:
                raise OSError(f"{self.path(relpath)}: the server ignored the byte range")
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding != "identity":
                # Stored with Content-Encoding (e.g. gzip): GCS then serves whole objects, not the footer's ranges.
                raise OSError(f"{self.path(relpath)}: the object is served with Content-Encoding {encoding}; "
                              f"upload the output's files without it (gsutil cp without -z/-Z)")
            got, body = 0, _response_body(response)
            try:
                while got < size:
                    n = body.readinto(view[got:])
                    if not n:
                        break
                    got += n
            except (OSError, http.client.HTTPException) as err:
                # What urllib3 raises for these (its _error_catcher), so that google-cloud-storage retries them; so is
                # a body that ends early, below.
                raise urllib3.exceptions.ProtocolError(f"{self.path(relpath)}: the connection failed after {got} "
                                                       f"of {size} bytes: {err!r}") from err
            if got != size and getattr(body, "length", None):  # bytes the server promised are missing
                raise urllib3.exceptions.ProtocolError(f"{self.path(relpath)}: the connection ended after {got} of "
                                                       f"{size} bytes")
            if body is not response.raw and body.isclosed() and not getattr(body, "length", None):
                # Read to its end: the connection goes back to the pool for the next range, as urllib3 does when it
                # reads a body itself (requests would otherwise close it: a new TCP and TLS handshake per read).
                response.raw.release_conn()
        if got != size:
            raise parquet_pages.DamagedPage(f"{self.path(relpath)}: {got} bytes at offset {start}, where the footer "
                                            f"says {size} are: the object is shorter than its footer says")


class _ReadingErrors:
    """A google-cloud-storage blob reader whose failures are StorageReadError (_GcsStore._reading), for pyarrow."""

    def __init__(self, reader, store: _GcsStore, relpath: str):
        self._reader, self._store, self._relpath = reader, store, relpath

    def read(self, size: int = -1) -> bytes:
        with self._store._reading(self._relpath, "reading it"):
            return self._reader.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._store._reading(self._relpath, "reading it"):
            return self._reader.seek(offset, whence)

    def __getattr__(self, name):  # tell, close, closed, readable, seekable, ...
        return getattr(self._reader, name)


_GCS_STORES: weakref.WeakSet = weakref.WeakSet()
# One event per read_range under way, set to make its slices stop retrying; the lock keeps the exit hook's pass over
# them whole while readahead threads still start reads.
_READS_IN_FLIGHT: weakref.WeakSet = weakref.WeakSet()
_READS_LOCK = threading.Lock()
_EXITING = threading.Event()
_GIVE_UP_POLL_S = 0.25  # how often a back-off looks at the caller's give_up event besides its own


def _give_up_reads_at_exit() -> None:
    """Reads still retrying (say, after Ctrl-C during a network outage) stop at their next failure, so that the
    interpreter, which joins the loader's and the slices' threads before it exits, does not wait out _RETRY_S for
    bytes that nobody will read."""
    with _READS_LOCK:
        _EXITING.set()
        in_flight = list(_READS_IN_FLIGHT)
    for abandoned in in_flight:
        abandoned.set()


# TODO(https://github.com/python/cpython/issues/86128): threading._register_atexit is private; concurrent.futures
# uses it to stop its workers before the interpreter joins them, and no public hook runs that early (atexit's run
# after the join). Hooks run last-registered first, so this one runs before concurrent.futures' own (registered when
# concurrent.futures.thread was imported, above), which waits for its workers.
getattr(threading, "_register_atexit", atexit.register)(_give_up_reads_at_exit)


def _reset_gcs_stores_in_child() -> None:
    global _READS_IN_FLIGHT, _READS_LOCK
    for store in list(_GCS_STORES):
        store._reset()
    # The parent's reads are not the child's to give up (and a parent thread may have held their locks at the fork).
    _READS_IN_FLIGHT, _READS_LOCK = weakref.WeakSet(), threading.Lock()


os.register_at_fork(after_in_child=_reset_gcs_stores_in_child)


def _response_body(response):
    """The body of a streamed `requests` response to read into a buffer: http.client's response itself when urllib3
    wraps one, which receives straight into the buffer, else urllib3's (which reads into a temporary bytes object
    and copies it: three more passes over a row group's bytes and two fresh allocations of its size)."""
    # TODO(https://github.com/urllib3/urllib3/issues/1540): urllib3's HTTPResponse.readinto is read() plus a copy.
    # Read through its public readinto when it wraps http.client's.
    body = getattr(response.raw, "_fp", None)
    return body if isinstance(body, http.client.HTTPResponse) else response.raw


def _store(output: str):
    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"open_activations: output must be a local path or gs:// URL, got {type(output).__name__}")
    output = os.fspath(output)
    if output.startswith("gs://"):
        return _GcsStore(output)
    if "://" in output:
        raise ValueError(f"open_activations: {output!r}: only local paths and gs:// outputs are supported")
    if not os.path.isdir(output):
        raise FileNotFoundError(f"open_activations: {output} is not a directory (an OUTPUT of pipeline.run)")
    return _LocalStore(output)


# -------------------------------------------------------------------------------------------- files

@dataclass(frozen=True)
class _File:
    """One committed activation file, as its commit marker (or the manifest) lists it."""
    path: str
    shard: str
    hook: str
    layer: int
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class _Unit:
    """One row group of one activation file: the loader's unit of work."""
    file: _File
    row_group: int
    rows: int


def _chunk_metadata(footer: pq.FileMetaData, row_group: int, name: str) -> pq.ColumnChunkMetaData:
    return footer.row_group(row_group).column(footer.schema.to_arrow_schema().names.index(name))


def _read_chunk(read: Callable[[int, int], memoryview], footer: pq.FileMetaData, row_group: int, name: str,
                check: bool):
    """(the column chunk's bytes as `read(start, size)` gives them, its pages when `check` (their CRCs checked) or
    None, its metadata)."""
    chunk = _chunk_metadata(footer, row_group, name)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = read(start, chunk.total_compressed_size)
    found = (parquet_pages.check_column_chunk(data, name, start) if check else None)
    return data, found, chunk


def _mapped_chunk(handle: pa.MemoryMappedFile, footer: pq.FileMetaData, row_group: int, name: str, check: bool):
    """_read_chunk of a mapped file: the bytes are a view of the map."""
    def view(start: int, size: int) -> memoryview:
        handle.seek(start)  # read_buffer of a map is a view of it; read_at would copy into bytes
        mapped = handle.read_buffer(size)
        parquet_pages.populate(mapped.address, mapped.size)
        return memoryview(mapped)

    return _read_chunk(view, footer, row_group, name, check)


def open_activations(output: str, *, check_sha256: bool = False, check_pages: bool = True) -> "ActivationDataset":
    """Opens a local or gs:// OUTPUT of `python -m pipeline.run` for reading (see the module docstring).
    check_sha256 hashes every committed file now; check_pages (the default) verifies each Parquet page's CRC as it
    is read, which costs more than decoding itself: pass False to train from an output that `pipeline.verify`
    has already checked (docs/format.md, "Reading with pipeline.dataset")."""
    return ActivationDataset(output, check_sha256=check_sha256, check_pages=check_pages)


class ActivationDataset:
    """The committed activations of one output. Cheap to pickle (DataLoader workers reopen files themselves)."""

    def __init__(self, output: str, *, check_sha256: bool = False, check_pages: bool = True):
        self._store = _store(output)
        self.output = str(self._store)
        self.check_pages = bool(check_pages)
        self._footers: dict[str, pq.FileMetaData] = {}
        self._units: dict[tuple[str, int], list[_Unit]] = {}
        self._sample_fields: pa.Table | None = None
        self._load(check_sha256)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_footers"], state["_units"], state["_sample_fields"] = {}, {}, None
        return state

    # -------------------------------------------------------------------------------- opening

    def _load(self, check_sha256: bool) -> None:
        store = self._store
        manifest = None
        if store.exists(fmt.MANIFEST_NAME):
            manifest = fmt.parse_manifest(store.read_bytes(fmt.MANIFEST_NAME), store.path(fmt.MANIFEST_NAME),
                                          self.output)
        if manifest is not None:
            self.source = "manifest"
            markers = [f["path"] for f in manifest.get("files", []) if f.get("kind") == "samples"]
            entries = [f for f in manifest.get("files", []) if f.get("kind") == "activations"]
        else:
            self.source = "commit markers"
            markers = fmt.marker_paths(store.list(fmt.SAMPLES_DIR))
            entries = None
        # Listed after the markers: a writer renames a shard's activation files into place before it writes the
        # shard's marker, so every file a marker seen here lists is already in this listing.
        listed = store.list(fmt.ACTIVATIONS_DIR)
        metas = fmt.parallel_map(self._marker, markers)
        marked = [dict(entry, shard=meta[fmt.KEY_SHARD]) for meta in metas for entry in meta[fmt.KEY_FILES]]
        if entries is None:
            entries = marked
        else:
            left_out, unknown = fmt.manifest_disagreement(manifest, metas)
            for paths, side, other in ((left_out, "the commit markers list", "the manifest does not"),
                                       (unknown, "the manifest lists", "no commit marker does")):
                if paths:
                    raise ValueError(f"{store.path(fmt.MANIFEST_NAME)} disagrees with the commit markers: {side} "
                                     f"{fmt.shown_paths(paths)}, {other}; rebuild it with python -m pipeline.manifest "
                                     f"{self.output}")
        self._check_shards_agree(metas)
        self.samples_files = tuple(markers)
        files = []
        for entry in entries:
            try:
                file = _File(str(entry["path"]), str(entry["shard"]), str(entry["hook"]), int(entry["layer"]),
                             int(entry["rows"]), int(entry["bytes"]), str(entry["sha256"]))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{self.output}: the {self.source} list an activation file without {err} "
                                 f"({json.dumps(entry)[:200]}); rebuild the manifest or run pipeline.verify") from None
            size = listed.get(file.path)
            if size is None:
                raise ValueError(f"{store.path(file.path)} is listed by the {self.source} but missing: the output "
                                 "is damaged; run python -m pipeline.verify on it")
            if size != file.bytes:
                raise ValueError(f"{store.path(file.path)} is {size} bytes but the {self.source} say {file.bytes}: "
                                 "truncated or rewritten, refused; run python -m pipeline.verify on it")
            files.append(file)
        if check_sha256:
            for file, digest in zip(files, fmt.parallel_map(lambda f: self._sha256(f.path), files)):
                if digest != file.sha256:
                    raise ValueError(f"{store.path(file.path)}: sha256 {digest} differs from the {self.source}' "
                                     f"{file.sha256}: the file is corrupt, refused")
        self._files = sorted(files, key=lambda f: f.path)
        committed = {f.path for f in files}
        self.skipped = tuple(sorted(p for p in listed if p not in committed))
        pairs = {(f.hook, f.layer) for f in files}
        self.hooks = tuple(sorted({h for h, _ in pairs}, key=lambda h: (_HOOK_ORDER + (h,)).index(h)))
        self.layers = tuple(sorted({layer for _, layer in pairs}))
        self._pairs = pairs

    @contextlib.contextmanager
    def _damage_named(self, where: str, reason_in_parentheses: bool = False):
        """A file's bytes that do not read (a page failing its CRC, a footer that does not parse) as a ValueError
        starting with `where` (the file, and what of it), then the reason, and saying how to repair the output. A storage failure
        (StorageReadError) and the system refusing the file (an OSError with an errno: permissions, too many open
        files, gone) pass as they are: the file is not known to be damaged, and --repair would uncommit its shard."""
        try:
            yield
        except (OSError, pa.ArrowException) as err:
            if not is_file_damage(err):
                raise
            reason = one_line(err)
            reason = f" ({reason})" if reason_in_parentheses else f": {reason}"
            raise ValueError(f"{where}{reason}; the file is damaged: run python -m pipeline.verify {self.output} "
                             "--repair") from err

    def _sha256(self, relpath: str) -> str:
        sha = hashlib.sha256()
        with self._store.open(relpath) as handle:
            while chunk := handle.read(8 << 20):
                sha.update(chunk)
        return sha.hexdigest()

    def _marker(self, relpath: str) -> dict:
        try:
            handle = self._store.open(relpath)
        except FileNotFoundError:
            if self.source != "manifest":
                raise
            raise ValueError(f"{self._store.path(relpath)} is listed by the manifest but missing: the output is "
                             f"damaged; run python -m pipeline.verify {self.output}") from None
        with handle:
            try:
                meta = fmt.decode_metadata(pq.read_metadata(handle))
            except StorageReadError:
                raise
            except (pa.ArrowInvalid, OSError, ValueError) as err:
                raise ValueError(f"{self._store.path(relpath)}: not a readable Parquet commit marker "
                                 f"({one_line(err)})") from None
        if fmt.KEY_FILES not in meta or fmt.KEY_SHARD not in meta:
            raise ValueError(f"{self._store.path(relpath)} is not a commit marker of this format (no "
                             f"{fmt.KEY_SHARD!r} / {fmt.KEY_FILES!r} metadata)")
        meta["path"] = relpath
        return meta

    def _check_shards_agree(self, metas: list[dict]) -> None:
        if not metas:
            raise ValueError(f"{self.output} holds no committed shard (no samples file under {fmt.SAMPLES_DIR}/): "
                             "nothing to read yet")
        first = metas[0]
        for key in (fmt.KEY_STORAGE_DTYPE, fmt.KEY_D_MODEL, fmt.KEY_FORMAT_VERSION):
            for meta in metas:
                if meta.get(key) != first.get(key):
                    raise ValueError(
                        f"shards disagree on {key}: {self._store.path(first['path'])} says {first.get(key)!r}, "
                        f"{self._store.path(meta['path'])} says {meta.get(key)!r}; read them as separate outputs")
        version = int(first.get(fmt.KEY_FORMAT_VERSION, 0))
        if version not in fmt.READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{self._store.path(first['path'])}: format_version {version} is not one this reader "
                             f"knows ({fmt.READABLE_FORMAT_VERSIONS})")
        self.format_version = version
        self.storage_dtype = first[fmt.KEY_STORAGE_DTYPE]
        self.d_model = int(first[fmt.KEY_D_MODEL])
        self.compute_dtype = first.get(fmt.KEY_DTYPE)
        self.model = first.get("model")

    # ------------------------------------------------------------------------------- metadata

    def __repr__(self):
        return (f"ActivationDataset({self.output!r}, hooks={self.hooks}, layers={self.layers}, "
                f"d_model={self.d_model}, storage_dtype={self.storage_dtype!r}, from the {self.source})")

    @property
    def remote(self) -> bool:
        """Whether the output is read over the network (gs://) rather than from a local file system."""
        return isinstance(self._store, _GcsStore)

    def check_pair(self, hook: str, layer: int) -> tuple[str, int]:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if (hook, int(layer)) not in self._pairs:
            have = ", ".join(f"{h}@{sorted(l for hh, l in self._pairs if hh == h)}" for h in self.hooks)
            raise ValueError(f"{self.output} has no activations for hook={hook!r} layer={layer}; it has: {have}")
        return hook, int(layer)

    def files(self, hook: str, layer: int) -> list[str]:
        """The committed activation files of a hook and layer (relative paths, sorted)."""
        hook, layer = self.check_pair(hook, layer)
        return [f.path for f in self._files if f.hook == hook and f.layer == layer]

    def num_tokens(self, hook: str, layer: int) -> int:
        hook, layer = self.check_pair(hook, layer)
        return sum(f.rows for f in self._files if f.hook == hook and f.layer == layer)

    def samples(self, columns: list[str] | None = None) -> pa.Table:
        """The samples table of every committed shard (one row per sample), in shard order."""
        def read(relpath):
            with self._damage_named(f"{self._store.path(relpath)} (a samples file)"), \
                    self._store.open(relpath) as handle:
                return pq.read_table(handle, columns=columns, page_checksum_verification=self.check_pages)
        tables = fmt.parallel_map(read, self.samples_files)
        return pa.concat_tables(t.replace_schema_metadata(None) for t in tables)

    def _footer(self, file: _File) -> pq.FileMetaData:
        footer = self._footers.get(file.path)
        if footer is None:
            with self._damage_named(f"{self._store.path(file.path)}: its Parquet footer does not read",
                                    reason_in_parentheses=True):
                with self._store.open(file.path) as handle:
                    footer = pq.read_metadata(handle)
                try:
                    meta = fmt.decode_metadata(footer)
                except ValueError as err:  # metadata that is not the JSON the writer stores
                    raise OSError(f"its key-value metadata does not decode: {err}") from err
            if footer.num_rows != file.rows:
                raise ValueError(f"{self._store.path(file.path)} holds {footer.num_rows} rows but the {self.source} "
                                 f"say {file.rows}: refused; run python -m pipeline.verify on it")
            for key, expected in ((fmt.KEY_STORAGE_DTYPE, self.storage_dtype), (fmt.KEY_D_MODEL, str(self.d_model))):
                if meta.get(key) != expected:
                    raise ValueError(f"{self._store.path(file.path)}: {key}={meta.get(key)!r} but the output's shards "
                                     f"say {expected!r}; read it separately")
            self._footers[file.path] = footer
        return footer

    def units(self, hook: str, layer: int) -> list[_Unit]:
        """Every (file, row group) of a hook and layer, in path then row-group order."""
        hook, layer = self.check_pair(hook, layer)
        key = (hook, layer)
        if key not in self._units:
            files = [f for f in self._files if f.hook == hook and f.layer == layer]
            footers = fmt.parallel_map(self._footer, files)
            self._units[key] = [_Unit(file, g, footer.row_group(g).num_rows)
                                for file, footer in zip(files, footers) for g in range(footer.num_row_groups)
                                if footer.row_group(g).num_rows]
        return self._units[key]

    # ------------------------------------------------------------------------------------ scans

    def check_where(self, where) -> tuple[Any, bool]:
        """Checks `where` against the columns it may name; returns it and whether it needs the sample fields."""
        if where is None:
            return None, False
        if not isinstance(where, pc.Expression):
            raise TypeError(f"where must be a pyarrow.compute expression such as pc.field('part') == 'test_input', "
                            f"got {type(where).__name__}")
        try:
            _TOKEN_SCHEMA.empty_table().filter(where)
            return where, False
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError):
            pass
        joined = pa.schema(list(_TOKEN_SCHEMA) + list(_SAMPLE_SCHEMA))
        try:
            joined.empty_table().filter(where)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as err:
            raise ValueError(f"where={where}: {str(err).splitlines()[0]}; it may use the token columns "
                             f"{', '.join(_TOKEN_SCHEMA.names)} and the sample fields {', '.join(_SAMPLE_SCHEMA.names)}"
                             ) from None
        return where, True

    def _samples_lookup(self) -> pa.Table:
        if self._sample_fields is None:
            self._sample_fields = self.samples(columns=["sample_id"] + _SAMPLE_SCHEMA.names)
        return self._sample_fields

    def read_unit(self, unit: _Unit, where, join: bool, metadata: bool, in_place: bool = False,
                  give_up: threading.Event | None = None
                  ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, dict[str, np.ndarray] | None]:
        """(vectors in the storage dtype, the rows' indices in their row group, token columns or None). With
        in_place the vectors may come as a list of read-only views, one per page, of a memory-mapped file or (gs://)
        of this thread's read buffer, to be copied once by the caller before this thread reads again. Once `give_up`
        is set, a gs:// read failing through an outage raises StorageReadError rather than retrying on."""
        with self._damage_named(f"{self._store.path(unit.file.path)}, row group {unit.row_group}"):
            values, rows, columns = self._read_unit(unit, where, join, metadata, give_up)
        if isinstance(values, list) and not in_place:
            values = np.concatenate(values) if values else np.zeros(
                (0, self.d_model), dtypes.storage_numpy_dtype(self.storage_dtype))
        return values, rows, columns

    def _read_unit(self, unit: _Unit, where, join: bool, metadata: bool, give_up: threading.Event | None):
        footer = self._footer(unit.file)
        ranged = hasattr(self._store, "read_range")
        if ranged and where is None and not metadata and self.format_version == 2:
            # A gs:// object is opened (a metadata request, then reads through pyarrow) only when pyarrow must
            # decode the chunk or read the token columns; the vectors come in one ranged read.
            in_place = self._vectors_in_place(None, footer, unit, give_up)
            if in_place is not None:
                return in_place, np.arange(unit.rows, dtype=np.int64), None
        with self._store.open(unit.file.path) as handle:
            # A memory-mapped file's pages are checked here, faster than pyarrow checks them (pipeline.parquet_pages)
            check_here = self.check_pages and isinstance(handle, pa.MemoryMappedFile)
            reader = pq.ParquetFile(handle, metadata=footer, buffer_size=_READ_BUFFER,
                                    page_checksum_verification=self.check_pages and not check_here)
            rows = np.arange(unit.rows, dtype=np.int64)
            tokens = None
            if check_here and (where is not None or metadata):
                for name in fmt.TOKEN_COLUMNS:
                    _mapped_chunk(handle, footer, unit.row_group, name, check=True)
            in_place = None
            # Local files are mapped; a gs:// object's chunk comes in one ranged read (_GcsStore.read_range), tried
            # above already when the token columns are not needed.
            tried_in_place = ((isinstance(handle, pa.MemoryMappedFile) or (ranged and metadata))
                              and where is None and self.format_version == 2)
            if tried_in_place:  # checks the chunk's pages when check_pages, whatever it returns
                in_place = self._vectors_in_place(handle, footer, unit, give_up)
            if where is not None or metadata:
                tokens = reader.read_row_group(unit.row_group, columns=list(fmt.TOKEN_COLUMNS))
                tokens = pa.table({name: _decoded(tokens.column(name)) for name in fmt.TOKEN_COLUMNS})
                if join:
                    tokens = self._join_samples(tokens, unit)
                if where is not None:
                    try:
                        rows = _matching_rows(tokens, where)
                    except pa.ArrowException as err:  # e.g. an overflow or a division by zero in the expression
                        raise ValueError(f"where={where}: evaluating it on the tokens of "
                                         f"{self._store.path(unit.file.path)}, row group {unit.row_group}, failed: "
                                         f"{str(err).splitlines()[0]}") from None
                    if not len(rows):
                        return np.zeros((0, self.d_model), dtypes.storage_numpy_dtype(self.storage_dtype)), rows, (
                            _columns(tokens.take(rows)) if metadata else None)
                    if len(rows) < unit.rows:
                        tokens = tokens.take(rows)
            if in_place is not None:
                return in_place, rows, (_columns(tokens) if metadata else None)
            if check_here and not tried_in_place:
                _mapped_chunk(handle, footer, unit.row_group, fmt.ACTIVATION_COLUMN, check=True)
            vectors = reader.read_row_group(unit.row_group, columns=[fmt.ACTIVATION_COLUMN])
        column = vectors.column(fmt.ACTIVATION_COLUMN)
        if len(rows) < unit.rows:
            column = column.take(pa.array(rows))
        values = fmt.activations_to_numpy(pa.table({fmt.ACTIVATION_COLUMN: column}).replace_schema_metadata(
            vectors.schema.metadata), dtype=self.storage_dtype if self.format_version == 2 else None)
        if values.shape[1] != self.d_model:
            raise ValueError(f"{self._store.path(unit.file.path)}: vectors of width {values.shape[1]}, but the output's "
                             f"d_model is {self.d_model}")
        return values, rows, (_columns(tokens) if metadata else None)

    def _vectors_in_place(self, handle, footer: pq.FileMetaData, unit: _Unit,
                          give_up: threading.Event | None = None):
        """The unit's vectors as views of the map (or of the chunk read from GCS), one per page
        (parquet_pages.plain_values), their pages checked when check_pages; None when pyarrow must decode them
        (compressed, nulls, another encoding; pyarrow then checks a gs:// object's pages itself)."""
        mapped = isinstance(handle, pa.MemoryMappedFile)
        storage = dtypes.storage_numpy_dtype(self.storage_dtype)
        width = self.d_model * storage.itemsize
        chunk = _chunk_metadata(footer, unit.row_group, fmt.ACTIVATION_COLUMN)
        column = footer.schema.column(footer.schema.to_arrow_schema().names.index(fmt.ACTIVATION_COLUMN))
        if (chunk.compression != "UNCOMPRESSED" or chunk.physical_type != "FIXED_LEN_BYTE_ARRAY"
                or column.length != width):
            if self.check_pages and mapped:
                _mapped_chunk(handle, footer, unit.row_group, fmt.ACTIVATION_COLUMN, check=True)
            return None
        if mapped:
            data, found, _ = _mapped_chunk(handle, footer, unit.row_group, fmt.ACTIVATION_COLUMN, self.check_pages)
        else:
            data, found, _ = _read_chunk(functools.partial(self._store.read_range, unit.file.path, give_up=give_up),
                                         footer, unit.row_group, fmt.ACTIVATION_COLUMN, self.check_pages)
        found = found if found is not None else list(parquet_pages.pages(data))
        views = parquet_pages.plain_values(data, found, width, column.max_definition_level,
                                           column.max_repetition_level)
        if views is None:
            return None
        if sum(len(v) for v in views) != unit.rows:
            raise parquet_pages.DamagedPage(f"column {fmt.ACTIVATION_COLUMN}: its pages hold "
                                            f"{sum(len(v) for v in views)} values, the row group {unit.rows} rows")
        return [v.view(storage) for v in views]

    def _join_samples(self, tokens: pa.Table, unit: _Unit) -> pa.Table:
        lookup = self._samples_lookup()
        index = pc.index_in(tokens.column("sample_id"), value_set=lookup.column("sample_id"))
        if index.null_count:
            raise ValueError(f"{self._store.path(unit.file.path)}: {index.null_count} tokens belong to samples no "
                             "committed samples file holds; run python -m pipeline.verify on the output")
        for name in _SAMPLE_SCHEMA.names:
            tokens = tokens.append_column(name, lookup.column(name).take(index))
        return tokens

    def to_numpy(self, hook: str, layer: int, where=None, dtype=None, *, with_metadata: bool = False):
        """Every committed token's vector of a hook and layer (after `where`), [tokens, d_model], in path then row
        order. dtype None keeps the storage dtype (bfloat16 as ml_dtypes.bfloat16), bit for bit; "float32" widens
        exactly. With with_metadata, also a dict of the token columns (and sample fields where `where` joined
        them) as numpy arrays."""
        where, join = self.check_where(where)
        dtype = dtypes.read_dtype(dtype, self.storage_dtype)
        parts = fmt.parallel_map(lambda unit: self.read_unit(unit, where, join, with_metadata), self.units(hook, layer))
        values = np.concatenate([p[0] for p in parts]) if parts else np.zeros(
            (0, self.d_model), dtypes.storage_numpy_dtype(self.storage_dtype))
        values = dtypes.widen(values, dtype)
        if not with_metadata:
            return values
        return values, {name: np.concatenate([p[2][name] for p in parts]) for name in parts[0][2]} if parts else {}

    # ---------------------------------------------------------------------------------- loaders

    def batches(self, hook: str, layer: int, batch_tokens: int, **options) -> "ActivationBatches":
        """A shuffled, resumable iterator of [batch_tokens, d_model] numpy batches (see ActivationBatches)."""
        return ActivationBatches(self, hook, layer, batch_tokens, **options)

    def torch_iterable(self, hook: str, layer: int, batch_tokens: int, *, pin_memory: bool = False, **options):
        """A torch.utils.data.IterableDataset of [batch_tokens, d_model] tensors, for DataLoader(batch_size=None).
        Each DataLoader worker of each rank takes its own units (rank x num_workers + worker of
        world_size x num_workers), so no token is read twice; pin_memory pins each tensor (needs an accelerator)."""
        return torch_dataset_class()(self, hook, layer, batch_tokens, pin_memory, options)

    def jax_batches(self, hook: str, layer: int, batch_tokens: int, *, sharding=None, **options):
        """ds.batches(...) with each batch placed by jax.device_put(batch, sharding) (default device when None);
        token columns, when asked, stay numpy. state_dict()/load_state_dict() as for batches."""
        import jax

        def put(item):
            if isinstance(item, tuple):
                return jax.device_put(item[0], sharding), item[1]
            return jax.device_put(item, sharding)

        return MappedBatches(self.batches(hook, layer, batch_tokens, **options), put)

    def to_hf_dataset(self, hook: str, layer: int, where=None, **options):
        """A memory-mapped Hugging Face datasets.Dataset of a hook and layer: pipeline.hf_view.to_hf_dataset."""
        from pipeline.hf_view import to_hf_dataset

        return to_hf_dataset(self, hook, layer, where, **options)


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _matching_rows(tokens: pa.Table, where) -> np.ndarray:
    marked = tokens.append_column("__row", pa.array(np.arange(tokens.num_rows, dtype=np.int64)))
    return marked.filter(where).column("__row").to_numpy()


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}
