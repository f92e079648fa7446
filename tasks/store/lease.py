"""Per-fingerprint leases on the artifact root: one run at a time builds a given stage output.

A second run of the same work (a scheduled run overlapping an on-demand one) waits, logging who holds the lease,
and then finds the first run's output published: a cache hit. A lease dies with its holder: the operating system
releases the lock of a killed process, so the next run takes it over and resumes from the checkpoints the dead
run left. Leases live in `<root>/.leases/` (`<stage>-<fingerprint>.lock`, and beside it a `.json` naming the
holder).

Local roots use flock on the `.lock` file, which its holder removes on release (and `.leases/`, and the root,
when that leaves them empty and this lease made them), so a run that was refused leaves the root as it found
it: only a killed holder leaves a lock file, which the next holder of that lease (or `tfpipe gc`) removes. A
waiter that locked a file its holder removed meanwhile finds the path gone or holding a new file, and tries
again. An object store has no locks: there the lease is an object
(`<root>/.leases/<stage>-<fingerprint>.json`) made with a conditional create, whose holder rewrites its heartbeat
every `HEARTBEAT_S`; a lease whose heartbeat is older than `STALE_S` belonged to a run that died, and is taken
over. A run on the same machine need not wait that long: the lease names the holder's machine (host, boot and pid
namespace), and where that is this one, a holder whose process is gone is taken over at once. Of several waiters
that find one dead lease, only one removes it (`take_over`); a holder checks that the lease is still its own
before each heartbeat and before removing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator

from tasks.store import storage

log = logging.getLogger("tfpipe.lease")

LEASES = ".leases"
HEARTBEAT_S = 20.0
STALE_S = 90.0


def this_machine() -> str | None:
    """Where a pid names one process: the host, the kernel's boot and the pid namespace (containers on one host
    share a boot but not a pid namespace). None where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_gone(info: dict) -> bool:
    """The lease's holder ran on this machine and its process no longer exists."""
    machine = this_machine()
    if machine is None or info.get("machine") != machine or not str(info.get("pid", "")).isdigit():
        return False  # elsewhere, or no pid recorded: not known to be gone
    return not pid_alive(int(info["pid"]))


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
    """Hold the lease of one stage output while building it; wait while another live run holds it, logging who
    holds it when the wait begins and every `log_every` s after."""
    if not storage.is_local(root):
        with _object_lease(root, stage, fingerprint, log_every):
            yield
        return
    path = lease_path(root, stage, fingerprint)
    made = [d for d in (root, os.path.dirname(path)) if not os.path.isdir(d)]
    lock = FileLease(f"{path}.lock")
    started, logged = time.monotonic(), -float("inf")
    while not lock.acquire():
        if time.monotonic() - logged >= log_every:
            logged = time.monotonic()
            log.info("%s %s: waiting for the run that is building it (%s); waited %.0fs", stage, fingerprint[:12],
                     holder(path), time.monotonic() - started)
        time.sleep(min(0.1, log_every))
    try:
        with open(f"{path}.json", "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.json")
        lock.release()
        storage.prune_empty(*reversed(made))  # only when empty: another run's lease or output keeps them


class FileLease:
    """An flock on a file that its holder removes on release. Between a waiter's open and its lock, the holder
    may remove the file (and a third run make a new one): the waiter holds the lease only if the path still
    names the file it locked."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (without waiting); True when taken."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # .leases/ not there (yet, or pruned by a run that just released)
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                mine = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                mine = False
            if mine:
                self.fd = fd
                return True
            os.close(fd)  # its holder removed it after our open: the lease is another file now

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still locked: a waiter on this file then finds the path gone
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def remove_free_lease(lock_path: str) -> bool:
    """Remove a lock file nobody holds (a killed holder's), the way a holder does; False when it is held."""
    lock = FileLease(lock_path)
    if not os.path.exists(lock_path) or not lock.acquire():
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{lock_path.removesuffix('.lock')}.json")
    lock.release()
    return True


@contextlib.contextmanager
def _object_lease(root: str, stage: str, fingerprint: str, log_every: float) -> Iterator[None]:
    path = storage.join(root, LEASES, f"{stage}-{fingerprint}.json")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "machine": this_machine(), "since": time.time(),
          "heartbeat": time.time(), "token": uuid.uuid4().hex}
    started, logged = time.monotonic(), -float("inf")
    while True:
        try:
            storage.write_json(path, me, create_only=True)
            break
        except FileExistsError:
            try:
                info = storage.read_json(path)
            except (FileNotFoundError, ValueError):
                continue  # released meanwhile
            silent = time.time() - info.get("heartbeat", 0)
            if silent > STALE_S or process_gone(info):
                why = f"no heartbeat for {silent:.0f}s" if silent > STALE_S else "its process is gone"
                if take_over(path, info):
                    log.warning("%s %s: took over the lease of pid %s on %s (%s)", stage, fingerprint[:12],
                                info.get("pid"), info.get("host"), why)
                    continue
            if time.monotonic() - logged >= log_every:
                logged = time.monotonic()
                log.info("%s %s: waiting for the run that is building it (pid %s on %s); waited %.0fs", stage,
                         fingerprint[:12], info.get("pid"), info.get("host"), time.monotonic() - started)
            time.sleep(min(1.0, log_every))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            if not _still_mine(path, me["token"]):
                log.warning("%s %s: another run took over this run's lease (its heartbeat was late); this run "
                            "goes on, and publishing stays all-or-nothing", stage, fingerprint[:12])
                return
            storage.write_json(path, {**me, "heartbeat": time.time()})

    heart = threading.Thread(target=beat, daemon=True, name="tfpipe-lease-heartbeat")
    heart.start()
    try:
        yield
    finally:
        stop.set()
        heart.join(timeout=5)
        if _still_mine(path, me["token"]):
            storage.remove(path)
        markers = os.path.basename(takeover_marker(path, ""))
        for name in storage.listdir(storage.join(root, LEASES)):
            if name.startswith(markers):
                storage.remove(storage.join(root, LEASES, name))


def take_over(path: str, dead: dict) -> bool:
    """Remove the lease `dead` (read from `path`) of a holder that is gone, unless another waiter does. S3 has no
    delete-if-unchanged everywhere, so waiters race for a marker named after that lease (create-only): only its
    creator deletes the lease. A second waiter that read the same dead lease cannot then delete the lease the
    first one makes next. The markers go when the next holder releases."""
    marker = takeover_marker(path, dead.get("token") or f"{dead.get('pid')}-{dead.get('since')}")
    try:
        storage.write_json(marker, {"pid": os.getpid(), "host": socket.gethostname(), "at": time.time()},
                           create_only=True)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            if time.time() - storage.read_json(marker)["at"] > STALE_S:
                storage.remove(marker)  # its maker died before removing the lease: the waiters race again
        return False
    storage.remove(path)
    return True


def takeover_marker(path: str, token: str) -> str:
    """The marker of the lease at `path` whose token is `token`, beside it."""
    return f"{path.removesuffix('.json')}.takeover-{token}"


def _still_mine(path: str, token: str) -> bool:
    try:
        return storage.read_json(path).get("token") == token
    except (FileNotFoundError, ValueError):
        return False


def is_held(root: str, stage: str, fingerprint: str) -> bool:
    """Whether a live run holds this lease now (for clean-up, which must leave running work alone)."""
    if not storage.is_local(root):
        return False
    try:
        fd = os.open(f"{lease_path(root, stage, fingerprint)}.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this probe took
    return False
