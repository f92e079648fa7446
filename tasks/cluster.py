"""Training across several processes or hosts with MultiWorkerMirroredStrategy.

Each host runs one worker: `tfpipe train --set train.strategy=multi_worker` with its TF_CONFIG. The chief
(worker 0) ingests and names the dataset cache to the others; every worker trains the custom loop on its own
part of the cache; the chief publishes the model. All workers must see the same `artifacts.root`.
`train.local_workers=N` starts N such workers on this machine's loopback (for trying it out and for tests).
"""

from __future__ import annotations

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

from pipeline_config import PipelineConfig
from tasks.artifacts import DatasetArtifact, ModelArtifact
from tasks.errors import PipelineError

log = logging.getLogger("tfpipe.cluster")

LOST_WORKER_ERRORS = ("UnavailableError", "DeadlineExceededError", "CancelledError", "InternalError", "AbortedError")


def train_multi_worker(cfg: PipelineConfig, on_epoch=None) -> tuple[DatasetArtifact, ModelArtifact]:
    """One worker's part of a multi-worker training run (this process's TF_CONFIG says which)."""
    from tasks.devices import broadcast_text, make_strategy, worker_role
    from tasks.ingest import dataset_artifact, ingest
    from tasks.artifacts import read_manifest
    from tasks.train import train

    strategy = make_strategy(cfg.train)  # before any other TensorFlow op of the process
    chief, index = worker_role(strategy)
    try:
        named = None
        if chief:
            try:
                named = ingest(cfg.data, cfg.artifacts.root).uri
            except PipelineError as exc:
                broadcast_text(strategy, "error:" + str(exc)[:900], size=1024)
                raise
        named = broadcast_text(strategy, named, size=1024)
        if named.startswith("error:"):
            raise PipelineError(f"worker {index}: the chief could not ingest the data ({named[6:]})")
        manifest = read_manifest(named)
        if manifest is None:
            raise PipelineError(f"worker {index} cannot find the dataset cache {named} that the chief named: every "
                                "worker must see the same artifacts.root (a shared filesystem path)")
        dataset = dataset_artifact(named, manifest, cache_hit=True)
        return dataset, train(cfg, dataset, on_epoch, strategy=strategy)
    except Exception as exc:
        if type(exc).__name__ in LOST_WORKER_ERRORS:
            raise PipelineError(lost_worker_message(exc, index, cfg.train.collective_timeout_s)) from None
        raise


def lost_worker_message(exc: Exception, index: int, timeout: float) -> str:
    peers = sorted({int(t) for t in re.findall(r"/job:worker/replica:0/task:(\d+)", str(exc))} - {index})
    who = ", ".join(f"worker {p}" for p in peers) if peers else "a peer worker"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"worker {index} lost contact with {who} during training ({type(exc).__name__}: {first}); "
            f"collective timeout {timeout:g}s. Relaunch the cluster: it resumes from the last checkpoint")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(ports: list[int], index: int) -> dict[str, str]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}


def _forward(stream, prefix: str, sink) -> None:
    for line in stream:
        sink.write(f"{prefix}{line}")
        sink.flush()


def run_local_workers(cfg: PipelineConfig) -> ModelArtifact:
    """Start `train.local_workers` worker processes on loopback ports, wait for all, return the chief's artifact.

    Each worker reads this config (with train.strategy=multi_worker) from a temporary file. If a worker fails,
    the others get the collective timeout to fail too, then are stopped.
    """
    import yaml

    n = cfg.train.local_workers
    worker_cfg = cfg.model_copy(deep=True)
    worker_cfg.train.strategy, worker_cfg.train.local_workers = "multi_worker", None
    ports = [free_port() for _ in range(n)]
    procs, outputs, threads = [], [], []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tfpipe-workers-") as config_file:
        yaml.safe_dump(worker_cfg.model_dump(mode="json"), config_file)
        config_file.flush()
        args = [sys.executable, "-m", "flows.cli", "train", "--json", "--config", config_file.name]
        log.info("starting %d local workers on 127.0.0.1 ports %s", n, ports)
        try:
            for i in range(n):
                proc = subprocess.Popen(args, env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
                procs.append(proc)
                outputs.append([])
                threads.append(threading.Thread(target=_forward, args=(proc.stderr, f"[worker {i}] ", sys.stderr), daemon=True))
                threads.append(threading.Thread(target=lambda p=proc, o=outputs[i]: o.extend(p.stdout), daemon=True))
            for t in threads:
                t.start()
            failed: tuple[int, int] | None = None
            deadline = None
            while any(p.poll() is None for p in procs):
                for i, p in enumerate(procs):
                    if p.poll() not in (None, 0) and failed is None:
                        failed = (i, p.returncode)
                        deadline = time.time() + cfg.train.collective_timeout_s + 30
                if deadline and time.time() > deadline:
                    break
                time.sleep(0.2)
            for t in threads:
                t.join(timeout=5)
            codes = [p.poll() for p in procs]
            if failed is None and all(c == 0 for c in codes):
                return ModelArtifact.model_validate_json("".join(outputs[0]))
            i, code = failed or next((i, c) for i, c in enumerate(codes) if c != 0)
            raise PipelineError(f"local worker {i} failed (exit code {code}); see the [worker {i}] lines above. "
                                "Re-running resumes from the last checkpoint")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
