"""pipeline.dataset loader: tokens per second and peak memory over one epoch of a synthetic output.

    python benchmarks/loader_bench.py write /tmp/loader-out --tokens 1400000   # shards written by ShardWriter
    python benchmarks/loader_bench.py read /tmp/loader-out --batch_tokens 4096  # in a fresh process
    python benchmarks/loader_bench.py gcs /tmp/loader-out --batch_tokens 4096   # the same files through a GCS emulator
    python benchmarks/loader_bench.py torch /tmp/loader-out --num_workers 0,2   # through torch DataLoader workers
    python benchmarks/loader_bench.py gcs /tmp/loader-out --transport --rounds 3  # the loader against the store alone

`read` reports the loader's rate (shuffled float32 batches from bfloat16 storage by default) and the process's
peak resident memory over the epoch against its resident memory before the loader started, next to the shuffle
buffer's size, and the rate and CPU per token of each epoch (`epoch_tok_s`, `epoch_us_per_token`: the first also
pays for the loader's memory being touched for the first time, the later ones show the steady rate). The files were
just written, so they are read from the page cache. `gcs` starts gcp-storage-emulator
(in memory, 127.0.0.1, a process of its own, stopped at the end), uploads the output into it once and reads it back
as gs:// with `read` in a fresh process per run, printing one JSON line per run: the rate is the emulator's HTTP
server's as much as the loader's, so `gcs` also reports the emulator's CPU seconds per token. The emulator serves
requests one at a time and copies each requested range out of the object before sending it; `--server zero_copy`
sends the range from the stored object instead (a change to the emulator made in its process by this benchmark,
nothing else), to measure the loader against a server that costs little more than its socket.
`--gcs_slice_mib 0,24 --rounds 3` alternates the most bytes one ranged GET fetches (0: a column chunk in one GET),
`--readahead 1,2` the row groups read ahead. `--reference` measures issue 11's reader reference (read_table plus
decode, `storage_bench.py --reference`, one core) before each read and reports it as `reference_tok_s`: this VM's
speed changes by about 2x between windows minutes apart, and the issue states its targets next to that reference.
`--transport` runs, before each read, `transport`: the loader's ranged reads alone (each row group's activation chunk
through the loader's own `_GcsStore.read_range`, in an epoch's shuffled order, 1 + readahead of them in flight all the
time, the bytes neither checked nor copied), with the emulator's busy share (its CPU seconds per second) per epoch:
the most the emulator and the loopback deliver to a reader that does no work, in the same window as the loader.
`torch` reads the output through `ds.torch_iterable` and a DataLoader with each `--num_workers` count in turn, one
JSON line per run, and times torch's move of one batch into shared memory (how a worker's batch reaches the caller).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE_TOKENS = 20_000


def write(root: str, tokens: int, d_model: int, samples_per_shard: int, compression: str) -> dict:
    import ml_dtypes

    from transforms.elements import Placement
    from transforms.write import ShardWriter

    writer = ShardWriter(root, "h000", "synthetic", "bfloat16", "bfloat16", activation_compression=compression)
    rng = np.random.default_rng(0)
    written = shard = 0
    started = time.perf_counter()
    while written < tokens:
        samples = []
        for i in range(samples_per_shard):
            n = min(SAMPLE_TOKENS, tokens - written - sum(len(s["token_ids"]) for s in samples))
            if n <= 0:
                break
            samples.append({
                "sample_id": f"s{shard}-{i}/t0/a0", "dataset": "synthetic", "task_id": f"s{shard}-{i}",
                "test_index": 0, "augmentation": '{"index": 0}', "prompt": "",
                "token_ids": rng.integers(0, 151_000, n).astype(np.int32),
                "annotations": {"part": np.full(n, 7, np.int8), "example_index": np.full(n, -1, np.int16),
                                "row": np.full(n, -1, np.int16), "col": np.full(n, -1, np.int16),
                                "color": np.full(n, -1, np.int8)}})
        count = sum(len(s["token_ids"]) for s in samples)
        placements = [Placement(i, i, 0, len(s["token_ids"])) for i, s in enumerate(samples)]
        values = rng.standard_normal((count, d_model), np.float32).astype(ml_dtypes.bfloat16)
        writer.write_shard(f"{shard:016x}", samples, placements, {("resid_post", 6): values})
        written += count
        shard += 1
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "activations"))
               for f in fs)
    return {"tokens": written, "shards": shard, "activation_bytes": size, "write_s": time.perf_counter() - started}


def read(root: str, batch_tokens: int, buffer_tokens: int | None, dtype: str, readahead: int | None,
         check_pages: bool = True, epochs: int = 1) -> dict:
    from pipeline.dataset import open_activations

    ds = open_activations(root, check_pages=check_pages)
    before = _rss_bytes()
    loader = ds.batches("resid_post", 6, batch_tokens, dtype=dtype, buffer_tokens=buffer_tokens,
                        drop_last=False, epochs=epochs, **({} if readahead is None else {"readahead": readahead}))
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    tokens = batches = 0
    checksum = 0.0
    # Each epoch's tokens, and the (seconds, CPU seconds) at which it starts. An epoch starts with the call that draws
    # its first batch, filling the shuffle buffer: with readahead that is the call that returns the previous epoch's
    # last batch (it draws the next batch ahead), without it the call that returns the epoch's first batch.
    epoch_tokens, epoch_starts = [], []
    calls = [(0.0, 0.0)]  # (seconds, CPU seconds) at the start of the call that returned the last batch and this one
    iterator = iter(loader)
    while True:
        calls = calls[-1:] + [(time.perf_counter() - started, _cpu_seconds() - cpu_started)]
        try:
            batch = next(iterator)
        except StopIteration:
            break
        while loader.epoch >= len(epoch_starts):  # (an epoch without batches starts where the next one does)
            epoch_starts.append(calls[0] if loader.readahead and batches else calls[1])
            epoch_tokens.append(0)
        epoch_tokens[-1] += len(batch)
        tokens += len(batch)
        batches += 1
        checksum += float(batch[0, 0])
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    while epochs is not None and len(epoch_starts) < epochs:  # trailing epochs without batches
        epoch_starts.append((seconds, cpu))
        epoch_tokens.append(0)
    ends = epoch_starts[1:] + [(seconds, cpu)]
    per_epoch = [(n, s1 - s0, c1 - c0) for n, (s0, c0), (s1, c1) in zip(epoch_tokens, epoch_starts, ends)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    itemsize = 2
    return {"tokens": tokens, "batches": batches, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds),
            "cpu_s": round(cpu, 3), "tok_per_cpu_s": round(tokens / cpu), "load_average": os.getloadavg()[0],
            "buffer_tokens": loader.buffer_tokens, "store_bytes": loader._capacity * ds.d_model * itemsize,
            "check_pages": check_pages, "readahead": loader.readahead, "compiled_gather": loader._kernel is not None,
            "rss_before_loader": before, "rss_peak": peak, "rss_growth": peak - before,
            "num_tokens": ds.num_tokens("resid_post", 6), "row_groups": len(ds.units("resid_post", 6)),
            "epoch_tok_s": [round(n / s) if n and s else 0 for n, s, _ in per_epoch],
            "epoch_us_per_token": [round(c / n * 1e6, 3) if n else None for n, _, c in per_epoch]}


def transport(root: str, readahead: int | None, epochs: int, server_pid: int | None = None) -> dict:
    """The loader's reads without the loader: every row group's activation chunk of a gs:// output, read as the
    loader reads it (`_GcsStore.read_range`, the same slices and connections) by 1 + readahead threads that keep that
    many reads in flight, in each epoch's order of row groups; the bytes are neither checked nor copied. Per epoch:
    tok/s, this process's CPU per token and, given the emulator's pid, its CPU per token and busy share."""
    import concurrent.futures
    import functools

    from pipeline import dataset
    from transforms import output_format as fmt

    ds = dataset.open_activations(root, check_pages=False)
    units = ds.units("resid_post", 6)
    readahead = (2 if ds.remote else 1) if readahead is None else readahead

    def read_unit(unit) -> int:
        read = functools.partial(ds._store.read_range, unit.file.path)
        dataset._read_chunk(read, ds._footer(unit.file), unit.row_group, fmt.ACTIVATION_COLUMN, check=False)
        return unit.rows

    server_cpu = (lambda: _process_cpu_seconds(server_pid)) if server_pid else (lambda: 0.0)
    results = []
    with concurrent.futures.ThreadPoolExecutor(1 + readahead) as pool:
        for epoch in range(epochs):
            order = np.random.default_rng([0, epoch]).permutation(len(units))  # the loader's epoch order, seed 0
            started, cpu_started, server_started = time.perf_counter(), _cpu_seconds(), server_cpu()
            tokens = sum(pool.map(read_unit, [units[i] for i in order]))
            seconds = time.perf_counter() - started
            results.append((tokens, seconds, _cpu_seconds() - cpu_started, server_cpu() - server_started))
    tokens = sum(r[0] for r in results)
    return {"transport": True, "tokens": tokens, "seconds": round(sum(r[1] for r in results), 3),
            "tok_s": round(tokens / sum(r[1] for r in results)), "num_tokens": sum(u.rows for u in units),
            "readahead": readahead,
            "load_average": os.getloadavg()[0],
            "epoch_tok_s": [round(n / s) for n, s, _, _ in results],
            "epoch_us_per_token": [round(c / n * 1e6, 3) for n, _, c, _ in results],
            **({"epoch_server_us_per_token": [round(c / n * 1e6, 3) for n, _, _, c in results],
                "epoch_server_busy": [round(c / s, 2) for _, s, _, c in results]} if server_pid else {})}


_EMULATOR = """
import sys, time
from gcp_storage_emulator.server import create_server
if sys.argv[2] == "zero_copy":
    from gcp_storage_emulator import server as emulator_server
    from gcp_storage_emulator.handlers import objects

    class ObjectsAsViews:
        # objects.download slices what get_file returns and sends the slice; a slice of a memoryview is no copy.
        def __init__(self, storage):
            self.storage = storage

        def __getattr__(self, name):
            return getattr(self.storage, name)

        def get_file(self, *args, **kwargs):
            return memoryview(self.storage.get_file(*args, **kwargs))

    def download(request, response, storage, *args, **kwargs):
        return objects.download(request, response, ObjectsAsViews(storage), *args, **kwargs)

    for _, handlers in emulator_server.HANDLERS:
        for method, handler in handlers.items():
            if handler is objects.download:
                handlers[method] = download
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="loader-bench")
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def reference_rate() -> int:
    """Issue 11's reader reference, measured now: `storage_bench.py --reference` (read_table plus decode of zstd
    bfloat16 activations, tok/s) in a fresh process on one core (the first this one may use; unpinned where taskset
    is missing). This VM's speed changes by about 2x between windows minutes apart; a loader rate next to the
    reference taken just before it says which kind of window it came from (the issue's figure is 790-853k tok/s per
    core)."""
    import shutil
    import subprocess

    # taskset rather than preexec_fn, which is unsafe in a process that already runs threads
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if shutil.which("taskset") else []
    done = subprocess.run([*pin, sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "storage_bench.py"), "--reference"],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the reference failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


def _process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def through_emulator(root: str, reader_args: list[str], server_kind: str = "stock", server_cpu: int | None = None,
                     slices_mib: tuple[float, ...] = (24,), rounds: int = 1,
                     readaheads: tuple[str, ...] = ("default",), reference: bool = False,
                     with_transport: bool = False) -> list[dict]:
    """Uploads the output into one emulator, then reads it back as gs:// once per round, slice size and readahead,
    each read in a fresh `read` process (the cores this one may use), the settings alternating within a round; with
    `with_transport`, a `transport` run in a fresh process just before each read, with the same settings."""
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port), server_kind], stdout=subprocess.PIPE,
                              text=True)
    if server_cpu is not None:  # e.g. the loader under `taskset -c 0`, the emulator on core 1
        os.sched_setaffinity(server.pid, {server_cpu})
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the storage emulator did not start")
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        bucket = storage.Client(project="bench", credentials=AnonymousCredentials()).bucket("loader-bench")
        started = time.perf_counter()
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                bucket.blob("out/" + os.path.relpath(path, root)).upload_from_filename(path)
        upload_s = time.perf_counter() - started
        results = []
        for round_, slice_mib, readahead in itertools.product(range(rounds), slices_mib, readaheads):
            window = {"reference_tok_s": reference_rate()} if reference else {}
            settings = ["--gcs_slice_mib", str(slice_mib), "--readahead", readahead]
            if with_transport:
                epochs = reader_args[reader_args.index("--epochs") + 1]
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "transport", "gs://loader-bench/out",
                                       "--epochs", epochs, "--server_pid", str(server.pid), *settings],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"the transport run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
                results.append({**json.loads(done.stdout), **window, "round": round_, "server": server_kind,
                                "gcs_slice_mib": float(slice_mib)})
            server_cpu_s = _process_cpu_seconds(server.pid)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "read", "gs://loader-bench/out",
                                   *reader_args, *settings], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the reader failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout)
            server_cpu_s = _process_cpu_seconds(server.pid) - server_cpu_s
            results.append({**result, **window, "round": round_, "upload_s": round(upload_s, 1), "server": server_kind,
                            "server_cpu": server_cpu, "loader_cpus": sorted(os.sched_getaffinity(0)),
                            "server_cpu_s": round(server_cpu_s, 2),
                            "server_us_per_token": round(server_cpu_s / result["tokens"] * 1e6, 3),
                            "loader_us_per_token": round(result["cpu_s"] / result["tokens"] * 1e6, 3)})
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def through_dataloader(root: str, batch_tokens: int, dtype: str, epochs: int, workers: tuple[int, ...],
                       rounds: int) -> list[dict]:
    """`ds.torch_iterable` through `torch.utils.data.DataLoader(num_workers=N)` for each N in turn, `rounds` times,
    every epoch read to its end; and what torch's move of one batch into shared memory costs (the way a worker's
    tensor reaches the trainer's process), timed in this process."""
    import torch

    from pipeline.dataset import open_activations

    ds = open_activations(root)
    results = []
    for round_ in range(rounds):
        for num_workers in workers:
            loader = torch.utils.data.DataLoader(
                ds.torch_iterable("resid_post", 6, batch_tokens, dtype=dtype, drop_last=False, epochs=epochs),
                batch_size=None, num_workers=num_workers)
            started, tokens = time.perf_counter(), 0
            for batch in loader:
                tokens += len(batch)
            seconds = time.perf_counter() - started
            results.append({"round": round_, "num_workers": num_workers, "dtype": dtype, "tokens": tokens,
                            "num_tokens": ds.num_tokens("resid_post", 6) * epochs, "seconds": round(seconds, 3),
                            "tok_s": round(tokens / seconds), "load_average": os.getloadavg()[0]})
    batch = next(iter(ds.torch_iterable("resid_post", 6, batch_tokens, dtype=dtype)))
    copies = [batch.clone() for _ in range(20)]
    started = time.perf_counter()
    for copy in copies:
        copy.share_memory_()
    per_batch = (time.perf_counter() - started) / len(copies)
    for result in results:
        result["share_memory_ms_per_batch"] = round(per_batch * 1e3, 2)
    return results


_TIMED_STEPS = ("_decode", "_load", "_emit", "_gather")


def timed_steps():
    """Wraps the loader's steps with wall-clock timers (they nest: _load holds _decode; _gather runs inside _emit
    without threads, on the gather thread with them); returns the dict the seconds accumulate in. For --phases
    only: the timers cost a little themselves."""
    from pipeline.loader import ActivationBatches

    seconds = dict.fromkeys(_TIMED_STEPS, 0.0)

    def timer(name, step):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started
        return timed

    for name in _TIMED_STEPS:
        setattr(ActivationBatches, name, timer(name, getattr(ActivationBatches, name)))
    return seconds


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("write", "read", "gcs", "torch", "transport"))
    parser.add_argument("root")
    parser.add_argument("--tokens", type=int, default=1_400_000)
    parser.add_argument("--d_model", type=int, default=896)
    parser.add_argument("--samples_per_shard", type=int, default=4)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--buffer_tokens", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--readahead", default="default",
                        help="read: row groups decoded ahead ('default': the loader's own choice); gcs: a "
                             "comma-separated list to alternate; not used by torch")
    parser.add_argument("--epochs", type=int, default=1,
                        help="read, gcs: passes over the output (longer, steadier runs)")
    parser.add_argument("--server", choices=("stock", "zero_copy"), default="stock",
                        help="gcs: the emulator as released, or sending each range without copying it first")
    parser.add_argument("--server_cpu", type=int, default=None,
                        help="gcs: run the emulator on this core only (the loader's cores: taskset)")
    parser.add_argument("--gcs_slice_mib", default="24",
                        help="read (of a gs:// root), gcs: the most MiB one ranged GET fetches (0: a chunk in one GET, "
                             "as before slices); gcs takes a comma-separated list and alternates its sizes")
    parser.add_argument("--rounds", type=int, default=1,
                        help="gcs, torch: reads per slice size and readahead / worker count")
    parser.add_argument("--transport", action="store_true",
                        help="gcs: before each read, a `transport` run (the loader's ranged reads alone, bytes "
                             "discarded) in a fresh process, with the emulator's busy share per epoch")
    parser.add_argument("--server_pid", type=int, default=None,
                        help="transport: the emulator's pid, to report its CPU per token and busy share per epoch")
    parser.add_argument("--num_workers", default="0,2", help="torch: DataLoader worker counts to alternate")
    parser.add_argument("--compression", default="none", help="write: the activation column's codec")
    parser.add_argument("--phases", action="store_true",
                        help="read: also report microseconds per token in decoding (_decode), copying into the "
                             "store (_load less _decode) and gathering and widening (_gather)")
    parser.add_argument("--no_check_pages", action="store_true",
                        help="read, gcs: open_activations(check_pages=False), no CRC check of each page")
    parser.add_argument("--reference", action="store_true",
                        help="read, gcs: before each read, measure issue 11's reader reference on one core "
                             "(storage_bench.py --reference, read_table plus decode) and report it as "
                             "reference_tok_s: which kind of window of this VM the read ran in")
    args = parser.parse_args(argv)
    readaheads = args.readahead.split(",")
    if any(not (r == "default" or r.isdigit()) for r in readaheads) or (args.mode != "gcs" and len(readaheads) > 1):
        parser.error(f"--readahead: 'default' or a non-negative integer{' list' if args.mode == 'gcs' else ''}, "
                     f"got {args.readahead!r}")
    if args.mode == "write":
        result = write(args.root, args.tokens, args.d_model, args.samples_per_shard, args.compression)
    elif args.mode == "torch":
        for result in through_dataloader(args.root, args.batch_tokens, args.dtype, args.epochs,
                                         tuple(int(x) for x in args.num_workers.split(",")), args.rounds):
            print(json.dumps(result), flush=True)
        return 0
    elif args.mode == "gcs":
        reader_args = ["--batch_tokens", str(args.batch_tokens), "--dtype", args.dtype, "--epochs", str(args.epochs)]
        reader_args += ["--buffer_tokens", str(args.buffer_tokens)] if args.buffer_tokens is not None else []
        reader_args += ["--no_check_pages"] if args.no_check_pages else []
        for result in through_emulator(args.root, reader_args, args.server, args.server_cpu,
                                       tuple(float(x) for x in args.gcs_slice_mib.split(",")), args.rounds,
                                       tuple(readaheads), args.reference, args.transport):
            print(json.dumps(result), flush=True)
        return 0
    else:
        if args.root.startswith("gs://"):
            from pipeline import dataset

            slice_mib = float(args.gcs_slice_mib)
            dataset._GcsStore._SLICE = int(slice_mib * 2**20) if slice_mib else 2**62
        if args.mode == "transport":
            if not args.root.startswith("gs://"):
                parser.error("transport reads a gs:// output (gcs --transport runs it against the emulator)")
            result = transport(args.root, None if args.readahead == "default" else int(args.readahead), args.epochs,
                               args.server_pid)
            print(json.dumps({**result, "gcs_slice_mib": float(args.gcs_slice_mib)}))
            return 0
        result_slice = {"gcs_slice_mib": float(args.gcs_slice_mib)} if args.root.startswith("gs://") else {}
        steps = timed_steps() if args.phases else None
        readahead = None if args.readahead == "default" else int(args.readahead)
        window = {"reference_tok_s": reference_rate()} if args.reference else {}
        result = read(args.root, args.batch_tokens, args.buffer_tokens, args.dtype, readahead,
                      not args.no_check_pages, args.epochs)
        if steps is not None:
            per_token = {name: round(value / result["tokens"] * 1e6, 3) for name, value in steps.items()}
            per_token["copy_into_store"] = round(per_token["_load"] - per_token["_decode"], 3)
            result["us_per_token"] = per_token
        result.update(result_slice, **window)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
