"""The local runner works through the input in waves, so its memory does not grow with the input.

The in-process runner materialises every PCollection at a GroupByKey (packing needs one) whole, so one graph
over the whole input holds every tokenized sample before the first batch reaches the device. Here the input is
cut into waves of about ``--wave_bytes`` of input (transforms/read_waves.py: consecutive byte ranges, row
groups or files, a pure function of the input's files and sizes), and each wave runs as two small pipelines:

* **front** (read the wave's units -> validate -> expand -> skip committed -> tokenize): its tokenized samples
  stream into a local spill file and its dead letters are written; it runs on a background thread;
* **back** (spill -> batch -> extract -> write shards): the same transforms as the whole-input graph
  (pipeline/run.py build_back), with one model shared by every wave of the process.

What overlaps: the front of wave k+1 runs while the back of wave k extracts and commits. What does not: the back
of wave k+1 starts only after the back of wave k has finished, i.e. after every shard of wave k is committed
(renamed into place, commit marker last). At most two waves are held: one being extracted, one prepared.

Batches are packed within a wave, so shard names are a function of the input and ``--wave_bytes`` (the same
input and wave size give the same names on every run). ``--resume`` skips committed samples by id, whatever
wave they were in. ``--max_tokens`` keeps the samples in input order (file, then byte offset or row, then
chunk) while their tokens add up to at most the budget; the selection is made before committed samples are
dropped, so it does not depend on what a previous attempt wrote, and a larger budget selects a superset.

Spills live under one root per run in the temp dir, removed when the run ends (normally or by an exception); a run
killed outright leaves its root behind, and the next run on the host removes it once its owner process is gone.
"""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import StandardOptions, TestOptions
from apache_beam.utils import shared

from pipeline.beam_compat import local_runner
from pipeline.options import OptionError

_LOG = logging.getLogger("pipeline.waves")
# One loaded model for every wave of this process (a new handle per pipeline would load it again).
WAVE_MODEL = shared.Shared()


def _local(options) -> bool:
    from pipeline.run import LOCAL_RUNNERS

    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def check_wave_options(options, opts, dataset) -> None:
    """Refuses the combinations waves cannot serve, before anything runs."""
    from transforms.read_hub_text import HUB_PARQUET

    hub = getattr(dataset, "file_format", None) == HUB_PARQUET
    if not _local(options) and (opts.max_tokens or hub):
        flag = "--max_tokens" if opts.max_tokens else f"--dataset={opts.dataset}"
        raise OptionError(f"{flag} needs the local runner (it reads in waves); on Dataflow pass a gs:// copy of "
                          "the files you want (text:gs://...) and --max_samples for a smaller run")
    if opts.max_samples and (opts.max_tokens or hub):
        raise OptionError("--max_samples reads a prefix of the records in one pass; with "
                          + ("--max_tokens" if opts.max_tokens else "a text:hf: dataset")
                          + " pass --max_tokens alone to bound the run")


def use_waves(options, opts, dataset) -> bool:
    if not _local(options) or options.view_as(TestOptions).dry_run or opts.max_samples:
        return False
    from transforms.read_hub_text import HUB_PARQUET

    return bool(opts.wave_bytes or opts.max_tokens or dataset.file_format == HUB_PARQUET)


# ------------------------------------------------------------------------------------------------ spill

_ARRAY_KEY = "__ndarray__"


def _to_json(value):
    if isinstance(value, np.ndarray):
        return {_ARRAY_KEY: value.dtype.str, "shape": list(value.shape),
                "data": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a tokenized sample holds a {type(value).__name__}, which the spill cannot store")


def _from_json(item: dict):
    if _ARRAY_KEY in item:
        data = bytearray(base64.b64decode(item["data"]))  # writable, as the tokenizer's arrays were
        return np.frombuffer(data, np.dtype(item[_ARRAY_KEY])).reshape(item["shape"])
    return item


def encode_sample(sample: dict) -> bytes:
    """One tokenized sample as a JSON line (arrays as dtype, shape and base64 bytes): exact, and not pickle."""
    return json.dumps(sample, default=_to_json, separators=(",", ":")).encode() + b"\n"


def decode_sample(line: bytes) -> dict:
    return json.loads(line, object_hook=_from_json)


class _SpillSamples(beam.DoFn):
    """Tokenized samples streamed to a JSON-lines file per bundle (never all held in memory)."""

    def __init__(self, directory: str):
        self._directory = directory

    def start_bundle(self):
        self._handle = None

    def process(self, sample):
        if self._handle is None:
            self._handle = open(os.path.join(self._directory, f"{uuid.uuid4().hex}.jsonl"), "wb")
        self._handle.write(encode_sample(sample))

    def finish_bundle(self):
        if self._handle is not None:
            self._handle.close()


def load_spill(path: str):
    with open(path, "rb") as handle:
        for line in handle:
            yield decode_sample(line)


def write_spill(directory: str, samples) -> list[str]:
    path = os.path.join(directory, "selected.jsonl")
    with open(path, "wb") as handle:
        for sample in samples:
            handle.write(encode_sample(sample))
    return [path]


# A run's spill root is <temp dir>/<prefix><pid>-<random>, holding a marker that names its owner: a run killed
# outright (SIGKILL, the OOM killer) runs no finally, so the next run removes the roots whose owner is gone.
SPILL_PREFIX = "arc-activations-waves-"
SPILL_MARKER = "owner.json"
_SPILL_NAME = re.compile(re.escape(SPILL_PREFIX) + r"(\d+)-[^/]+$")


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (None: no such process, or no /proc), which tells
    a process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Field 22; the command name before it is in parentheses and may hold spaces.
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def make_spill_root(parent: str | None = None) -> str:
    """A new spill root for this process under `parent` (default: the temp dir), with its owner marker."""
    root = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent)
    owner = {"pid": os.getpid(), "host": platform.node(), "started": _process_start(os.getpid())}
    with open(os.path.join(root, SPILL_MARKER), "w") as marker:
        json.dump(owner, marker)
    return root


def _owner_alive(owner: dict) -> bool:
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = _process_start(pid)
    return owner.get("started") is None or started is None or started == owner["started"]


def remove_stale_spill_roots(parent: str | None = None) -> list[str]:
    """Removes the spill roots under `parent` (default: the temp dir) left by runs of this host that died without
    cleaning up; returns their paths. Only folders with this module's name and a matching owner marker count, and
    a root whose owner still runs (or whose marker is not written yet) is kept, so concurrent runs are safe."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in sorted(os.listdir(parent)):
        match, path = _SPILL_NAME.match(name), os.path.join(parent, name)
        if not match or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, SPILL_MARKER)) as marker:
                owner = json.load(marker)
            mine = int(owner["pid"]) == int(match.group(1)) and owner.get("host") == platform.node()
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if mine and not _owner_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        _LOG.info("removed %d spill folder(s) of runs that were killed: %s", len(removed), ", ".join(removed))
    return removed


class _WriteWaveDeadLetters(beam.DoFn):
    def __init__(self, output_root: str, worker_prefix: str, first_index: int):
        self._output_root, self._prefix, self._first = output_root, worker_prefix, first_index

    def process(self, keyed):
        from transforms.write import write_dead_letters

        index, letters = keyed
        yield write_dead_letters(self._output_root, self._prefix, self._first + index, letters)


class WaveDeadLetters(beam.PTransform):
    """Dead letters of one wave in files of their own (numbered after the earlier waves'), content-keyed as
    transforms.write.WriteDeadLetters keys them, so a rerun of the wave writes the same files."""

    def __init__(self, output_root: str, worker_prefix: str, wave: int):
        super().__init__()
        self._output_root, self._prefix, self._wave = output_root, worker_prefix, wave

    def expand(self, letters):
        from transforms.batching import stable_group
        from transforms.write import dead_letter_line

        from transforms.write import DEFAULT_DEAD_LETTER_SHARDS as shards

        first = self._wave * shards
        return (letters
                | "KeyByContent" >> beam.Map(lambda letter: (stable_group(dead_letter_line(letter), shards), letter))
                | "GroupLetters" >> beam.GroupByKey()
                | "WriteFiles" >> beam.ParDo(_WriteWaveDeadLetters(self._output_root, self._prefix, first)))


# ------------------------------------------------------------------------------------------------ budget

_DIGITS = re.compile(r"(\d+)")


def input_order_key(sample_id: str, label_index: dict[str, int]):
    """Where a sample comes in the input: its file (by label), then the numbers of its locator (byte offset or
    row, test index, chunk) compared as numbers."""
    label, _, rest = sample_id.rpartition(":")
    parts = _DIGITS.split(rest)
    return label_index.get(label, len(label_index)), [int(p) if i % 2 else p for i, p in enumerate(parts)]


@dataclasses.dataclass
class Budget:
    """What is left of --max_tokens (None: no budget) as waves are prepared in input order."""
    remaining: int | None
    spent: bool = False

    def select(self, samples: list[dict], label_index: dict[str, int]) -> list[dict]:
        """The prefix (in input order) of one wave's samples that the budget still covers."""
        if self.remaining is None:
            return samples
        chosen = []
        for sample in sorted(samples, key=lambda s: input_order_key(s["sample_id"], label_index)):
            n = len(sample["token_ids"])
            if n > self.remaining:
                self.spent = True
                break
            self.remaining -= n
            chosen.append(sample)
        self.spent = self.spent or self.remaining == 0
        return chosen


# ------------------------------------------------------------------------------------------------ the loop

@dataclasses.dataclass
class PreparedWave:
    index: int
    files: list[str]
    counts: collections.Counter
    samples: int
    seconds: float
    state: object = None


class WaveRun:
    """The state one run's waves share: options, the committed ids, the plan, the budget and the spill folder."""

    def __init__(self, options, plan, committed, identity, spill_root: str):
        from transforms.read_waves import plan_units, plan_waves, unit_bytes
        from transforms.datasets import file_labels

        self.options, self.plan, self.opts = options, plan, plan.opts
        self.committed, self.identity, self.spill_root = frozenset(committed), identity, spill_root
        self.budget = Budget(self.opts.max_tokens)
        self.tokenizer_loaded = threading.Event()
        self.waves = plan_waves(plan_units(plan.dataset, unit_bytes(self.opts.wave_bytes)), self.opts.wave_bytes)
        labels = file_labels(plan.dataset.files) if plan.dataset.files else {}
        self.label_index = {label: i for i, label in enumerate(labels[path] for path in plan.dataset.files)}

    def load_tokenizer(self):
        """The tokenizer, loaded once on the front's thread before the model starts loading on the main one:
        transformers' lazy imports race an import on another thread (ImportError: cannot import name
        'AutoTokenizer'). The model then loads while the first wave is read and tokenized."""
        from transforms.tokenize import cached_tokenizer

        try:
            cached_tokenizer(self.opts.model)
        finally:
            self.tokenizer_loaded.set()

    def load_model(self):
        """Loads the model the backs will share (while the first front reads), and holds it for the run."""
        from pipeline.run import extract_config
        from transforms.extract import _ModelHandle

        config = extract_config(self.opts, self.plan.hooks, self.plan.layers, self.plan.max_new_tokens)
        self.model = WAVE_MODEL.acquire(lambda: _ModelHandle(config), tag=repr(config))

    def _run(self, pipeline) -> tuple[object, dict]:
        from pipeline.run import counters

        result = pipeline.run()
        return result.wait_until_finish(), counters(result)

    def prepare(self, index: int) -> PreparedWave | None:
        """The front of wave `index`: its units read and tokenized into a spill folder (None: input exhausted
        or budget spent)."""
        from pipeline.run import build_front, worker_prefix
        from transforms.read_waves import ReadUnits

        if not self.tokenizer_loaded.is_set():
            self.load_tokenizer()
        units = None if self.budget.spent else next(self.waves, None)
        if units is None:
            return None
        clock, opts = time.perf_counter(), self.opts
        directory = tempfile.mkdtemp(prefix=f"wave{index:05d}-", dir=self.spill_root)
        pipeline = beam.Pipeline(runner=local_runner(self.options), options=self.options)
        # With a budget the selection must not depend on what an earlier attempt committed: skip after it.
        skip = frozenset() if self.budget.remaining is not None else self.committed
        read = ReadUnits(self.plan.dataset, units, max_train_examples=opts.max_train_examples)
        samples, dead = build_front(pipeline, opts, committed=skip, read=read,
                                    max_new_tokens=self.plan.max_new_tokens)
        samples | "Spill" >> beam.ParDo(_SpillSamples(directory))
        dead | "WriteDeadLetters" >> WaveDeadLetters(opts.output, worker_prefix(opts), index)
        state, counts = self._run(pipeline)
        counts = collections.Counter(counts)
        files = sorted(os.path.join(directory, name) for name in os.listdir(directory))
        if self.budget.remaining is not None:
            files, counts = self._apply_budget(directory, files, counts)
        samples_count = counts.get("samples_tokenized", 0)
        return PreparedWave(index, files, counts, samples_count, time.perf_counter() - clock, state)

    def _apply_budget(self, directory: str, files: list[str], counts: collections.Counter):
        wave = [sample for path in files for sample in load_spill(path)]
        chosen = self.budget.select(wave, self.label_index)
        counts["samples_over_budget"] += len(wave) - len(chosen)
        kept = [sample for sample in chosen if sample["sample_id"] not in self.committed]
        counts["samples_already_committed"] += len(chosen) - len(kept)
        for path in files:
            os.remove(path)
        return (write_spill(directory, kept) if kept else []), counts

    def extract(self, wave: PreparedWave) -> tuple[object, dict]:
        """The back of a prepared wave: batches extracted and committed; returns (state, counters)."""
        from pipeline.run import build_back

        pipeline = beam.Pipeline(runner=local_runner(self.options), options=self.options)
        samples = (pipeline | "Spilled" >> beam.Create(wave.files)
                   | "Load" >> beam.FlatMap(load_spill))
        build_back(samples, self.opts, hooks=self.plan.hooks, layers=self.plan.layers, identity=self.identity,
                   shared_handle=WAVE_MODEL, max_new_tokens=self.plan.max_new_tokens)
        return self._run(pipeline)


def run_in_waves(options, plan, committed, identity):
    """Runs the input wave by wave (see the module docstring); returns (final state, summed counters, seconds)."""
    clock = time.perf_counter()
    totals: collections.Counter = collections.Counter()
    state = None
    remove_stale_spill_roots()
    spill_root = make_spill_root()
    try:
        run = WaveRun(options, plan, committed, identity, spill_root)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wave-front") as front:
            pending = front.submit(run.prepare, 0)
            run.tokenizer_loaded.wait()
            run.load_model()
            while pending is not None:
                wave = pending.result()
                if wave is None:
                    break
                totals.update(wave.counts)
                state = wave.state
                # Reading and tokenizing the next wave overlaps this wave's extraction.
                pending = front.submit(run.prepare, wave.index + 1)
                _LOG.info("wave %d: %d samples prepared in %.1f s", wave.index, wave.samples, wave.seconds)
                if wave.files:
                    state, counts = run.extract(wave)
                    totals.update(counts)
                if wave.files:
                    shutil.rmtree(os.path.dirname(wave.files[0]), ignore_errors=True)
    finally:
        shutil.rmtree(spill_root, ignore_errors=True)
    return state, dict(totals), time.perf_counter() - clock
