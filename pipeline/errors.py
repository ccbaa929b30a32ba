"""One line that names the cause of a failed run and the fix, instead of Beam's layered tracebacks.

A DoFn's exception reaches the driver wrapped by Beam, as the same type with `[while running 'Step']` added and
the original as its ``__context__`` (in-process runner), or as a RuntimeError whose message holds the worker's
traceback as text (multi-process and remote runners). :func:`explain` walks both: the exception chain
(``__cause__``/``__context__``) and every ``package.Type: message`` line in the messages, and recognises the
causes a user can act on: out of device memory, disk full, permission denied, a truncated or corrupt checkpoint,
an unloadable tokenizer, an interrupt. Anything else is named by its innermost type and message.

:func:`report_main` ends a report command (inspect, verify, ...) quietly when its reader stops early (``| head``);
:func:`exit_report` ends its process with that status.
:func:`run_main` wraps ``pipeline.run.main``: on failure it writes the full traceback to
``OUTPUT/_runs/error-<host>-<time>.log`` (a temporary folder when the output cannot take it) and prints the one
line, which names that log, as the last line on stderr. SIGINT ends the run with exit status 130 once Python
has unwound (writer threads joined, files closed); committed shards stay and ``--resume`` finishes the run.
SIGTERM keeps Python's default: the process ends at once, and ``--resume`` recovers as after any kill.
"""
from __future__ import annotations

import _thread
import dataclasses
import datetime as _dt
import errno
import os
import re
import select
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Iterator, NoReturn, Optional

FAILED_EXIT = 1
INTERRUPTED_EXIT = 128 + signal.SIGINT
REINTERRUPT_DELAY_S = 0.05

# "pkg.module.SomeError: message" (or a bare "KeyboardInterrupt") as it ends a traceback printed into a message.
_ERROR_LINE = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*(?P<type>[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exhausted|NotFound|Warning))"
    r"(?:: (?P<message>.*))?$", re.M)
_STEP = re.compile(r" ?\[while running '(?P<step>[^']+)'\]")
_QUOTED_PATH = re.compile(r"'(?P<path>(?:gs://|/)[^']+)'")
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM when allocating")


@dataclasses.dataclass(frozen=True)
class Cause:
    """One exception found in a failure: its type name, message (Beam's step suffix removed), errno and
    filename when it is a live OSError, and the Beam step it ran in."""

    type_name: str
    message: str
    errno: Optional[int] = None
    filename: Optional[str] = None
    step: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the one line may name: the run's flags as given (None when unknown)."""

    output: Optional[str] = None
    batch_size: Optional[int] = None
    max_seq_len: Optional[int] = None
    host: str = "h000"


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling, outermost first."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _strip_step(message: str) -> tuple[str, Optional[str]]:
    steps = _STEP.findall(message)
    return _STEP.sub("", message).strip(), (steps[-1] if steps else None)


def causes(error: BaseException) -> list[Cause]:
    """Every exception in the failure, outermost first: each one of the chain, followed by the errors that
    its message quotes from a worker's traceback text (last quoted last)."""
    found = []
    for link in exception_chain(error):
        raw = str(link)
        message, step = _strip_step(raw)
        first_line = message.splitlines()[0] if message else ""
        found.append(Cause(type(link).__name__, first_line if "Traceback" in message else message,
                           getattr(link, "errno", None), getattr(link, "filename", None), step))
        if "\n" in raw:
            for match in _ERROR_LINE.finditer(raw):
                text, inner_step = _strip_step(match.group("message") or "")
                found.append(Cause(match.group("type"), text, step=inner_step or step))
    return found


def _errno_of(cause: Cause) -> Optional[int]:
    if cause.errno is not None:
        return cause.errno
    match = re.search(r"\[Errno (\d+)\]", cause.message)
    if match:
        return int(match.group(1))
    if "No space left on device" in cause.message:
        return errno.ENOSPC
    return None


def _path_of(cause: Cause, context: RunContext) -> str:
    if cause.filename:
        return str(cause.filename)
    match = _QUOTED_PATH.search(cause.message)
    if match:
        return match.group("path")
    return context.output or "the output"


def _flag(name: str, value) -> str:
    return f"--{name}={value}" if value is not None else f"--{name}"


def explain(error: BaseException, context: RunContext = RunContext(), interrupted: bool = False
            ) -> tuple[str, int]:
    """The one line (without the log's name) and the exit status for a failed run."""
    found = causes(error)
    innermost = found[-1] if found else Cause(type(error).__name__, str(error))
    quoted = any("\nKeyboardInterrupt" in str(link) for link in exception_chain(error))
    if interrupted or quoted or any(cause.type_name == "KeyboardInterrupt" for cause in found):
        return ("interrupted (SIGINT): committed shards are kept; run the same command with --resume to "
                "compute the rest", INTERRUPTED_EXIT)
    for cause in found:
        if _OOM.search(cause.message):
            size = (f"batches of {_flag('batch_size', context.batch_size)} rows x "
                    f"{_flag('max_seq_len', context.max_seq_len)} tokens")
            return (f"out of device memory running the model on {size} (XLA: {cause.message[:160]}): lower "
                    "--batch_size and rerun with --resume (committed shards are kept), or lower --max_seq_len "
                    "for a new --output", FAILED_EXIT)
    for cause in found:
        code = _errno_of(cause)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return (f"no space left on the device writing {_path_of(cause, context)}: free space there (or "
                    "raise the quota), then run the same command with --resume; committed shards are kept",
                    FAILED_EXIT)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            what = "read-only file system" if code == errno.EROFS else "permission denied"
            return (f"{what} on {_path_of(cause, context)}: give this user access to it (or choose another "
                    "--output), then run the same command with --resume", FAILED_EXIT)
    for cause in reversed(found):
        if cause.type_name in ("CheckpointError", "ConfigError", "TokenizerError", "TokenizerNotFound"):
            return f"{cause.message}", FAILED_EXIT
    for cause in reversed(found):
        if cause.type_name == "SafetensorError":  # raised outside model.weights' own checks
            return (f"a safetensors file of --model is truncated or corrupt ({cause.message}): download or "
                    "copy the checkpoint again", FAILED_EXIT)
    step = next((cause.step for cause in reversed(found) if cause.step), None)
    where = f" in pipeline step '{step}'" if step else ""
    return f"{innermost.type_name}{where}: {innermost.message}", FAILED_EXIT


def context_from_argv(argv: list[str]) -> RunContext:
    """The flags the line names, read as the pipeline reads them; defaults where the flags are absent."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions

        from pipeline.options import ExtractOptions

        opts = PipelineOptions(argv).view_as(ExtractOptions)
        return RunContext(output=opts.output, batch_size=opts.batch_size, max_seq_len=opts.max_seq_len,
                          host=f"h{int(opts.host_index or 0):03d}")
    except BaseException:  # the line must still come out when the flags themselves are the problem
        return RunContext()


def _log_candidates(context: RunContext, stamp: str) -> Iterator[tuple[str, bool]]:
    name = f"error-{context.host}-{stamp}.log"
    if context.output:
        yield f"{context.output.rstrip('/')}/_runs/{name}", context.output.startswith("gs://")
    yield os.path.join(tempfile.gettempdir(), f"arc-activations-{os.getpid()}-{name}"), False


def write_log(text: str, context: RunContext) -> Optional[str]:
    """Writes ``text`` to the first place that takes it (the output's ``_runs/``, else a temporary folder);
    returns its path, or None when neither does."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for path, remote in _log_candidates(context, stamp):
        try:
            if remote:
                from apache_beam.io.filesystems import FileSystems

                with FileSystems.create(path) as handle:
                    handle.write(text.encode("utf-8"))
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
            return path
        except Exception:  # a full or unwritable disk is often why we are here: try the next place
            continue
    return None


def report_failure(error: BaseException, argv: list[str], interrupted: bool = False,
                   stream=None) -> int:
    """Writes the traceback log, prints the one line last on ``stream`` (stderr), returns the exit status."""
    stream = stream or sys.stderr
    context = context_from_argv(argv)
    line, status = explain(error, context, interrupted)
    text = f"python -m pipeline.run {' '.join(argv)}\n\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__))
    log = write_log(text, context)
    if log is None:
        stream.write(text)
        where = "traceback above"
    else:
        where = f"full traceback in {log}"
    stream.write(f"error: {line} ({where})\n")
    stream.flush()
    return status


def report_main(main: Callable[[], int]) -> int:
    """The exit status of a command that prints a report (inspect, verify, ...). When the reader of its output
    stops early (`| head`), 141, as a shell reports a process ended by SIGPIPE, instead of a BrokenPipeError
    traceback and Python's "Exception ignored" at exit."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # a socket of the storage, say: a failure like any other
            raise
        # Python's recipe (library/signal.html, "Note on SIGPIPE"): what is left unflushed goes nowhere at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (poll reports an error or hang-up on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture): the pipe was another
        return False


def exit_report(main: Callable[[], int]) -> NoReturn:
    """Ends a report command's process with :func:`report_main`'s status once its output is flushed, skipping the
    interpreter's native teardown: now and then, more under load, a native library's thread outlived the interpreter
    and the C++ runtime aborted at exit ("terminate called without an active exception"),
    turning a finished report into exit -6. An exception from ``main`` still ends the process the usual way."""
    code = report_main(main)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader gone, or a stream closed: nothing left to deliver
            pass
    os._exit(code)


def run_main(main: Callable[[list[str]], int], argv: Optional[list[str]] = None) -> int:
    """``main(argv)``, with any failure turned into its one line and exit status (130 for SIGINT)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    interrupted = {"seen": False}
    previous_hook = sys.unraisablehook

    def on_sigint(signum, frame):
        # Remember it: Beam may re-raise the KeyboardInterrupt as another type on its way out.
        interrupted["seen"] = True
        signal.default_int_handler(signum, frame)

    def on_unraisable(unraisable):
        # A KeyboardInterrupt raised inside a garbage-collection callback or __del__ (JAX has both) is printed
        # and dropped, and the run would go on as if Ctrl-C had not been pressed: raise it again in the main
        # thread once that callback has returned (from another thread, or it would land in the callback again).
        if interrupted["seen"] and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(REINTERRUPT_DELAY_S, _thread.interrupt_main).start()
        previous_hook(unraisable)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
        sys.unraisablehook = on_unraisable
    try:
        return main(argv)
    except SystemExit:
        raise
    except BaseException as error:
        # A second Ctrl-C while the log is written ends the process as Python would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        return report_failure(error, argv, interrupted["seen"])
    finally:
        sys.unraisablehook = previous_hook
