"""Host shares: split one input between N independent hosts (TPU-VM slices, N preemptible VMs).

Every host reads the whole input and keeps only the records whose id hashes to its own index, so the hosts need
no coordination and together cover every record exactly once. The hash is sha256 of the id's UTF-8 bytes, not
Python's ``hash()``: that one is salted per process (PYTHONHASHSEED), so two hosts would disagree on the split.
Shares are taken by ``record_id`` (one raw task) so that every sample of a task, augmentations included, lands on
the same host; elements that only carry a ``sample_id`` (text corpora) are shared by that.
"""
from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.metrics import NAMESPACE

SHARE_KEYS = ("record_id", "sample_id")


def _check_share(host_index: int, num_hosts: int) -> None:
    for name, value in (("num_hosts", num_hosts), ("host_index", host_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"--{name} must be an int, got {value!r} ({type(value).__name__})")
    if num_hosts < 1:
        raise ValueError(f"--num_hosts must be at least 1, got {num_hosts}")
    if not 0 <= host_index < num_hosts:
        raise ValueError(
            f"--host_index={host_index} is out of range for --num_hosts={num_hosts}: use 0..{num_hosts - 1}")


def share_of(record_id: str, num_hosts: int) -> int:
    """The index of the host that owns ``record_id`` among ``num_hosts`` hosts."""
    if not isinstance(record_id, str):
        raise TypeError(f"a share id must be a str, got {record_id!r} ({type(record_id).__name__})")
    _check_share(0, num_hosts)
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    # 64 bits of a uniform hash modulo a small N: the bias is below 2**-50, far under sampling noise.
    return int.from_bytes(digest[:8], "big") % num_hosts


def host_share(record_id: str, host_index: int, num_hosts: int) -> bool:
    """Whether host ``host_index`` of ``num_hosts`` owns ``record_id``. Stable across processes and machines."""
    _check_share(host_index, num_hosts)
    return share_of(record_id, num_hosts) == host_index


def share_id(element: dict[str, Any]) -> str:
    """The id an element is shared by: its ``record_id``, else its ``sample_id``."""
    if not isinstance(element, dict):
        raise TypeError(
            f"TakeHostShare expects dict elements with a 'record_id' or 'sample_id', got {type(element).__name__}")
    for key in SHARE_KEYS:
        value = element.get(key)
        if isinstance(value, str) and value:
            return value
    # A record without an id cannot be given to exactly one host; failing loudly beats a silent loss or a duplicate.
    raise KeyError(
        f"TakeHostShare: element has no non-empty 'record_id' or 'sample_id' (keys: {sorted(element)[:20]}); "
        "apply it to ArcTask/ArcSample/TextSample dicts (docs/design.md), right after reading.")


class _KeepShare(beam.DoFn):
    def __init__(self, host_index: int, num_hosts: int):
        self._host_index = host_index
        self._num_hosts = num_hosts
        self._kept = Metrics.counter(NAMESPACE, "host_share_kept")
        self._skipped = Metrics.counter(NAMESPACE, "host_share_other_hosts")

    def process(self, element):
        if share_of(share_id(element), self._num_hosts) == self._host_index:
            self._kept.inc()
            yield element
        else:
            self._skipped.inc()


class TakeHostShare(beam.PTransform):
    """Keeps the elements owned by host ``host_index`` of ``num_hosts`` (see :func:`host_share`).

    Counters ``host_share_kept`` and ``host_share_other_hosts`` (namespace ``arc_activations``) say how the input
    split; summed over all hosts, ``host_share_kept`` equals the number of elements read.
    """

    def __init__(self, host_index: int, num_hosts: int, label: str | None = None):
        super().__init__(label)
        _check_share(host_index, num_hosts)
        self.host_index = host_index
        self.num_hosts = num_hosts

    def expand(self, pcoll):
        return pcoll | "KeepShare" >> beam.ParDo(_KeepShare(self.host_index, self.num_hosts))
