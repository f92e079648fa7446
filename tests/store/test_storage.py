"""Artifacts in a bucket: every stage and both flows against real S3 (moto) and GCS (gcp-storage-emulator)
servers on loopback ports, started here."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tasks.store import storage
from tests.conftest import MNIST, REPO, LineWatch, finish, invoke_cli, saved_epochs

TINY = {"data.limit": 300, "train.epochs": 1, "train.batch_size": 50, "evaluate.min_accuracy": 0.05}


def sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator with the bucket `tfg`; STORAGE_EMULATOR_HOST points gcsfs at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", "tfg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc.kill()
    proc.wait()


def test_training_and_prediction_flows_on_an_s3_root(prefect_server, s3, tmp_path, monkeypatch):
    from flows.prediction import batch_prediction
    from flows.training import training_pipeline
    from tests.flows.test_flows import task_states

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    root = "s3://tfp/flow"
    overrides = {**TINY, "artifacts.root": root, "artifacts.local_cache": str(tmp_path / "cache")}
    state = training_pipeline(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.model.uri.startswith(f"{root}/train/") and summary.evaluation.blessed
    assert set(task_states(state.state_details.flow_run_id).values()) == {"Completed"}
    listed = storage.files_under(root)
    assert "champion.json" in listed and any(k.startswith("train/") and k.endswith("model.keras") for k in listed)
    assert not any(k.startswith("train/.work-") for k in listed)  # the work dir's mirror is gone once published

    out = "s3://tfp/served/preds.parquet"
    prediction = batch_prediction(model="champion", input=str(MNIST / "test.parquet"), output=out, overrides=overrides)
    assert prediction.rows == 10000 and prediction.model_fingerprint == summary.model.fingerprint
    with storage.open_file(out) as f:
        assert pq.read_table(f).num_rows == 10000

    again = training_pipeline(overrides=overrides, return_state=True)
    states = task_states(again.state_details.flow_run_id)
    assert states["ingest"] == states["train"] == states["predict"] == "Cached", states
    assert os.listdir(tmp_path) == ["cache"]


def test_ingest_train_evaluate_predict_on_a_gcs_root(gcs, tmp_path):
    root = "gs://tfg/run"
    args = sets({**TINY, "artifacts.root": root, "artifacts.local_cache": str(tmp_path / "cache"),
                 "export.formats": "[saved_model]"})
    code, out, err = invoke_cli("evaluate", *args, "--json")
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["blessed"] and evaluation["uri"].startswith(f"{root}/evaluate/")
    output = "gs://tfg/out/preds.parquet"
    code, out, err = invoke_cli("predict", *args, "--input", str(MNIST / "test.parquet"), "--output", output, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 10000
    with storage.open_file(output) as f:
        assert pq.read_table(f).column("predicted_label").to_numpy().shape == (10000,)
    code, out, _ = invoke_cli("ingest", *args, "--json")
    assert json.loads(out)["cache_hit"] is True
    # a format added to the published model in the bucket: its files, then the manifest that lists them
    model_uri = f"{root}/train/{evaluation['model_fingerprint']}"
    code, out, err = invoke_cli("export", *args, "--model", evaluation["model_fingerprint"], "--format", "onnx")
    assert code == 0, err
    from tasks.store.publish import read_manifest

    manifest, listed = read_manifest(model_uri), storage.files_under(model_uri)
    assert manifest is not None and set(manifest["exports"]) == {"saved_model", "onnx"}
    assert manifest["files"]["model.onnx"] == listed["model.onnx"] > 0
    assert {"model_card.md", "model_card.json", "model_card_confusion_matrix.png"} <= set(listed)


def test_killed_on_one_machine_resumes_on_another_with_an_empty_scratch(s3, tmp_path, monkeypatch, caplog):
    root = "s3://tfp/resume"
    common = {"artifacts.root": root, "data.limit": 2000, "train.epochs": 3, "train.batch_size": 64,
              "train.precision": "float32"}
    first = tmp_path / "machine-a"
    first.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", *sets({**common, "artifacts.local_cache": first / "cache"})],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            mirrored = [k for k in storage.files_under(f"{root}/train") if k.endswith("checkpoints/checkpoint")]
            if mirrored:
                break
            time.sleep(0.1)
        assert mirrored, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with storage.open_file(f"{root}/train/{mirrored[0]}", "r") as f:
        done = saved_epochs(f.read())  # what the bucket's copy of the killed run's work dir holds
    second = tmp_path / "machine-b"
    second.mkdir()
    monkeypatch.chdir(second)  # another machine: another working directory, an empty local cache
    with caplog.at_level("INFO", logger="tfpipe"):
        code, out, err = invoke_cli("train", "--json", *sets({**common, "artifacts.local_cache": second / "cache"}))
    assert code == 0, err
    artifact = json.loads(out)
    assert 1 <= done < 3 and artifact["resumed_from_epoch"] == done, caplog.text[-3000:]
    assert "fetched the checkpoints of an earlier run" in caplog.text
    assert "(its process is gone)" in caplog.text  # the lease of the killed run, on this same host: no 90 s wait
    assert [h["epoch"] for h in storage.read_json(f"{artifact['uri']}/history.json")["epochs"]] == [1, 2, 3]


def test_two_concurrent_publishes_of_one_fingerprint_leave_one_complete_output(s3, tmp_path):
    """Two processes publish one fingerprint at once. The one that takes the lease writes until the test opens
    the barrier (a file), which it does once the other has logged that it waits on that lease: the two overlap,
    every time, and the waiter then reuses the writer's output."""
    script = """
import os, sys, time
from tasks import configure_logging
from tasks.store.publish import reuse_or_publish
configure_logging()
who, barrier = sys.argv[1], sys.argv[2]
def write(out):
    open(f"{out}/data.txt", "w").write(who * 1000)
    open(f"{barrier}.writer-{who}", "w").close()
    while not os.path.exists(barrier):
        time.sleep(0.02)
    return {"writer": who}
p = reuse_or_publish("s3://tfp/race", "stage", "f" * 64, write)
print(p.cache_hit, p.manifest["writer"])
"""
    barrier = tmp_path / "go"
    procs = {who: subprocess.Popen([sys.executable, "-c", script, who, str(barrier)], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for who in "ab"}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("go.writer-*")):
            assert all(p.poll() is None for p in procs.values())
            time.sleep(0.02)
        writer = next(tmp_path.glob("go.writer-*")).name[-1]
        waiter = "b" if writer == "a" else "a"
        LineWatch(procs[waiter].stderr).wait_for("stage ffffffffffff: waiting for the run that is building it")
        barrier.touch()  # the waiter found the lease held: now the writer may finish
        outs = {who: p.stdout.read() for who, p in procs.items()}
        for p in procs.values():
            p.wait(timeout=120)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs.values()), outs
    assert {who: out.split() for who, out in outs.items()} == {writer: ["False", writer], waiter: ["True", writer]}
    manifest = storage.read_json(f"s3://tfp/race/stage/{'f' * 64}/manifest.json")
    with storage.open_file(f"s3://tfp/race/stage/{'f' * 64}/data.txt", "r") as f:
        assert f.read() == manifest["writer"] * 1000  # the files are the committed writer's, whole
    assert not [k for k in storage.files_under("s3://tfp/race") if k.startswith(".leases/")]


def test_a_multi_worker_run_needs_only_the_bucket(s3, tmp_path):
    """Two workers with their own local disks (HOME, so each its own artifacts.local_cache) and one bucket."""
    from tasks.distributed.cluster import free_port, worker_env

    ports = [free_port(), free_port()]
    args = [sys.executable, "-m", "flows.cli", "train", *sets({**TINY, "artifacts.root": "s3://tfp/mw",
                                                                "train.strategy": "multi_worker", "train.batch_size": 40})]
    procs = []
    for i in range(2):
        home = tmp_path / f"host{i}"
        home.mkdir()
        procs.append(subprocess.Popen(args, cwd=REPO, env={**worker_env(ports, i), "HOME": str(home)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    results = finish(procs, timeout=300)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    digests = {line.split("sha256 ")[1][:64] for _, err in results for line in err.splitlines() if "final weights sha256" in line}
    assert len(digests) == 1
    assert all((tmp_path / f"host{i}" / ".cache" / "tfpipe" / "ingest").is_dir() for i in range(2))  # each staged its own


@pytest.mark.parametrize("problem", ["no bucket", "no credentials"])
def test_a_wrong_bucket_or_missing_credentials_is_one_line(s3, tmp_path, problem):
    env = {**os.environ}
    root = "s3://tfp/creds"
    if problem == "no bucket":
        root = "s3://no-such-bucket/x"
    else:
        env.pop("AWS_ACCESS_KEY_ID")
        env.pop("AWS_SECRET_ACCESS_KEY")
        env["HOME"] = str(tmp_path)  # no ~/.aws either
    result = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--set", f"artifacts.root={root}",
                             "--set", "data.limit=50"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    if problem == "no bucket":
        assert lines[0] == f"tfpipe: error: artifacts.root {root}: the bucket does not exist: create it, or fix the URL"
    else:
        assert lines[0].startswith(f"tfpipe: error: artifacts.root {root} cannot be reached (NoCredentialsError")
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in lines[0]
    assert not storage.files_under("s3://tfp/creds")


def test_files_another_process_writes_are_seen_after_a_listing(s3):
    """s3fs keeps the listings it made and answers `open`, `info` and `ls` from them: a manifest or a checkpoint
    that another process writes after this one listed the prefix must still be found (a run waiting on a lease,
    `tfpipe serve`)."""
    from s3fs import S3FileSystem

    storage.write_json("s3://tfp/seen/d/first.json", {"n": 1})
    assert set(storage.files_under("s3://tfp/seen")) == {"d/first.json"}  # this process has listed d/ now
    S3FileSystem(skip_instance_cache=True).pipe_file("tfp/seen/d/second.json", b'{"n": 2}')  # another client
    assert storage.read_json("s3://tfp/seen/d/second.json") == {"n": 2}
    assert storage.listdir("s3://tfp/seen/d") == ["first.json", "second.json"] and storage.exists("s3://tfp/seen/d/second.json")
