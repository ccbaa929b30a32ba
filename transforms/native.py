"""Small C loops compiled on the machine that runs them and called through ctypes, for the few per-value passes
numpy cannot fuse (transforms.stats_kernel, pipeline.gather_kernel).

Each kernel is built once per process with the system's C compiler into a private temporary folder, checked
against its numpy twin by its owner, and replaced by that twin when anything fails (no compiler, a failed build or
check) or when the owner's environment switch says "numpy". Results never depend on which path ran.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Sequence, TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K")

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def compile_library(name: str, source: str, flags: Sequence[str]) -> ctypes.CDLL:
    """`source` compiled with `flags` (plus -shared -fPIC) into a library loaded from a private temporary folder,
    which is removed at once (the loaded library stays mapped). OSError when no compiler is found or it fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    folder = tempfile.mkdtemp(prefix=f"arc-activations-{name}-")
    try:
        source_path, library = os.path.join(folder, f"{name}.c"), os.path.join(folder, f"{name}.so")
        with open(source_path, "w") as handle:
            handle.write(source)
        errors = []
        # Built on and for this machine (and process) only, so its own instruction set is safe to use.
        for extra in (["-march=native"], []):
            done = subprocess.run([compiler, *flags, *extra, "-shared", "-fPIC", "-o", library, source_path],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return ctypes.CDLL(library)
            errors.append(done.stderr.strip()[-500:])
        raise OSError(f"{compiler} failed: {errors[-1]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_kernel(name: str, switch: str, build: Callable[[], K], fallback: str) -> K | None:
    """The kernel `build()` makes (compiled and self-checked by it), built once per process; None when the
    environment variable `switch` is "numpy", on a big-endian host, or when building or checking fails (logged
    once, with `fallback` saying what runs instead)."""
    if os.environ.get(switch, "").strip().lower() == "numpy" or sys.byteorder != "little":
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = None
            try:
                _loaded[name] = build()
            except (OSError, ValueError, subprocess.SubprocessError) as error:
                log.warning("%s: %s", fallback, error)
        return _loaded[name]
