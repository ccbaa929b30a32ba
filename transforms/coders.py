"""The coder of extracted batches: pickle, as Beam's default would use for them, with a size estimate that does
not encode.

Beam's Python SDK samples the size of the elements every transform emits (every element at first, then fewer)
and, for a pickling coder, gets it by pickling the element. An extracted batch carries every requested layer's
activations, so each sample copied all of them on the thread that also feeds the device. Here the size comes
from the arrays' byte counts plus the pickled size of the rest.
Encoding and decoding, where a runner does cross a stage boundary with these elements, are plain pickle.

Written against apache-beam 2.77: `CallbackCoderImpl(encoder, decoder, size_estimator)` and the registry lookup
by type hint. On upgrade, check that `coder_impl.CallbackCoderImpl` still takes `size_estimator` and that
`Operation` output counters still size elements through `get_estimated_size_and_observables`.
"""
from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
from apache_beam.coders import coder_impl
from apache_beam.coders.coders import FastCoder

from transforms.elements import ExtractedBatch


class ExtractedBatchHint:
    """Type hint of the PCollection of extracted batches (transforms.elements.ExtractedBatch, a dict at run
    time); it only selects the coder."""


def extracted_batch_size(extracted: ExtractedBatch) -> int:
    """Bytes of the batch pickled: its activation arrays' bytes plus the pickled size of everything else."""
    arrays = sum(np.asarray(values).nbytes for values in extracted["activations"].values())
    arrays += sum(np.asarray(value).nbytes for fields in extracted.get("statistics", {}).values()
                  for value in fields.values())
    rest = {key: value for key, value in extracted.items() if key not in ("activations", "statistics")}
    return arrays + len(pickle.dumps(rest, pickle.HIGHEST_PROTOCOL))


class ExtractedBatchCoder(FastCoder):
    def _create_impl(self):
        return coder_impl.CallbackCoderImpl(
            lambda value: pickle.dumps(value, pickle.HIGHEST_PROTOCOL), pickle.loads, extracted_batch_size)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return ExtractedBatchHint

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


beam.coders.registry.register_coder(ExtractedBatchHint, ExtractedBatchCoder)
