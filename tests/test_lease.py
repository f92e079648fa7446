"""Two runs of the same work at once on one artifact root: one builds, the other waits and reuses it."""

import json
import os
import subprocess
import sys
import threading
import time

from tasks import storage
from tasks.lease import STALE_S, holder, is_held, lease_path, process_gone, stage_lease, take_over, this_machine
from tests.conftest import REPO


def test_two_concurrent_train_processes_train_once(root):
    args = [sys.executable, "-m", "flows.cli", "train", "--json", "--set", f"artifacts.root={root}",
            "--set", "data.limit=1500", "--set", "train.epochs=2", "--set", "train.batch_size=64"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    artifacts = [json.loads(out) for out, _ in results]
    assert sorted(a["cache_hit"] for a in artifacts) == [False, True]  # one trained, one reused
    assert artifacts[0]["fingerprint"] == artifacts[1]["fingerprint"]
    assert sum("epoch 2/2:" in err for _, err in results) == 1  # only one of them trained
    published = [p.name for p in (root / "train").iterdir()]
    assert published == [artifacts[0]["fingerprint"]]  # one model, no work or temp dirs left


def test_a_waiting_run_logs_who_holds_the_lease_and_a_dead_holder_frees_it(tmp_path, caplog):
    root, fp = str(tmp_path), "f" * 64
    holder_script = (f"import time; from tasks.lease import stage_lease\n"
                     f"with stage_lease({root!r}, 'train', {fp!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder_script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert is_held(root, "train", fp) and holder(lease_path(root, "train", fp)).startswith(f"pid {proc.pid} on ")
        threading.Timer(1.0, proc.kill).start()  # the holder dies without releasing: the OS frees its lock
        started = time.monotonic()
        with caplog.at_level("INFO", logger="tfpipe"), stage_lease(root, "train", fp, log_every=0.2):
            waited = time.monotonic() - started
            assert 0.9 < waited < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"train ffffffffffff: waiting for the run that is building it (pid {proc.pid} on " in caplog.text
    assert not is_held(root, "train", fp)


def test_an_object_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(s3, caplog):
    """A bucket has no locks that die with their holder: the lease names the holder's machine, and a run on the
    same machine takes over from a process that is gone instead of waiting STALE_S for its heartbeat to age."""
    root, fp = "s3://tfp/leases", "d" * 64
    holder_script = (f"import time; from tasks.lease import stage_lease\n"
                     f"with stage_lease({root!r}, 'train', {fp!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder_script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        lease = storage.join(root, ".leases", f"train-{fp}.json")
        assert storage.read_json(lease)["machine"] == this_machine()
        threading.Timer(1.0, lambda: (proc.kill(), proc.wait())).start()  # killed: it cannot remove its lease
        started = time.monotonic()
        with caplog.at_level("INFO", logger="tfpipe"), stage_lease(root, "train", fp, log_every=0.2):
            waited = time.monotonic() - started
            assert storage.read_json(lease)["pid"] == os.getpid()
        assert 0.9 < waited < STALE_S / 3
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"waiting for the run that is building it (pid {proc.pid} on " in caplog.text
    assert f"took over the lease of pid {proc.pid} on " in caplog.text and "(its process is gone)" in caplog.text
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


def test_a_holder_whose_lease_was_taken_over_neither_beats_over_nor_removes_the_new_one(s3, monkeypatch, caplog):
    """A holder that stalled past STALE_S was taken over: its heartbeat and its release leave the new lease."""
    monkeypatch.setattr("tasks.lease.HEARTBEAT_S", 0.1)
    root, fp = "s3://tfp/leases", "b" * 64
    lease = storage.join(root, ".leases", f"train-{fp}.json")
    with caplog.at_level("INFO", logger="tfpipe"), stage_lease(root, "train", fp):
        newer = {**storage.read_json(lease), "pid": 2, "host": "elsewhere", "token": "newer"}
        storage.write_json(lease, newer)
        time.sleep(0.5)
        assert storage.read_json(lease) == newer
    assert storage.read_json(lease) == newer
    assert "another run took over this run's lease" in caplog.text
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
