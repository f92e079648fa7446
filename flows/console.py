"""What the `tfpipe` command prints: quiet by default, everything with -v/--verbose.

TensorFlow's C++ runtime logs through absl straight to file descriptor 2 before any Python setting can reach it
(TF_CPP_MIN_LOG_LEVEL no longer silences the start-up lines, and every machine without a GPU gets an
`E0000 ... failed call to cuInit` line). Quiet mode points descriptor 2 at a pipe whose reader drops those lines
and passes every other line on, while Python's own sys.stderr (logs, errors, progress bars) writes to the real
stderr directly, so nothing of ours waits on the pipe.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading

from pipeline_config import ConfigError
from tasks import QUIET_ENV
from tasks.errors import PipelineError

NATIVE_LOG_LINE = re.compile(
    rb"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "  # absl / TensorFlow C++ log lines (F: fatal, kept)
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: .* rebuild TensorFlow)")
DRAINED = b"\0tfpipe: native stderr drained\n"  # written by end_native_stderr; never shown

_native_pipe_open = False
_native_drained = threading.Event()


def verbose_requested(argv: list[str]) -> bool:
    return "-v" in argv or "--verbose" in argv


def quiet_native_logs() -> None:
    """Drop TensorFlow's C++ log lines from this process's stderr (call before TensorFlow loads)."""
    try:
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        return
    global _native_pipe_open
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    _native_pipe_open = True
    sys.stderr = io.TextIOWrapper(os.fdopen(real, "wb", buffering=0), encoding="utf-8", errors="replace",
                                  line_buffering=True, write_through=True)
    threading.Thread(target=_forward, args=(read_end, real), name="tfpipe-native-stderr", daemon=True).start()


def _forward(read_end: int, real: int) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        for line in iter(pipe.readline, b""):
            drained = line.endswith(DRAINED)
            line = line.removesuffix(DRAINED)
            if line and not NATIVE_LOG_LINE.match(line):
                os.write(real, line)
            if drained:
                _native_drained.set()


def end_native_stderr(timeout_s: float = 5.0) -> None:
    """Before a command's last line: what native code wrote so far is passed on first, and what it writes from now
    on goes nowhere (TensorFlow's threads keep reporting a lost collective while the process exits), so that the
    one line naming the problem is the last one. Quiet mode only: with -v everything stays."""
    global _native_pipe_open
    if not _native_pipe_open:
        return
    _native_pipe_open = False
    try:
        pipe = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        os.write(pipe, DRAINED)  # after everything already in the pipe: seen by the reader once those are out
        os.close(pipe)
    except OSError:
        return
    _native_drained.wait(timeout_s)


class _NoPrefectChatter(logging.Filter):
    """Prefect's own INFO notes on the `prefect` logger (the temporary server starting and stopping); its flow
    and task run lines come from child loggers and stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed flow or task run with the exception's traceback; for the errors a user fixes (bad
    config, bad input, a stop request, a Prefect server that went away) the run's last line already says what
    matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        import httpx

        if record.exc_info and isinstance(record.exc_info[1], (PipelineError, ConfigError, httpx.TransportError)):
            record.exc_info, record.exc_text = None, None
        return True


class _NoDaskTeardownNoise(logging.Filter):
    """A Dask LocalCluster shutting down logs connections it closed itself (CommClosedError, StreamClosedError,
    with tracebacks, from distributed's or asyncio's loggers); nothing was lost and nothing is to be done."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ not in ("CommClosedError", "StreamClosedError")


class _NoQueueDrainNotes(logging.Filter):
    """Prefect's event and log workers, flushing at exit, note how many items they still hold ("Still processing
    items: N items remaining..."), after the command's last line; they send them all the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Still processing items")


# One instance each: logging's addFilter skips a filter already attached, so calling quiet_python_logs again
# (a second CLI entry in one process, the tests) adds nothing.
NO_PREFECT_CHATTER = _NoPrefectChatter()
NO_TRACEBACK_FOR_USER_ERRORS = _NoTracebackForUserErrors()
NO_DASK_TEARDOWN_NOISE = _NoDaskTeardownNoise()
NO_QUEUE_DRAIN_NOTES = _NoQueueDrainNotes()


def quiet_python_logs() -> None:
    """TensorFlow's Python warnings (retracing notes), Prefect's server chatter and queue-drain notes, the
    tracebacks of user errors and Dask's teardown noise, hidden unless verbose."""
    from tasks import configure_logging

    configure_logging()  # the stderr handler every logger's records reach, filtered here
    for handler in logging.getLogger().handlers:
        handler.addFilter(NO_DASK_TEARDOWN_NOISE)
        handler.addFilter(NO_QUEUE_DRAIN_NOTES)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("prefect").addFilter(NO_PREFECT_CHATTER)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(NO_TRACEBACK_FOR_USER_ERRORS)


def quiet_child_logs() -> None:
    """In a process a quiet CLI started: a user error's traceback stays out of the shared stderr there too."""
    if os.environ.get(QUIET_ENV) == "1":
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(NO_TRACEBACK_FOR_USER_ERRORS)


def configure(argv: list[str]) -> bool:
    """Quiet unless -v/--verbose is among the arguments; returns whether verbose."""
    verbose = verbose_requested(argv)
    os.environ[QUIET_ENV] = "0" if verbose else "1"  # inherited by the processes this one starts
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a LocalCluster's start and stop notes
        quiet_native_logs()
        quiet_python_logs()
    return verbose
