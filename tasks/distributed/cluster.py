"""Training across several processes or hosts with MultiWorkerMirroredStrategy.

Each host runs one worker with its TF_CONFIG (`tfpipe train` or `tfpipe run` with
`train.strategy=multi_worker`). This module reads TF_CONFIG, creates the strategy (once per process, before any
other TensorFlow op), says which worker this is, and holds the two collectives the stages need (a barrier and
a text broadcast). `train.local_workers=N` starts N workers on this machine's loopback (`python -m
tasks.train.worker`) and reads what they published from the artifact store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

from pipeline_config import PipelineConfig, TrainConfig
from tasks.errors import PipelineError, first_line
from tasks.store.publish import find_published

log = logging.getLogger("tfpipe.cluster")

LOST_WORKER_ERRORS = ("UnavailableError", "DeadlineExceededError", "CancelledError", "InternalError", "AbortedError")
_strategy = None  # MultiWorkerMirroredStrategy can be created once per process, at start-up


def cluster_from_env() -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG; a clear error when it is missing or wrong."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise PipelineError("train.strategy=multi_worker needs TF_CONFIG, e.g. {\"cluster\": {\"worker\": [\"host1:12345\", "
                            "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}: set it on each host, "
                            "or use train.local_workers=N on one machine")
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise PipelineError("TF_CONFIG is not valid: it needs cluster.worker (a list of host:port) and task "
                            "{type: worker, index: i}") from None
    if task.get("type") != "worker" or not 0 <= index < len(workers):
        raise PipelineError(f"TF_CONFIG task {task} is not one of the {len(workers)} workers: use type worker and "
                            f"an index below {len(workers)}")
    return index, len(workers)


def multi_worker_strategy(cfg: TrainConfig):
    """This process's MultiWorkerMirroredStrategy over the TF_CONFIG cluster (created on the first call).

    A lost worker fails the collectives of the others after `collective_timeout_s` instead of hanging them.
    """
    global _strategy
    if _strategy is None:
        import tensorflow as tf

        index, count = cluster_from_env()
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=cfg.collective_timeout_s)
        _strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        log.info("multi-worker: this is worker %d of %d%s", index, count, " (chief)" if index == 0 else "")
    return _strategy


def worker_role(strategy) -> tuple[bool, int]:
    """(is this the chief, worker index). Worker 0 is the chief; a single process is its own chief."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    index = strategy.cluster_resolver.task_id or 0
    return index == 0, index


def sum_over_workers(strategy, value_fn, wait_s: float):
    """The sum of `value_fn()` over every replica of the cluster, waiting up to `wait_s` for the others (not the
    collective timeout of the training steps: outside them, one worker may be busy for long, as the chief is while
    it ingests or publishes)."""
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=wait_s)

    def step():
        return tf.distribute.get_replica_context().all_reduce("SUM", value_fn(), options=options)

    total = tf.function(lambda: strategy.run(step), autograph=False)()
    return strategy.experimental_local_results(total)[0]


def barrier(strategy, wait_s: float) -> None:
    """Every worker waits here until all have arrived (up to `wait_s`)."""
    import tensorflow as tf

    sum_over_workers(strategy, lambda: tf.constant(1.0), wait_s)


def broadcast_text(strategy, text: str | None, wait_s: float, size: int = 1024) -> str:
    """The chief's `text` on every worker (UTF-8 bytes summed over an all-reduce where only the chief adds)."""
    import numpy as np
    import tensorflow as tf

    chief, _ = worker_role(strategy)
    data = np.zeros(size, np.int32)
    if chief:
        raw = (text or "").encode()
        if len(raw) > size:
            raise PipelineError(f"cannot broadcast {len(raw)} bytes (limit {size})")
        data[: len(raw)] = np.frombuffer(raw, np.uint8)

    def contribute():
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return tf.where(first, tf.constant(data), tf.zeros_like(data))

    total = sum_over_workers(strategy, contribute, wait_s).numpy()
    return bytes(total[total > 0].astype(np.uint8)).decode()


def lost_worker_message(exc: Exception, index: int, count: int, limit: str, during: str) -> str:
    named = {int(t) for t in re.findall(r"/job:worker/replica:0/task:(\d+)", str(exc))} - {index}
    peers = sorted(named or set(range(count)) - {index})  # unnamed: one of the others (in a pair, the other one)
    who = ", ".join(f"worker {p}" for p in peers) if named or len(peers) == 1 else \
        "one of " + ", ".join(f"worker {p}" for p in peers)
    return (f"worker {index} lost contact with {who} during {during} ({type(exc).__name__}: {first_line(exc)}); "
            f"{limit}. Relaunch the cluster: it resumes from the last checkpoint")


@contextlib.contextmanager
def lost_worker_errors(cfg: TrainConfig, during: str = "training"):
    """In a multi_worker cluster, a collective that failed because a peer is gone becomes one clear PipelineError
    (`during` training, where the steps' collective timeout applies, or a stage where the workers wait longer)."""
    try:
        yield
    except Exception as exc:
        if not cfg.in_cluster or type(exc).__name__ not in LOST_WORKER_ERRORS:
            raise
        index, count = cluster_from_env()
        limit = f"collective timeout {cfg.collective_timeout_s:g}s" if during == "training" else \
            f"train.worker_wait_s {cfg.worker_wait_s:g}s"
        raise PipelineError(lost_worker_message(exc, index, count, limit, during)) from None


# ------------------------------------------------------------------------------ local workers (loopback)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(ports: list[int], index: int) -> dict[str, str]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}


def _forward(stream, prefix: str) -> None:
    for line in stream:
        sys.stderr.write(f"{prefix}{line}")
        sys.stderr.flush()


def _wait_for_workers(procs: list[subprocess.Popen], grace: float) -> tuple[int, int] | None:
    """Wait until every worker exits; after the first failure, give the others `grace` seconds to fail too.
    Returns (index, exit code) of the first failed worker, or None when all succeeded."""
    failed, deadline = None, None
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0) and failed is None:
                failed, deadline = (i, p.returncode), time.time() + grace
        if deadline and time.time() > deadline:
            break
        time.sleep(0.2)
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0), None)
    return failed


def run_local_workers(cfg: PipelineConfig, fingerprint: str) -> dict:
    """Start `train.local_workers` worker processes on loopback ports, wait for all, and return the manifest of the
    model the chief published under `fingerprint`. Their output is forwarded to stderr as `[worker i]` lines."""
    import yaml

    n = cfg.train.local_workers
    worker_cfg = cfg.model_copy(deep=True)
    worker_cfg.train.strategy, worker_cfg.train.local_workers = "multi_worker", None
    ports = [free_port() for _ in range(n)]
    procs: list[subprocess.Popen] = []
    forwarders: list[threading.Thread] = []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tfpipe-workers-") as config_file:
        yaml.safe_dump(worker_cfg.model_dump(mode="json"), config_file)
        config_file.flush()
        log.info("starting %d local workers on 127.0.0.1 ports %s", n, ports)
        try:
            for i in range(n):
                proc = subprocess.Popen([sys.executable, "-m", "tasks.train.worker", config_file.name],
                                        env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
                procs.append(proc)
                forwarders.append(threading.Thread(target=_forward, args=(proc.stdout, f"[worker {i}] "), daemon=True))
                forwarders[-1].start()
            failed = _wait_for_workers(procs, cfg.train.collective_timeout_s + 30)
            for thread in forwarders:
                thread.join(timeout=5)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
    if failed is not None:
        raise PipelineError(f"local worker {failed[0]} failed (exit code {failed[1]}); see the [worker {failed[0]}] "
                            "lines above. Re-running resumes from the last checkpoint")
    manifest = find_published(cfg.artifacts.root, "train", fingerprint)
    if manifest is None:
        raise PipelineError(f"the local workers finished but published no model {fingerprint[:12]} under "
                            f"{cfg.artifacts.root}: see the [worker 0] lines above")
    return manifest
