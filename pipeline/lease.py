"""One writer per host share at a time: a lease file per (output, host index).

`OUTPUT/_leases/<host>.json` is created atomically before anything under the output is cleaned or written
(local disk: a hard link of a fully written temporary file, which fails when the name exists; gs://: an upload
with the precondition `if_generation_match=0`). The holder rewrites it every `timeout / 4` seconds and deletes it
at the end. A second run on the same share refuses at once and names the holder. A lease whose holder stopped
renewing for longer than its timeout, or whose holder process is gone from this machine (or whose machine has
restarted, as a preempted VM recreated under its name has), is taken over (logged):
local disk renames the stale file away first (only one contender's rename succeeds); gs:// deletes it with a
generation precondition. Different host indices hold different leases and run side by side.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid

_LOG = logging.getLogger("pipeline.lease")

LEASE_DIR = "_leases"
DEFAULT_TIMEOUT_S = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds this host share of the output."""


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ stores

class _LocalStore:
    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)

    def read(self):
        try:
            with open(self.path, "rb") as handle:
                return handle.read(), None
        except FileNotFoundError:
            return None, None

    def replace(self, data: bytes, token) -> bool:
        temp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, self.path)
        return True

    def remove_stale(self, token) -> bool:
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

    def delete(self, token) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _GcsStore:
    """Generation preconditions make create, renew and takeover compare-and-swap operations on GCS."""

    def __init__(self, path: str):
        from google.cloud import storage

        bucket, _, name = path[len("gs://"):].partition("/")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            client = storage.Client()
        self.blob = client.bucket(bucket).blob(name)
        self.path = path

    def _upload(self, data: bytes, generation: int) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
            return True
        except PreconditionFailed:
            return False

    def create(self, data: bytes) -> bool:
        # The precondition alone decides on GCS; the look first also serves stores that ignore preconditions
        # (the test emulator does).
        if self.blob.exists():
            return False
        return self._upload(data, 0)

    def read(self):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.blob.reload()
            generation = self.blob.generation
            return self.blob.download_as_bytes(if_generation_match=generation), generation
        except (NotFound, PreconditionFailed):
            return None, None

    def replace(self, data: bytes, token) -> bool:
        return token is not None and self._upload(data, int(token))

    def remove_stale(self, token) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if token is None:
            return False
        try:
            self.blob.delete(if_generation_match=int(token))
            return True
        except (NotFound, PreconditionFailed):
            return False

    def delete(self, token) -> None:
        self.remove_stale(token)


def exclusive_store(path: str):
    """A small object store with create-if-absent, read, compare-and-replace and delete (local disk or gs://)."""
    return _GcsStore(path) if path.startswith("gs://") else _LocalStore(path)


# ------------------------------------------------------------------------------------------- lease

def lease_path(output_root: str, share: str) -> str:
    return f"{output_root.rstrip('/')}/{LEASE_DIR}/{share}.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def boot_id() -> str | None:
    """This machine's boot id (Linux): a VM recreated under the same name has a new one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def stale_reason(holder: dict, timeout_s: float, now: float | None = None) -> str | None:
    """Why a recorded holder no longer holds its lease, or None while it does."""
    now = time.time() if now is None else now
    if holder.get("hostname") == socket.gethostname():
        if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
            return "its machine has restarted since"
        if isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this machine is gone"
    age = now - float(holder.get("renewed_unix", 0))
    if age > float(holder.get("timeout_s", timeout_s)):
        return f"it was last renewed {age:.0f} s ago, past its {float(holder.get('timeout_s', timeout_s)):.0f} s timeout"
    return None


def describe_holder(holder: dict) -> str:
    age = time.time() - float(holder.get("renewed_unix", 0))
    return (f"host {holder.get('hostname')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last renewed {holder.get('renewed')} ({age:.0f} s ago)")


class Lease:
    """Use as a context manager around everything a run does to its share of the output."""

    def __init__(self, output_root: str, share: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = lease_path(output_root, share)
        self.share = share
        self.timeout_s = float(timeout_s)
        self.run_id = uuid.uuid4().hex
        self.started = _now_iso()
        self.lost: str | None = None
        self._store = exclusive_store(self.path)
        self._token = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({
            "share": self.share, "run_id": self.run_id, "hostname": socket.gethostname(), "pid": os.getpid(),
            "boot_id": boot_id(),
            "started": self.started, "renewed": _now_iso(), "renewed_unix": time.time(),
            "timeout_s": self.timeout_s}, sort_keys=True).encode()

    def _holder(self) -> tuple[dict | None, object]:
        data, token = self._store.read()
        if data is None:
            return None, None
        try:
            holder = json.loads(data)
            return (holder if isinstance(holder, dict) else {}), token
        except ValueError:
            return {}, token  # unreadable: treated as expired (renewed_unix 0)

    def acquire(self) -> "Lease":
        for _ in range(3):
            if self._store.create(self._record()):
                _, self._token = self._store.read()
                self._start_renewing()
                return self
            holder, token = self._holder()
            if holder is None:
                continue  # released between our create and read: try again
            reason = stale_reason(holder, self.timeout_s)
            if reason is None:
                raise LeaseHeld(
                    f"{self.path} is held by another run ({describe_holder(holder)}): one run per host share of an "
                    f"output at a time. Wait for it or stop it; a lease not renewed for {self.timeout_s:.0f} s is "
                    "taken over. Or use another --output (or --host_index for another share).")
            if self._store.remove_stale(token):
                _LOG.warning("took over the lease %s: %s (%s)", self.path, reason, describe_holder(holder))
        raise LeaseHeld(f"{self.path}: could not take the lease; another run is starting on this share. Retry.")

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.share}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.renew()
            except Exception as err:  # a failed renewal is retried at the next interval
                _LOG.warning("could not renew the lease %s: %s", self.path, err)

    def renew(self) -> None:
        holder, token = self._holder()
        if not holder or holder.get("run_id") != self.run_id:
            if self.lost is None:
                self.lost = (f"the lease {self.path} was taken over by "
                             f"{describe_holder(holder) if holder else 'nobody (it was deleted)'}")
                _LOG.error("%s: this run no longer owns its share of the output", self.lost)
            return
        if self._store.replace(self._record(), token):
            _, self._token = self._store.read()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, token = self._holder()
        if holder and holder.get("run_id") == self.run_id:
            self._store.delete(token)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_leases(output_root: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict]:
    """share -> holder of every lease under the output that is not stale."""
    from apache_beam.io.filesystems import FileSystems

    root = output_root.rstrip("/")
    try:
        matches = FileSystems.match([f"{root}/{LEASE_DIR}/*.json"])[0].metadata_list
    except Exception:  # no lease folder yet
        return {}
    live = {}
    for meta in matches:
        share = meta.path.rsplit("/", 1)[-1][:-len(".json")]
        holder, _ = Lease(root, share, timeout_s)._holder()
        if holder and stale_reason(holder, timeout_s) is None:
            live[share] = holder
    return live
