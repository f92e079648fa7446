"""Best-effort dashboard reporting: progress bars, tables and markdown on the Prefect Artifacts page.

A stage must never fail, nor wait, because the dashboard cannot be reached: every artifact call runs on one
background thread, in order, in the Prefect run context it was made in. A failed call is logged once (per
process) and the run goes on; once a call found the server unreachable, the run's other queued calls are
dropped instead of each waiting out the client's retries; `drain` gives queued calls a bounded time to land
before the run ends (and the next run tries the server again).
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

import httpx
from prefect import artifacts

from tasks.errors import first_line

log = logging.getLogger("tfpipe.dashboard")

_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfpipe-dashboard")
_pending: list[Future] = []
_warned = False
_unreachable = False  # a call of this run found no server: the rest of its queue is dropped


def _call(fn: Callable[..., Any], *args, **kwargs) -> Future:
    def safely():
        global _warned, _unreachable
        if _unreachable:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the server is gone, or refused the artifact: the run goes on without it
            _unreachable = _unreachable or isinstance(exc, httpx.TransportError)
            if not _warned:
                _warned = True
                log.warning("dashboard update failed (%s: %s); the run goes on without dashboard updates",
                            type(exc).__name__, first_line(exc))
            return None

    context = contextvars.copy_context()  # the task run the artifact belongs to
    future = _worker.submit(context.run, safely)
    _pending.append(future)
    return future


def markdown(key: str, text: str, description: str) -> None:
    _call(artifacts.create_markdown_artifact, markdown=text, key=key, description=description)


def table(key: str, rows: list[dict], description: str) -> None:
    _call(artifacts.create_table_artifact, table=rows, key=key, description=description)


def progress(key: str, description: str) -> Callable[[float], None]:
    """A progress artifact at 0%; returns the function that moves it (percent, 0-100)."""
    created = _call(artifacts.create_progress_artifact, progress=0.0, key=key, description=description)

    def update(percent: float) -> None:
        def move():
            artifact_id = created.result()
            if artifact_id is not None:
                artifacts.update_progress_artifact(artifact_id=artifact_id, progress=percent)

        _call(move)

    return update


def tag_run(*tags: str) -> None:
    """Add tags to this flow run (the Runs page filters by them), keeping the ones it has."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:  # a stage called outside a flow
        return

    def add():
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run_id).tags
            client.update_flow_run(run_id, tags=sorted(set(current) | set(tags)))

    _call(add)


def drain(timeout: float = 30.0) -> None:
    """Wait up to `timeout` seconds for the queued dashboard calls (a run's last updates)."""
    global _unreachable
    wait(list(_pending), timeout=timeout)
    _pending[:] = [f for f in _pending if not f.done()]
    _unreachable = False
