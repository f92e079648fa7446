"""Per-fingerprint leases on the artifact root: one run at a time builds a given stage output.

A second run of the same work (a scheduled run overlapping an on-demand one) waits, logging who holds the lease,
and then finds the first run's output published: a cache hit. A lease dies with its holder: the operating system
releases the lock of a killed process, so the next run takes it over and resumes from the checkpoints the dead
run left. Leases live in `<root>/.leases/` (`<stage>-<fingerprint>.lock`, and beside it a `.json` naming the
holder); `tfpipe gc` removes the ones nobody holds.

Local roots use `filelock` (flock). A root on an object store has no flock: there the same `stage_lease` will
hold a lease object with a heartbeat, taken over when the heartbeat is older than a timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Iterator

from filelock import FileLock, Timeout

log = logging.getLogger("tfpipe.lease")

LEASES = ".leases"


def lease_path(root: str, stage: str, fingerprint: str) -> str:
    return os.path.join(root, LEASES, f"{stage}-{fingerprint}")


def holder(path: str) -> str:
    """Who holds the lease at `path`, as its holder recorded it."""
    try:
        with open(f"{path}.json") as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']}, for {time.time() - info['since']:.0f}s"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


@contextlib.contextmanager
def stage_lease(root: str, stage: str, fingerprint: str, log_every: float = 30.0) -> Iterator[None]:
    """Hold the lease of one stage output while building it; wait (logging every `log_every` s) while another
    live run holds it."""
    if "://" in root:
        yield  # object stores: the heartbeat lease comes with the object-store root
        return
    path = lease_path(root, stage, fingerprint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(f"{path}.lock")
    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=log_every)
            break
        except Timeout:
            log.info("%s %s: waiting for the run that is building it (%s); waited %.0fs", stage, fingerprint[:12],
                     holder(path), time.monotonic() - started)
    try:
        with open(f"{path}.json", "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.json")
        lock.release()


def is_held(root: str, stage: str, fingerprint: str) -> bool:
    """Whether a live run holds this lease now (for clean-up, which must leave running work alone)."""
    if "://" in root:
        return False
    path = f"{lease_path(root, stage, fingerprint)}.lock"
    if not os.path.exists(path):
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
