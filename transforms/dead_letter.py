"""The dead-letter record shared by every transform, and the project's Beam counters.

A rejected record never stops the run and is never dropped silently: the transform that rejects it emits
a dead-letter dict on its ``dead_letter`` tagged output, and the pipeline writes those to
``OUTPUT/dead_letter/``. The record is kept as text, truncated, so one huge bad row cannot blow up the
dead-letter files.

Counters (Beam Metrics, namespace ``arc_activations``):

* ``records_read``     raw records seen by the readers (lines, rows, task entries, task files);
* ``records_valid``    records that passed reading and validation;
* ``records_rejected`` records rejected by the read or validate stage,
  so ``records_read == records_valid + records_rejected`` once the read stage is done;
* ``rejected_<stage>`` one per stage, incremented by :func:`count_rejection` (tokenize, batch, ... too).
"""
from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.metrics import NAMESPACE as COUNTER_NAMESPACE
DEAD_LETTER_TAG = "dead_letter"

RECORDS_READ = "records_read"
RECORDS_VALID = "records_valid"
RECORDS_REJECTED = "records_rejected"

# The stages that make up the reading of raw records; their rejections count towards records_rejected.
READ_STAGES = ("read", "validate")

MAX_RECORD_CHARS = 1000
MAX_REASON_CHARS = 2000


def counter(name: str):
    """A Beam counter in the project's namespace; call inside a DoFn (Beam scopes it to the step)."""
    return Metrics.counter(COUNTER_NAMESPACE, name)


def count_rejection(stage: str) -> None:
    """Counts one rejected record for ``stage``; read-stage rejections also count as records_rejected."""
    counter(f"rejected_{stage}").inc()
    if stage in READ_STAGES:
        counter(RECORDS_REJECTED).inc()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated, {len(text)} chars in all]"


def record_text(record: Any) -> str:
    """The record as JSON text (a str is kept verbatim: it is already the raw line)."""
    if isinstance(record, str):
        return record
    if isinstance(record, (bytes, bytearray)):
        return bytes(record).decode("utf-8", errors="backslashreplace")
    try:
        # default=repr keeps numpy scalars/arrays and other odd values readable instead of failing the
        # very path that reports failures.
        return json.dumps(record, default=repr, ensure_ascii=False)
    except (TypeError, ValueError) as error:  # e.g. circular structures
        return f"<unserialisable record: {error}: {record!r}>"


def dead_letter(source: str, stage: str, reason: str, record: Any) -> dict:
    """The dead-letter dict: ``{"source", "stage", "reason", "record"}``, all str.

    ``source`` says where the record came from (``path:offset``, ``path#key``), ``stage`` which transform
    rejected it (``read``, ``validate``, ``tokenize``, ...), ``reason`` why, and ``record`` the record as JSON
    text truncated to about ``MAX_RECORD_CHARS`` characters.
    """
    return {
        "source": str(source),
        "stage": str(stage),
        "reason": _truncate(str(reason), MAX_REASON_CHARS),
        "record": _truncate(record_text(record), MAX_RECORD_CHARS),
    }


def reject(source: str, stage: str, reason: str, record: Any) -> beam.pvalue.TaggedOutput:
    """For a DoFn: counts the rejection and returns the dead letter on the ``dead_letter`` tagged output."""
    count_rejection(stage)
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter(source, stage, reason, record))
