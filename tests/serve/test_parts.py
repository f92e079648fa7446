"""Batch prediction on a Dask cluster (prefect-dask, a real LocalCluster of processes, a real Prefect server): one
task per input file, resumable per file, a killed worker and a corrupt file handled. The tests that kill no
worker share one cluster (`predict.dask_address`); the killed-worker and CLI tests start their own, as the
engine does without an address."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

from tasks.store import storage
from tests.conftest import MNIST, copy_of, run_cli

DASK = {"predict.engine": "dask", "predict.dask_workers": 2}


@pytest.fixture(scope="module")
def dask_address(prefect_server):
    """A LocalCluster of two worker processes whose task runs report to the session's Prefect server."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"PREFECT_API_URL": prefect_server})
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def blessed(trained, tmp_path_factory):
    from tasks.evaluate.stage import evaluate

    cfg, dataset, model = copy_of(trained, tmp_path_factory.mktemp("parts") / "artifacts")
    assert evaluate(cfg, dataset, model).blessed
    return cfg, model


def split_inputs(directory, files: int, rows: int):
    directory.mkdir()
    table = pq.read_table(MNIST / "test.parquet").slice(0, files * rows)
    table = table.append_column("sample_id", pa.array([f"s{i}" for i in range(len(table))]))
    for i in range(files):
        pq.write_table(table.slice(i * rows, rows), directory / f"batch-{i:02d}.parquet")
    return table


def overrides(cfg, address: str | None, **extra):
    """The Dask engine on the shared cluster at `address`, or (None) on a LocalCluster of its own."""
    return {"artifacts.root": cfg.artifacts.root, "predict.key_columns": ["sample_id"], **DASK,
            **({"predict.dask_address": address} if address else {}), **extra}


def test_twenty_files_on_two_workers_equal_the_local_engine(prefect_server, dask_address, blessed, tmp_path):
    from flows.prediction import batch_prediction
    from tasks.serve.predict import predict
    from tests.flows.test_flows import api

    cfg, model = blessed
    table = split_inputs(tmp_path / "in", 20, 50)
    out = tmp_path / "out"
    started = time.time()
    state = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out),
                             overrides=overrides(cfg, dask_address), return_state=True)
    assert state.is_completed(), state.message
    manifest = storage.read_json(str(out / "_manifest.json"))
    assert manifest["complete"] and manifest["rows"] == 1000 and len(manifest["parts"]) == 20
    assert sorted(p.name for p in out.iterdir()) == ["_drift.json", "_manifest.json"] + [
        f"part-batch-{i:02d}.parquet" for i in range(20)]
    drift = json.loads((out / "_drift.json").read_text())  # the parts' inputs merged into one report
    assert drift["images"] == 1000 and manifest["drift"] == drift["drift"] and "brightness_histogram" in drift["figures"]
    scored = pq.read_table(out).sort_by("sample_id")  # the directory as one Parquet dataset
    assert scored.num_rows == 1000 and len(set(scored.column("sample_id").to_pylist())) == 1000  # each row once
    first = pq.read_table(out / "part-batch-03.parquet")
    assert first.column("sample_id").to_pylist() == [f"s{i}" for i in range(150, 200)]  # input order kept
    local_cfg = cfg.model_copy(deep=True)
    local_cfg.predict.key_columns = ["sample_id"]
    src = tmp_path / "all.parquet"
    pq.write_table(table, src)
    local = pq.read_table(predict(local_cfg, "champion", str(src), str(tmp_path / "local.parquet")).output).sort_by("sample_id")
    np.testing.assert_array_equal(scored.column("predicted_label").to_numpy(), local.column("predicted_label").to_numpy())
    np.testing.assert_allclose(np.array(scored.column("probabilities").to_pylist()),
                               np.array(local.column("probabilities").to_pylist()), atol=1e-6)
    children = api(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=False))))
    subflow = [r for r in children if r.name and r.start_time and r.start_time.timestamp() >= started][0]
    per_file = api(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [subflow.id]})))
    assert sorted(r.name.rsplit("-", 1)[0] for r in per_file) == ["predict-file"] * 20  # one task run per file
    assert all(r.state.is_completed() for r in per_file)

    # a finished output is not redone without overwrite; after two parts were lost, the same command scores only
    # those two (it replaces nothing, so no --overwrite); --overwrite redoes every part
    refused = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out), overrides=overrides(cfg, dask_address),
                               return_state=True)
    assert refused.is_failed() and "already holds a finished prediction: pass --overwrite" in refused.message
    (out / "part-batch-05.parquet").unlink()
    (out / "part-batch-17.parquet").unlink()
    again = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out), overrides=overrides(cfg, dask_address))
    assert sorted(p["part"] for p in again["parts"] if not p["skipped"]) == ["part-batch-05.parquet", "part-batch-17.parquet"]
    assert again["rows"] == 1000 and again["complete"]
    assert json.loads((out / "_drift.json").read_text())["images"] == 100  # what this run scored: the two parts
    redone = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out), overrides=overrides(cfg, dask_address),
                              overwrite=True)
    assert not any(p["skipped"] for p in redone["parts"]) and len(redone["parts"]) == 20 and redone["rows"] == 1000


def test_a_corrupt_file_fails_alone_and_no_manifest_is_written(prefect_server, dask_address, blessed, tmp_path):
    from flows.prediction import batch_prediction

    cfg, _ = blessed
    split_inputs(tmp_path / "in", 4, 30)
    (tmp_path / "in" / "batch-02.parquet").write_bytes(b"not parquet at all")
    out = tmp_path / "out"
    state = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out), overrides=overrides(cfg, dask_address),
                             return_state=True)
    assert state.is_failed()
    assert "1 of 4 input files failed" in state.message and "batch-02.parquet" in state.message
    assert sorted(p.name for p in out.iterdir()) == ["part-batch-00.parquet", "part-batch-01.parquet", "part-batch-03.parquet"]
    partial = batch_prediction(model="champion", input=str(tmp_path / "in"), output=str(out),
                               overrides=overrides(cfg, dask_address, **{"predict.allow_partial": True}))
    assert [f["input"].rsplit("/", 1)[1] for f in partial["failures"]] == ["batch-02.parquet"]
    assert not partial["complete"] and partial["rows"] == 90 and (out / "_manifest.json").exists()


def test_a_killed_worker_loses_no_part(prefect_server, blessed, tmp_path):
    """A worker is killed in the middle of a part: seen writing one (its temporary file, named with its pid),
    stopped (SIGSTOP) and found still writing it, then killed. Dask runs that file again elsewhere; every part is
    there once and whole."""
    from flows.prediction import batch_prediction

    cfg, _ = blessed
    split_inputs(tmp_path / "in", 12, 400)
    out = tmp_path / "out"
    result = {}
    small_batches = {"predict.batch_size": 10}  # 40 batches a part: a part takes a while to write
    run = threading.Thread(target=lambda: result.update(state=batch_prediction(
        model="champion", input=str(tmp_path / "in"), output=str(out), overrides=overrides(cfg, None, **small_batches),
        return_state=True)))
    run.start()
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline and run.is_alive():
        for partial in out.glob(".part-*.tmp-*") if out.exists() else []:
            pid = int(partial.name.rsplit(".tmp-", 1)[1].split("-")[0])
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            if partial.exists():  # frozen before it finished that part
                os.kill(pid, signal.SIGKILL)
                victim = (pid, partial.name.removeprefix(".").split(".tmp-")[0])
                break
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
    run.join(timeout=300)
    assert victim is not None, "no worker was caught writing a part"
    assert result["state"].is_completed(), result["state"].message
    manifest = storage.read_json(str(out / "_manifest.json"))
    assert manifest["rows"] == 4800 and len(manifest["parts"]) == 12
    assert sorted(p.name for p in out.iterdir()) == ["_drift.json", "_manifest.json"] + [
        f"part-batch-{i:02d}.parquet" for i in range(12)]
    redone = next(p for p in manifest["parts"] if p["part"] == victim[1])
    assert redone["worker"].split(":")[1] != str(victim[0]) and redone["rows"] == 400  # scored again, elsewhere
    assert pq.read_table(out).num_rows == 4800  # no part duplicated, none missing


def test_cli_predict_with_the_dask_engine(prefect_server, dask_address, blessed, tmp_path):
    from tests.conftest import invoke_cli

    cfg, model = blessed
    split_inputs(tmp_path / "in", 3, 20)
    code, out, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--set",
                                "predict.engine=dask", "--set", f"predict.dask_address={dask_address}",
                                "--input", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == (f"60 predictions by model {model.fingerprint[:12]} in 3 parts "
                                            f"under {tmp_path / 'out'}")
    # A corrupt file among them, in a new process with a LocalCluster of its own: its task fails, the run ends in
    # one line, and no traceback reaches the terminal (the Dask workers, other processes on the same stderr, are
    # quiet about user errors too), nor the cluster's teardown notes.
    data = (tmp_path / "in" / "batch-00.parquet").read_bytes()
    (tmp_path / "in" / "batch-01.parquet").write_bytes(data[: len(data) // 2] + data[-2000:])
    failed = run_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--set", "predict.engine=dask",
                     "--set", "predict.dask_workers=2", "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out2"), env={"PREFECT_API_URL": prefect_server})
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("tfpipe: error: 1 of 3 input files failed (")
    assert "batch-01.parquet" in failed.stderr.strip().splitlines()[-1]
    assert "Traceback" not in failed.stderr and "CommClosedError" not in failed.stderr


def test_a_cache_split_is_scored_one_part_per_shard(prefect_server, dask_address, blessed, tmp_path):
    from flows.prediction import batch_prediction
    from tasks.data.ingest import ingest

    cfg, _ = blessed
    dataset = ingest(cfg.data, cfg.artifacts.root)  # the session's tiny dataset: its test split, a part per shard
    out = tmp_path / "out"
    manifest = batch_prediction(model="champion", input=f"cache:{dataset.fingerprint[:16]}/test", output=str(out),
                                overrides={"artifacts.root": cfg.artifacts.root, **DASK,
                                           "predict.dask_address": dask_address})
    assert [p["part"] for p in manifest["parts"]] == [f"part-{n.removesuffix('.tfrecord')}.parquet"
                                                      for n in sorted(dataset.shards["test"])]
    assert manifest["rows"] == dataset.counts["test"] == pq.read_table(out).num_rows
