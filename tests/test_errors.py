"""A failed run ends with one line on stderr naming the file or path, what is wrong and what to do, and the log
that holds the full traceback; SIGINT exits 130 and SIGTERM keeps Python's default. Runs of pipeline.run on a tiny
checkpoint for what it can show (real processes where a signal is sent), unit tests of the exception walking for the
rest."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import INTERRUPTED_EXIT, RunContext, causes, explain, report_failure
from tests.arc_fixtures import write_challenges

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = RunContext(output="/data/acts", batch_size=8, max_seq_len=8192)

# Runs `python -m pipeline.run` (its __main__ block, through runpy) after injecting a fault where the named
# function is called: FAULT=enospc|oom|slow_write. slow_write prints WRITING and stalls the first write, so a
# signal can be sent while the pipeline is busy. The fixture runs enospc and oom in this process (the same
# patches); the launcher keeps them so that any fault can be reproduced from a shell.
LAUNCHER = textwrap.dedent("""
    import errno, os, runpy, sys, time

    fault = os.environ["FAULT"]
    if fault in ("enospc", "slow_write"):
        import transforms.write as write
        original = write._upload
        def upload(data, path):
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            print("WRITING", file=sys.stderr, flush=True)
            time.sleep(float(os.environ.get("STALL_S", "3")))
            return original(data, path)
        write._upload = upload
    if fault == "oom":
        import jax
        from model.qwen2 import HookedQwen
        def run(self, *args, **kwargs):  # every capture of the model, the extractor's included, runs here
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.")
        HookedQwen.run = run
    sys.argv = ["pipeline.run", *sys.argv[1:]]
    runpy.run_module("pipeline.run", run_name="__main__", alter_sys=True)
""")


def env() -> dict:
    return dict(os.environ, NO_GCE_CHECK="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def run_args(model, dataset, output) -> list[str]:
    return ["--runner=DirectRunner", f"--model={model}", f"--dataset={dataset}", f"--output={output}",
            "--layers=0", "--hooks=resid_post", "--dtype=float32", "--batch_size=1", "--max_seq_len=2048",
            "--progress_interval=0"]


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").splitlines()[-1]


def logged_at(line: str) -> Path:
    """The log the line names; it must exist and hold a traceback."""
    assert "(full traceback in " in line, line
    path = Path(line.rsplit("(full traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in path.read_text()
    return path


def _collect(process: subprocess.Popen, send: signal.Signals | None, result: dict) -> None:
    """Reads the run's stderr; with ``send``, sends that signal once the run prints WRITING (the pipeline is
    busy writing its first shard). Leaves the exit status, stderr and whether the signal was sent in result."""
    lines, sent = [], False
    for line in process.stderr:
        lines.append(line)
        if send is not None and not sent and line.strip() == "WRITING":
            process.send_signal(send)
            sent = True
    result.update(status=process.wait(), stderr="".join(lines), signalled=sent)


def run_in_process(model, dataset, output, fault) -> dict:
    """``run_main(pipeline.run.main)`` in this process with the launcher's fault injected: the one line and the
    log are the same as the CLI's, without a process start per fault."""
    import contextlib
    import io

    import jax

    import transforms.write as write
    from model.qwen2 import HookedQwen
    from pipeline.errors import run_main
    from pipeline.run import main

    def full_disk(data, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    def out_of_memory(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.")

    stderr = io.StringIO()
    sigint = signal.getsignal(signal.SIGINT)  # run_main leaves SIGINT at its default action after a failure
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
            if fault == "enospc":
                patch.setattr(write, "_upload", full_disk)
            if fault == "oom":
                patch.setattr(HookedQwen, "run", out_of_memory)
            status = run_main(main, run_args(model, dataset, output))
    finally:
        signal.signal(signal.SIGINT, sigint)
    return dict(status=status, stderr=stderr.getvalue(), signalled=False)


def signalled_run(model, dataset, output) -> subprocess.Popen:
    """The launcher with its first write stalled, so that a signal lands while the pipeline is busy writing."""
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, *run_args(model, dataset, output)], cwd=ROOT,
                            env=dict(env(), FAULT="slow_write", STALL_S="2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """A truncated model.safetensors, a corrupt tokenizer.json, a full disk and device memory exhausted, run in
    this process; a run stopped by SIGINT while writing, as a real process (the signal and the exit status are
    the CLI's), started first so that it loads while the others run."""
    import threading

    work = tmp_path_factory.mktemp("errors")
    dataset, _ = write_challenges(work / "challenges.json", count=1, bad=False)
    truncated = work / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    broken_tokenizer = work / "broken_tokenizer"
    shutil.copytree(tiny_checkpoint, broken_tokenizer)
    tokenizer = broken_tokenizer / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:1000])
    results = {"sigint": {"output": work / "out-sigint"}}
    process = signalled_run(tiny_checkpoint, dataset, results["sigint"]["output"])
    reader = threading.Thread(target=_collect, args=(process, signal.SIGINT, results["sigint"]))
    reader.start()
    plans = {"truncated": (truncated, "none"), "tokenizer": (broken_tokenizer, "none"),
             "enospc": (tiny_checkpoint, "enospc"), "oom": (tiny_checkpoint, "oom")}
    for name, (model, fault) in plans.items():
        output = work / f"out-{name}"
        results[name] = {"output": output, **run_in_process(model, dataset, output, fault)}
    reader.join(timeout=900)
    for result in results.values():
        result.update(weights=weights, tokenizer=tokenizer)
    return results


@pytest.mark.parametrize("name,start,advice", [
    ("truncated", "error: {weights} is truncated or corrupt (", "download or copy it again"),
    ("tokenizer", "error: {tokenizer} cannot be loaded as a tokenizer", "copy the model's tokenizer files"),
    ("enospc", "error: no space left on the device writing {output}: free space there", "with --resume"),
    ("oom", "error: out of device memory running the model on batches of --batch_size=1 rows x --max_seq_len=2048 "
            "tokens", "lower --batch_size and rerun with --resume (committed shards are kept), or lower "
                      "--max_seq_len"),
    ("sigint", "error: interrupted (SIGINT): committed shards are kept", "run the same command with --resume"),
])
def test_last_stderr_line_names_cause_and_fix(runs, name, start, advice):
    run = runs[name]
    line = last_line(run["stderr"])
    assert run["status"] == (INTERRUPTED_EXIT if name == "sigint" else 1), run["stderr"][-3000:]
    assert line.startswith(start.format(**run)), line
    assert advice in line, line
    assert logged_at(line).parent == run["output"] / "_runs"


def test_a_run_leaves_sigterm_at_its_default_while_writing(tiny_checkpoint, tmp_path, monkeypatch):
    """The fast twin of the SIGTERM case below: while a run in this process writes, SIGTERM still has Python's
    default action, which ends the process at once."""
    import transforms.write as write
    from tests.test_end_to_end import run_here

    dataset, _ = write_challenges(tmp_path / "challenges.json", count=1, bad=False)
    original, seen = write._upload, []

    def upload(data, path):
        seen.append(signal.getsignal(signal.SIGTERM))
        return original(data, path)

    monkeypatch.setattr(write, "_upload", upload)
    run_here(*run_args(tiny_checkpoint, dataset, tmp_path / "out"))
    assert seen and all(handler == signal.SIG_DFL for handler in seen), seen


@pytest.mark.slow
def test_sigterm_keeps_the_default_immediate_end(tiny_checkpoint, tmp_path):
    dataset, _ = write_challenges(tmp_path / "challenges.json", count=1, bad=False)
    run = {}
    _collect(signalled_run(tiny_checkpoint, dataset, tmp_path / "out"), signal.SIGTERM, run)
    assert run["signalled"] and run["status"] == -signal.SIGTERM, run["stderr"][-3000:]
    assert "error:" not in run["stderr"]


# --- the exception walking, unit by unit ----------------------------------------------------------------


def beam_wrapped(error: BaseException, step: str = "Extract") -> BaseException:
    """What the in-process runner raises: the same type, message suffixed, the original as its context."""
    try:
        try:
            raise error
        except BaseException as original:
            raise type(original)(f"{original} [while running '{step}']")
    except BaseException as wrapped:
        return wrapped


def remote_wrapped(traceback_text: str) -> RuntimeError:
    """What a multi-process or remote runner raises: a RuntimeError quoting the worker's traceback."""
    return RuntimeError("Pipeline job failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                        + traceback_text + " [while running 'Extract']\n")


def test_the_chain_is_walked_to_the_root_cause():
    wrapped = beam_wrapped(ValueError("grid too wide"), step="Tokenize")
    found = causes(wrapped)
    assert [c.type_name for c in found] == ["ValueError", "ValueError"]
    assert found[0].message == "grid too wide" and found[0].step == "Tokenize"
    assert explain(wrapped)[0] == "ValueError in pipeline step 'Tokenize': grid too wide"


def test_out_of_memory_quoted_by_a_remote_worker():
    error = remote_wrapped("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
                           "to allocate 12.50GiB.")
    line, status = explain(error, CONTEXT)
    assert status == 1
    assert line.startswith("out of device memory running the model on batches of --batch_size=8 rows x "
                           "--max_seq_len=8192 tokens (XLA: RESOURCE_EXHAUSTED: Out of memory"), line


def test_disk_full_inside_a_write(tmp_path, monkeypatch):
    """ENOSPC raised by a real write call, wrapped as Beam wraps it."""
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: FullFile(real_open(*a, **k)))
    try:
        with open(tmp_path / "shard.parquet", "wb") as handle:
            handle.write(b"x")
    except OSError as error:
        failure = beam_wrapped(error, step="Write")
    monkeypatch.undo()
    line, status = explain(failure, CONTEXT)
    assert (line, status) == ("no space left on the device writing /data/acts: free space there (or raise the "
                              "quota), then run the same command with --resume; committed shards are kept", 1)
    quoted = remote_wrapped("OSError: [Errno 28] No space left on device: '/data/acts/samples/.tmp-1-h000-a.parquet'")
    assert explain(quoted, CONTEXT)[0].startswith(
        "no space left on the device writing /data/acts/samples/.tmp-1-h000-a.parquet: free space")


def test_permission_denied_names_the_path():
    error = beam_wrapped(PermissionError(errno.EACCES, "Permission denied", "/data/acts/activations/x.parquet"))
    line, _ = explain(error, CONTEXT)
    assert line == ("permission denied on /data/acts/activations/x.parquet: give this user access to it (or "
                    "choose another --output), then run the same command with --resume")
    read_only = remote_wrapped("OSError: [Errno 30] Read-only file system: '/data/acts/_runs'")
    assert explain(read_only, CONTEXT)[0].startswith("read-only file system on /data/acts/_runs:")


def test_checkpoint_and_tokenizer_errors_keep_their_own_message():
    from model.tokenizer import TokenizerNotFound
    from model.weights import CheckpointError

    message = "/m/model.safetensors is truncated or corrupt (12 bytes on disk; ...): download or copy it again"
    assert explain(beam_wrapped(CheckpointError(message)))[0] == message
    quoted = remote_wrapped(f"model.weights.CheckpointError: {message}")
    assert explain(quoted)[0] == message
    missing = TokenizerNotFound("/m has no tokenizer.json (nor vocab.json + merges.txt): copy ...")
    assert explain(beam_wrapped(missing))[0].startswith("/m has no tokenizer.json")


def test_an_interrupt_anywhere_in_the_chain_is_130():
    assert explain(beam_wrapped(KeyboardInterrupt()))[1] == INTERRUPTED_EXIT
    assert explain(remote_wrapped("KeyboardInterrupt"))[1] == INTERRUPTED_EXIT
    assert explain(RuntimeError("bundle failed"), interrupted=True)[1] == INTERRUPTED_EXIT


def test_log_goes_to_a_temporary_folder_when_the_output_cannot_take_it(tmp_path, capsys):
    output = tmp_path / "a-file"
    output.write_text("not a folder")
    status = report_failure(beam_wrapped(ValueError("boom")), [f"--output={output}"])
    line = last_line(capsys.readouterr().err)
    assert status == 1 and line.startswith("error: ValueError in pipeline step 'Extract': boom (full traceback in ")
    log = logged_at(line)
    assert not str(log).startswith(str(output)) and f"--output={output}" in log.read_text()
    log.unlink()


def test_truncated_safetensors_and_corrupt_tokenizer_files_are_named(tiny_checkpoint, tmp_path):
    from model import load_model
    from model.tokenizer import TokenizerError, load_tokenizer
    from model.weights import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=rf"{weights} is truncated or corrupt \([\d,]+ bytes on disk; "):
        load_model(str(copy), dtype="float32")
    (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"})[:-3])
    with pytest.raises(TokenizerError, match=rf"{copy / 'tokenizer_config.json'} cannot be loaded as a tokenizer"):
        load_tokenizer(copy)


@pytest.mark.parametrize("reader", ["reads", "gone"])
def test_a_report_ends_with_its_status_after_its_output(reader):
    """exit_report: the report's status, everything it printed delivered (a process that skips the native
    teardown must flush first), and 141 without a traceback when the reader has gone."""
    script = textwrap.dedent("""
        import sys
        from pipeline.errors import exit_report

        def main():
            sys.stdout.write("line\\n" * 20000)  # more than a pipe holds: written while the test reads
            print("the last line")
            print("a warning", file=sys.stderr)
            return 3

        exit_report(main)
    """)
    read, write = os.pipe()
    if reader == "gone":
        os.close(read)
    try:
        done = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=write, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        os.close(write)
    out = b""
    if reader == "reads":
        with os.fdopen(read, "rb") as handle:
            out = handle.read()
    stderr = done.communicate(timeout=60)[1]
    if reader == "reads":
        assert done.returncode == 3 and out.decode().endswith("the last line\n") and "a warning" in stderr
    else:
        assert done.returncode == 141 and "Traceback" not in stderr, stderr


def test_a_broken_pipe_other_than_the_reports_reader_is_a_failure():
    """A BrokenPipeError from elsewhere (a storage socket) while standard output is fine is not a reader gone: it
    ends the command as any failure does, with its traceback, never as a quiet 141."""
    script = textwrap.dedent("""
        from pipeline.errors import exit_report

        def main():
            raise BrokenPipeError(32, "Broken pipe (a storage socket)")

        exit_report(main)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and "BrokenPipeError: [Errno 32] Broken pipe (a storage socket)" in done.stderr
