"""Multi-worker training: real worker processes on loopback, a real kill, and the per-worker input split."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tasks.data.ingest import ingest
from tasks.data.reader import decode_batch, per_worker_dataset_fn
from tasks.distributed.cluster import free_port, worker_env
from tasks.model.published import load_model
from tests.conftest import REPO, finish, invoke_cli, make_config, run_cli, saved_epochs


def weight_digests(stderr: str) -> dict[int, str]:
    return {int(w): d for d, w in re.findall(r"final weights sha256 ([0-9a-f]{64}) \(worker (\d+)\)", stderr)}


def test_two_local_workers_train_identical_weights(tmp_path):
    """With the training options on (a plateau schedule, augmentation, balanced class weights), as teams run it.
    Three shard files over two workers: split by record, in equal parts (by file, one worker would run out of
    batches first and abort on an empty one)."""
    root = tmp_path / "artifacts"
    options = ["train.lr_schedule.name=plateau", "train.lr_schedule.patience=1", "data.augment.translation=0.1",
               "data.augment.rotation=0.05", "train.class_weight=balanced"]
    result = run_cli("train", "--set", f"artifacts.root={root}", "--set", "data.limit=400", "--set", "data.shards=3", "--set", "train.epochs=2",
                     "--set", "train.batch_size=32", "--set", "train.local_workers=2",
                     *[a for o in options for a in ("--set", o)], "--json", timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    artifact = json.loads(result.stdout)
    assert artifact["replicas"] == 2 and artifact["mode"] == "custom" and artifact["epochs"] == 2
    assert artifact["strategy"] == "MultiWorkerMirroredStrategy"
    digests = weight_digests(result.stderr)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    model = load_model(f"{artifact['uri']}/model.keras")
    assert model.predict(np.zeros((3, 28, 28, 1), np.float32), verbose=0).shape == (3, 10)
    assert [p.name for p in (root / "train").iterdir()] == [artifact["fingerprint"]]  # no worker leftovers


# by file (4 files, 2 workers), by record (3 files or 1 file, 2 workers); all batches, or whole global ones only
# (training, or 2 replicas on each worker: it hands its batches to them in turn)
@pytest.mark.parametrize("shards, drop_remainder, replicas", [(4, False, 2), (3, False, 2), (1, False, 2),
                                                              (3, True, 2), (4, False, 4)])
def test_workers_read_equal_parts_and_every_record_at_most_once(tmp_path, shards, drop_remainder, replicas):
    cfg = make_config(tmp_path, "data.limit=301", f"data.shards={shards}")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    count = dataset.counts["train"]
    assert count % 2 == 1  # the split cannot be even: a worker short of batches would get an empty one
    fn = per_worker_dataset_fn(dataset, "train", 16, shuffle_buffer=100, seed=3, label_mode="sparse",
                               drop_remainder=drop_remainder)
    seen, sizes = [], []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=replicas)
        batches = [x.numpy() for x, _ in fn(context)]
        sizes.append([len(b) for b in batches])
        seen.append(np.concatenate(batches))
    assert sizes[0] == sizes[1] and min(sizes[0]) > 0  # step by step the same batch size on every worker
    whole = drop_remainder or replicas > 2
    if whole:  # whole global batches only: each worker's share of every one of them
        assert set(sizes[0]) == {16 // replicas} and len(sizes[0]) == count // 16 * replicas // 2
    every = np.concatenate(seen)
    raw = tf.data.TFRecordDataset([f"{dataset.uri}/{n}" for n in dataset.shards["train"]]).batch(10000)
    stored = np.concatenate([decode_batch(s, dataset.image_shape)[0].numpy() for s in raw])
    key = lambda a: [r.tobytes() for r in a.reshape(len(a), -1)]  # noqa: E731
    assert len(set(key(every))) == len(every) and set(key(every)) <= set(key(stored))  # no record twice
    assert count - len(every) < (16 if whole else 2)  # less than a global batch, or than one per worker


def test_each_worker_augments_with_its_own_stream(tmp_path):
    from pipeline_config import AugmentConfig
    from tasks.data.augment import augment_pixels
    from tasks.data.reader import make_dataset, shard_paths

    cfg = make_config(tmp_path, "data.limit=200", "data.shards=1")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    augment = AugmentConfig(translation=0.1, rotation=0.05, zoom=0.1)
    common = dict(shuffle_buffer=None, seed=3, records=32)
    plain = next(iter(make_dataset(dataset, "train", 32, **common)))[0].numpy()
    first = next(iter(make_dataset(dataset, "train", 32, augment=augment, **common)))[0].numpy()
    stream1 = next(iter(make_dataset(dataset, "train", 32, augment=augment, augment_stream=1, **common)))[0].numpy()
    # one pipeline (no multi_worker) augments as it always did: batch 0 with the seed (seed, 0), nothing folded in
    as_before = augment_pixels(tf.constant(plain), tf.constant([3, 0], tf.int64), augment).numpy()
    # eager vs tf.data graph: float rounding only, which may tip a pixel's rounding to uint8 by one
    assert np.abs(first.astype(int) - as_before).max() <= 1
    first, stream1, plain = first.astype(int), stream1.astype(int), plain.astype(int)
    assert np.abs(first - plain).mean() > 2 and np.abs(stream1 - plain).mean() > 2
    assert np.abs(stream1 - first).mean() > 2  # the same images, other transforms
    # per_worker_dataset_fn gives pipeline i stream i: worker 1's batches are worker 1's stream
    fn = per_worker_dataset_fn(dataset, "train", 32, seed=3, augment=augment)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    worker1 = next(iter(fn(context)))[0].numpy()
    expected = make_dataset(dataset, "train", 16, seed=3, files=shard_paths(dataset, "train"), record_shard=(2, 1),
                            augment=augment, augment_stream=1)
    np.testing.assert_array_equal(worker1, next(iter(expected))[0].numpy())


def test_fit_with_multi_worker_is_rejected():
    code, _, err = invoke_cli("train", "--set", "train.strategy=multi_worker", "--set", "train.mode=fit")
    assert code == 2 and "keras-team/keras#20585" in err and "train.mode=custom" in err


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code, _, err = invoke_cli("train", "--set", f"artifacts.root={tmp_path}", "--set", "train.strategy=multi_worker")
    assert code == 1 and err.startswith("tfpipe: error: train.strategy=multi_worker needs TF_CONFIG") and "\n" == err[-1:]
    assert len(err.strip().splitlines()) == 1


BUSY_CHIEF = """
import sys, time
from pipeline_config import TrainConfig
from tasks.distributed.cluster import broadcast_text, lost_worker_errors, multi_worker_strategy, worker_role
from tasks.errors import PipelineError
cfg = TrainConfig(strategy="multi_worker", collective_timeout_s=2, worker_wait_s=float(sys.argv[1]))
strategy = multi_worker_strategy(cfg)
chief, _ = worker_role(strategy)
print("ready", flush=True)
if chief:
    time.sleep(float(sys.argv[2]))  # the chief's one-off work (an ingest, an export) outlasts the steps' timeout
try:
    with lost_worker_errors(cfg, during="ingest"):
        print(broadcast_text(strategy, "the-cache" if chief else None, cfg.worker_wait_s))
except PipelineError as exc:
    sys.exit(f"tfpipe: error: {exc}")
"""


def busy_chief(wait_s: float, busy_s: float) -> list[subprocess.Popen]:
    ports = [free_port(), free_port()]
    return [subprocess.Popen([sys.executable, "-c", BUSY_CHIEF, str(wait_s), str(busy_s)], cwd=REPO,
                             env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for i in range(2)]


def test_workers_wait_for_a_busy_chief_beyond_the_collective_timeout():
    """Outside training steps a worker waits train.worker_wait_s, not the steps' collective timeout (2 s here:
    with it, worker 1 would give up on the chief after 2 of its 10 busy seconds)."""
    procs = busy_chief(wait_s=120, busy_s=10)
    results = finish(procs, timeout=200)
    assert [p.returncode for p in procs] == [0, 0], results[1][1][-3000:]
    assert [out.strip() for out, _ in results] == ["ready\nthe-cache"] * 2


def test_a_chief_lost_while_the_others_wait_fails_them_at_once_not_after_the_wait():
    procs = busy_chief(wait_s=3600, busy_s=3600)
    try:
        assert procs[0].stdout.readline().strip() == "ready"  # the cluster is up: the chief gets to work
        os.killpg(procs[0].pid, signal.SIGKILL)
        _, err = procs[1].communicate(timeout=180)  # TensorFlow sees the peer gone: not the hour's wait
    finally:
        finish(procs, timeout=1)
    assert procs[1].returncode == 1
    assert err.strip().splitlines()[-1].startswith("tfpipe: error: worker 1 lost contact with worker 0 during ingest ("), err
    assert err.strip().endswith("; train.worker_wait_s 3600s. Relaunch the cluster: it resumes from the last checkpoint")


def test_killed_worker_fails_the_other_in_bounded_time_and_relaunch_resumes(tmp_path):
    root = tmp_path / "artifacts"
    sets = [f"artifacts.root={root}", "data.limit=1600", "train.epochs=3", "train.batch_size=64",
            "train.collective_timeout_s=30", "train.precision=float32"]
    cfg = make_config(root, *sets[1:], "train.strategy=multi_worker")
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--config", str(config)], cwd=REPO,
                              env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(2)]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(root.glob("train/.work-*/checkpoints/checkpoint")):
            for p in procs:
                assert p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        _, err = procs[0].communicate(timeout=30 + 90)  # the collective timeout, with slack: bounded, not forever
        assert procs[0].returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]  # one line, naming the lost worker and what to do
        assert last.startswith("tfpipe: error: worker 0 lost contact with worker 1 during training ("), err[-3000:]
        assert last.endswith("; collective timeout 30s. Relaunch the cluster: it resumes from the last checkpoint")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert not [p for p in (root / "train").iterdir() if not p.name.startswith(".")]  # nothing published
    done = saved_epochs(next(root.glob("train/.work-*/checkpoints/checkpoint")).read_text())

    ports = [free_port(), free_port()]  # the cluster relaunched, as an operator does: it resumes
    relaunched = [subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--config", str(config), "--json"],
                                   cwd=REPO, env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True) for i in range(2)]
    results = finish(relaunched, timeout=400)
    assert [p.returncode for p in relaunched] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    artifact = json.loads(results[0][0])
    assert 1 <= done < 3 and artifact["resumed_from_epoch"] == done
    history = json.load(open(f"{artifact['uri']}/history.json"))
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3]


def test_worker_without_the_shared_artifact_root_fails_fast(tmp_path):
    """Worker 1 runs in its own mount namespace with an empty filesystem over the artifact root: it cannot see
    the cache the chief names, as on a host without the shared filesystem."""
    root = tmp_path / "artifacts"
    root.mkdir()
    cfg = make_config(root, "data.limit=200", "train.epochs=1", "train.strategy=multi_worker",
                      "train.collective_timeout_s=30")
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ports = [free_port(), free_port()]
    train_cmd = f"{sys.executable} -m flows.cli train --config {config}"
    commands = [train_cmd.split(), ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {root} && exec {train_cmd}"]]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=worker_env(ports, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for i, cmd in enumerate(commands)]
    try:
        started = time.time()
        _, err = procs[1].communicate(timeout=120)
        assert procs[1].returncode == 1, err[-3000:]
        assert f"worker 1 cannot find the dataset cache {root}/ingest/" in err and "shared filesystem" in err
        assert time.time() - started < 60  # at once, not after a collective timeout
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
