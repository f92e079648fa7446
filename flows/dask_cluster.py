"""The Dask task runner of the flows that fan out (Dask prediction, tuning): an existing scheduler, or a
LocalCluster of worker processes with one Dask thread each (TensorFlow's own pools are sized per task)."""

from __future__ import annotations

import os


def dask_runner(address: str | None, workers: int):
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": worker_environment()})


def threads_per_worker(workers: int) -> int:
    """TensorFlow threads for each of `workers` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_environment() -> dict[str, str]:
    """What the LocalCluster's workers need beyond this process's environment: where this run's Prefect server is.
    Without PREFECT_API_URL every worker process would start a temporary server of its own (15-20 s each on a
    cold machine), and its task runs would not show on this run's server."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the temporary server this process started for the run
    return {"PREFECT_API_URL": server.api_url} if server.running else {}
