"""How a `tfpipe` command fails: one line on stderr naming the problem and the fix, an exit code (2 a bad config,
1 bad input or a lost server, 128 + SIGTERM a stopped stage), never a traceback; Prefect's own failures (a
temporary server that did not start, a server that refuses this client or went away) translated into that line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import typer

from flows import console
from pipeline_config import ConfigError

EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def fail(message: str, code: int) -> None:
    """The command's last line, then exit `code` (what native code writes from now on goes nowhere)."""
    console.end_native_stderr()
    typer.echo(f"tfpipe: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn):
    """Run a command body; user errors become one line on stderr and an exit code, never a traceback. The stages
    print nothing (they log to stderr): stdout is the command's result alone."""
    from tasks.errors import PipelineError, Stopped

    try:
        return fn()
    except ConfigError as exc:
        fail(str(exc), 2)
    except Stopped as exc:
        fail(str(exc), 128 + signal.SIGTERM)  # the shell's code for a process ended by SIGTERM
    except PipelineError as exc:
        fail(f"error: {exc}", 1)


@contextlib.contextmanager
def prefect_errors_are_one_line():
    """A temporary Prefect server that did not start in time, a Prefect server that refuses this client (auth), or
    one that went away for good (after the client's retries): one line, exit 1, at once."""
    import httpx

    from tasks.errors import first_line

    try:
        yield
    except RuntimeError as exc:
        if not str(exc).startswith(EPHEMERAL_TIMEOUT):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

        fail(f"error: Prefect's temporary server did not answer within {timeout.value()} s "
             f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): start a server (prefect server start) and set "
             "PREFECT_API_URL=http://127.0.0.1:4200/api, or raise that timeout", 1)
    except httpx.HTTPStatusError as exc:  # prefect.exceptions.PrefectHTTPStatusError is one
        if exc.response.status_code not in (401, 403):
            raise
        from prefect.settings import PREFECT_API_URL

        fail(f"error: the Prefect server at {PREFECT_API_URL.value()} refused this client "
             f"({exc.response.status_code} {exc.response.reason_phrase}): set PREFECT_API_AUTH_STRING to the "
             "user:password its PREFECT_SERVER_API_AUTH_STRING names", 1)
    except httpx.TransportError as exc:
        from prefect.settings import PREFECT_API_URL

        console.end_native_stderr()
        typer.echo(f"tfpipe: error: lost the Prefect server at {PREFECT_API_URL.value() or 'its temporary address'} "
                   f"({type(exc).__name__}: {first_line(exc)}); the stages that finished "
                   "published their outputs: re-run once the server is back and they are reused", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # else Prefect keeps retrying to ship logs and events to the lost server for minutes at exit
