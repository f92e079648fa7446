"""Two runs of the same work at once on one artifact root: one builds, the other waits and reuses it."""

import json
import subprocess
import sys
import threading
import time

from tasks.lease import holder, is_held, lease_path, stage_lease
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
