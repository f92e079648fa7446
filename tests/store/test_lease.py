"""Two runs of the same work at once on one artifact root: one builds, the other waits and reuses it."""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from tasks.store import storage
from tasks.store.lease import STALE_S, holder, is_held, lease_path, process_gone, stage_lease, take_over, this_machine
from tests.conftest import REPO, LineWatch


def test_two_concurrent_train_processes_train_once(root):
    """A second run of the same work while the first trains: the first is paused (SIGSTOP) while it holds the
    train lease, so that the second meets it there every time; it goes on once the second logs that it waits."""
    args = [sys.executable, "-m", "flows.cli", "train", "--json", "--set", f"artifacts.root={root}",
            "--set", "data.limit=300", "--set", "train.epochs=2", "--set", "train.batch_size=64"]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.time() + 240
        held = []
        while time.time() < deadline and not held:
            assert first.poll() is None, first.communicate()[1][-3000:]
            held = [p for p in (root / ".leases").glob("train-*.lock")
                    if is_held(str(root), "train", p.name.removeprefix("train-").removesuffix(".lock"))]
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # training, under its lease
        second = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting = LineWatch(second.stderr).wait_for(r"tfpipe.lease: train \w+: waiting for the run that is building it")
        assert f"(pid {first.pid} on " in waiting
        first.send_signal(signal.SIGCONT)
        results = [p.communicate(timeout=400) if p is first else (p.stdout.read(), "") for p in (first, second)]
        second.wait(timeout=400)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert first.returncode == 0 and second.returncode == 0, results[0][1][-3000:]
    trained, reused = (json.loads(out) for out, _ in results)
    assert (trained["cache_hit"], reused["cache_hit"]) == (False, True) and trained["fingerprint"] == reused["fingerprint"]
    published = [p.name for p in (root / "train").iterdir()]
    assert published == [trained["fingerprint"]]  # one model, no work or temp dirs left


class KillOnWaiting(logging.Handler):
    """Kills the lease's holder when the waiting run logs that it waits (a real event, not a timer)."""

    def __init__(self, proc):
        super().__init__()
        self.proc, self.messages = proc, []

    def emit(self, record):
        self.messages.append(record.getMessage())
        if "waiting for the run that is building it" in record.getMessage() and self.proc.poll() is None:
            self.proc.kill()  # dies without releasing: the OS frees its lock, a bucket lease stays behind
            self.proc.wait()


def test_a_waiting_run_logs_who_holds_the_lease_and_a_dead_holder_frees_it(tmp_path):
    root, fp = str(tmp_path), "f" * 64
    proc = hold_in_a_subprocess(root, fp)
    try:
        assert is_held(root, "train", fp) and holder(lease_path(root, "train", fp)).startswith(f"pid {proc.pid} on ")
        watch = KillOnWaiting(proc)
        with logged_to(watch), stage_lease(root, "train", fp):
            assert proc.poll() is not None  # this run got the lease only once the holder had died
    finally:
        if proc.poll() is None:
            proc.kill()
    assert watch.messages[0].startswith(f"train ffffffffffff: waiting for the run that is building it (pid {proc.pid} on ")
    assert not is_held(root, "train", fp)


def hold_in_a_subprocess(root: str, fp: str) -> subprocess.Popen:
    """A process that holds the train lease of `fp` under `root` until it is killed."""
    script = (f"import time; from tasks.store.lease import stage_lease\n"
              f"with stage_lease({root!r}, 'train', {fp!r}):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@contextlib.contextmanager
def logged_to(handler: logging.Handler):
    logger = logging.getLogger("tfpipe")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def test_an_object_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(s3):
    """A bucket has no locks that die with their holder: the lease names the holder's machine, and a run on the
    same machine takes over from a process that is gone instead of waiting STALE_S for its heartbeat to age."""
    root, fp = "s3://tfp/leases", "d" * 64
    proc = hold_in_a_subprocess(root, fp)
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    try:
        assert storage.read_json(lease)["machine"] == this_machine()
        watch = KillOnWaiting(proc)  # killed: it cannot remove its lease, whose heartbeat is still fresh
        with logged_to(watch), stage_lease(root, "train", fp):
            assert storage.read_json(lease)["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert watch.messages[0].startswith(f"train dddddddddddd: waiting for the run that is building it (pid {proc.pid} on ")
    took_over = [m for m in watch.messages if m.startswith("train dddddddddddd: took over the lease")]
    assert len(took_over) == 1 and f"of pid {proc.pid} on " in took_over[0] and took_over[0].endswith("(its process is gone)")
    assert not storage.exists(lease)


def test_an_object_lease_of_another_machine_is_taken_over_only_once_its_heartbeat_is_stale(s3, caplog):
    root, fp = "s3://tfp/leases", "e" * 64
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {"pid": int(dead.stdout), "host": "elsewhere", "since": time.time() - 300}
    # its pid means nothing here: only the heartbeat tells; a fresh one is a live run elsewhere
    assert not process_gone({**gone, "machine": "elsewhere/boot/pid:[1]"})
    assert process_gone({**gone, "machine": this_machine()})
    assert not process_gone({"pid": os.getpid(), "machine": this_machine()})  # alive
    storage.write_json(lease, {**gone, "machine": "elsewhere/boot/pid:[1]", "heartbeat": time.time() - STALE_S - 5})
    with caplog.at_level("INFO", logger="tfpipe"), stage_lease(root, "train", fp, log_every=0.2):
        assert storage.read_json(lease)["pid"] == os.getpid()
    assert f"took over the lease of pid {gone['pid']} on elsewhere (no heartbeat for 9" in caplog.text


def test_two_waiters_that_read_one_dead_lease_leave_one_holder(s3):
    """Both waiters find the same dead lease; the first takes it over and makes its own. The second, acting on
    what it read before, must not delete the first one's lease (three runs of one fingerprint at once)."""
    root, fp = "s3://tfp/leases", "a" * 64
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    storage.write_json(lease, {"pid": 1, "host": "elsewhere", "machine": "elsewhere/boot/pid:[1]", "token": "dead",
                               "since": time.time() - 300, "heartbeat": time.time() - STALE_S - 5})
    read_by_first, read_by_second = storage.read_json(lease), storage.read_json(lease)
    assert take_over(lease, read_by_first)
    with stage_lease(root, "train", fp):
        held = storage.read_json(lease)
        assert held["pid"] == os.getpid() and held["token"] != "dead"
        assert not take_over(lease, read_by_second)
        assert storage.read_json(lease) == held
    assert storage.listdir(storage.join(root, ".leases")) == []  # the lease and the takeover marker are gone


def test_a_holder_whose_lease_was_taken_over_neither_beats_over_nor_removes_the_new_one(s3, monkeypatch):
    """A holder that stalled past STALE_S was taken over: its heartbeat and its release leave the new lease."""
    monkeypatch.setattr("tasks.store.lease.HEARTBEAT_S", 0.1)  # how often it looks; the test waits for what it says
    root, fp = "s3://tfp/leases", "b" * 64
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    noticed = threading.Event()

    class Noticed(logging.Handler):
        def emit(self, record):
            if "another run took over this run's lease" in record.getMessage():
                noticed.set()

    with logged_to(Noticed()), stage_lease(root, "train", fp):
        newer = {**storage.read_json(lease), "pid": 2, "host": "elsewhere", "token": "newer"}
        storage.write_json(lease, newer)
        assert noticed.wait(timeout=60)  # its next heartbeat found the lease not its own, and left it
        assert storage.read_json(lease) == newer
    assert storage.read_json(lease) == newer  # nor did its release remove it
    storage.remove(lease)


def test_a_takeover_marker_whose_maker_died_before_removing_the_lease_is_raced_for_again(s3):
    root, fp = "s3://tfp/leases", "c" * 64
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    dead = {"pid": 1, "host": "elsewhere", "token": "dead", "since": 0, "heartbeat": 0}
    storage.write_json(lease, dead)
    marker = storage.join(root, ".leases", f"train-{fp}.takeover-dead")
    storage.write_json(marker, {"pid": 3, "host": "elsewhere", "at": time.time() - 5})
    assert not take_over(lease, dead) and storage.exists(marker)  # its maker may be removing the lease now
    storage.write_json(marker, {"pid": 3, "host": "elsewhere", "at": time.time() - STALE_S - 5})
    assert not take_over(lease, dead) and not storage.exists(marker)  # it died: the marker goes
    assert take_over(lease, dead) and not storage.exists(lease)
    storage.remove(marker)
