"""The bench's one clock: every measurement path times its work through `Stopwatch`, and the paths that run
batches (ours, the baseline, the host ceiling's source) go through `time_steps`, built on it."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence


class Stopwatch:
    """Accumulates wall seconds over the blocks run under `running()`; `laps` counts them."""

    def __init__(self):
        self.seconds = 0.0
        self.laps = 0

    @contextlib.contextmanager
    def running(self, profile=None):
        with profile or contextlib.nullcontext():
            started = time.perf_counter()
            try:
                yield self
            finally:
                self.seconds += time.perf_counter() - started
                self.laps += 1


def timed(function: Callable[[], Any], profile=None) -> tuple[Any, float]:
    """(function(), its wall seconds)."""
    watch = Stopwatch()
    with watch.running(profile):
        result = function()
    return result, watch.seconds


@dataclasses.dataclass(frozen=True)
class StepTiming:
    first_s: float  # the first batch: tracing and compilation where there are any, one execution, one fetch
    seconds: float  # the timed batches
    steps: int
    tokens_per_batch: int

    @property
    def tok_s(self) -> float:
        return self.tokens_per_batch * self.steps / self.seconds


def one_in_flight(batches: Sequence, dispatch: Callable, collect: Optional[Callable] = None,
                  finish: Optional[Callable] = None) -> None:
    """dispatch(batch) for each batch, collecting the previous batch's result only after the next one is
    dispatched (as transforms/extract.py runs the device), then finish()."""
    pending = None
    for batch in batches:
        out = dispatch(batch)
        if pending is not None and collect is not None:
            collect(pending)
        pending = out
    if pending is not None and collect is not None:
        collect(pending)
    if finish is not None:
        finish()


def time_steps(batches: Sequence, warmup: int, dispatch: Callable, collect: Optional[Callable] = None,
               finish: Optional[Callable] = None, profile=None) -> StepTiming:
    """The first batch alone (`first_s`), then `warmup` untimed batches, then the rest on the clock; each
    group runs `one_in_flight`. `collect` waits for one batch's result, `finish` for everything dispatched."""
    first = Stopwatch()
    with first.running():
        one_in_flight(batches[:1], dispatch, collect, finish)
    one_in_flight(batches[1:1 + warmup], dispatch, collect, finish)
    timed_batches = batches[1 + warmup:]
    clock = Stopwatch()
    with clock.running(profile):
        one_in_flight(timed_batches, dispatch, collect, finish)
    return StepTiming(first.seconds, clock.seconds, len(timed_batches), _tokens(batches[0]))


def _tokens(batch) -> int:
    """Token positions of a (tokens, segment_ids, positions) batch."""
    return int(batch[0].size)
