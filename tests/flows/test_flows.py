"""The Prefect flows and deployments against a real Prefect server (one per test session)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pyarrow.parquet as pq
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, LogFilter,
                                            LogFilterFlowRunId)

from flows.training import training_pipeline
from tests.conftest import MNIST, REPO, finish, kill_server, start_server

TINY = {"data.limit": 300, "train.epochs": 1, "train.batch_size": 50, "evaluate.min_accuracy": 0.05}


def api(coro_fn):
    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


def task_states(flow_run_id) -> dict[str, str]:
    runs = api(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]})))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def flow_logs(flow_run_id, expect: str = "") -> str:
    """The run's logs as the API has them (the log handler ships them in batches: wait for `expect`)."""
    deadline = time.time() + 20
    while True:
        logs = api(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
        text = "\n".join(log.message for log in logs)
        if expect in text or time.time() > deadline:
            return text
        time.sleep(0.5)


def run_artifacts(flow_run_id) -> dict:
    """This run's artifacts by key (not those of other runs on the shared server)."""
    found = api(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))))
    return {a.key: a for a in found}


def test_training_flow_completes_reports_and_skips_cached_stages(prefect_server, tmp_path):
    overrides = {**TINY, "artifacts.root": str(tmp_path / "artifacts")}
    state = training_pipeline(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.evaluation.blessed and summary.prediction.rows == 300
    assert pq.read_table(summary.prediction.output).num_rows == 300
    first_id = state.state_details.flow_run_id
    states = task_states(first_id)
    assert states == {"ingest": "Completed", "validate": "Completed", "train": "Completed", "evaluate": "Completed",
                      "predict": "Completed", "report": "Completed"}
    logs = flow_logs(first_id, expect="gate: blessed")
    assert "gate: blessed" in logs
    epoch_lines = [line for line in logs.splitlines() if line.startswith("epoch 1/1")]
    assert len(epoch_lines) == 1 and "val_accuracy=" in epoch_lines[0], epoch_lines  # one structured line per epoch

    artifacts = run_artifacts(first_id)
    assert set(artifacts) == {"training-report", "evaluation-metrics", "confusion-matrix", "training-progress",
                              "training-history", "data-statistics", "data-validation"}
    report = artifacts["training-report"].data
    assert "Promotion gate" in report and summary.model.fingerprint[:12] in report
    plots = [f"]({summary.evaluation.uri}/{p})" for p in summary.evaluation.plots]
    assert all(link in report for link in plots) and all(os.path.exists(link[2:-1]) for link in plots)
    assert float(artifacts["training-progress"].data) == 100.0
    confusion = json.loads(artifacts["confusion-matrix"].data)
    assert sorted(confusion[0])[0] == "actual class" and [row["actual class"] for row in confusion] == list("0123456789")
    assert sum(sum(v for k, v in row.items() if k.startswith("predicted ")) for row in confusion) == 300
    history = json.loads(artifacts["training-history"].data)
    assert [h["epoch"] for h in history] == [1] and {"loss", "val_accuracy", "learning_rate"} <= set(history[0])
    tags = api(lambda c: c.read_flow_run(first_id)).tags
    assert {f"dataset:{summary.dataset.fingerprint[:12]}", f"model:{summary.model.fingerprint[:12]}"} <= set(tags)

    again = training_pipeline(overrides=overrides, return_state=True)
    assert again.is_completed()
    states = task_states(again.state_details.flow_run_id)
    assert states["ingest"] == states["validate"] == states["train"] == states["predict"] == "Cached"
    assert again.result().model.fingerprint == summary.model.fingerprint


def test_failing_stage_fails_the_flow_with_its_message(prefect_server, tmp_path):
    overrides = {**TINY, "artifacts.root": str(tmp_path / "artifacts"), "data.source": f"npz:{tmp_path}/missing.npz"}
    state = training_pipeline(overrides=overrides, return_state=True)
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id, expect="does not exist")
    assert "missing.npz does not exist" in logs
    states = task_states(state.state_details.flow_run_id)
    assert states == {"ingest": "Failed"}  # not retried (bad input), nothing downstream ran
    assert not (tmp_path / "artifacts").exists()


def test_serve_schedules_training_runs_on_demand_prediction_and_refuses_what_serve_does_not_allow(prefect_server, tmp_path):
    from prefect.deployments import run_deployment

    root, allowed = tmp_path / "served-root", tmp_path / "allowed"
    allowed.mkdir()
    inputs = tmp_path / "test-500.parquet"
    pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, 500), inputs)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--set", f"artifacts.root={root}",
                              "--set", "schedule.cron=15 3 * * *", "--set", "train.batch_size=50",
                              "--set", "evaluate.min_accuracy=0.05", "--set", f"serve.allowed_outputs=[{allowed}]",
                              "--set", f"serve.allowed_inputs=[{tmp_path}]"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        deployments = []
        while time.time() < deadline and len(deployments) < 3:
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            deployments = api(lambda c: c.read_deployments())
            time.sleep(1)
        by_name = {d.name: d for d in deployments}
        assert {"scheduled-training", "on-demand", "on-demand-tuning"} <= set(by_name)
        assert [s.schedule.cron for s in by_name["scheduled-training"].schedules] == ["15 3 * * *"]

        # the scheduled training deployment, run now with the overrides a caller may set
        run = run_deployment("training-pipeline/scheduled-training", timeout=300, parameters={
            "overrides": {"data.limit": 300, "train.epochs": 1}})
        assert run.state.is_completed(), run.state
        models = [p for p in (root / "train").iterdir() if not p.name.startswith(".")]
        assert len(models) == 1 and (models[0] / "model.keras").is_file()
        assert set(task_states(run.id).values()) == {"Completed"}

        output = allowed / "served.parquet"
        run = run_deployment("batch-prediction/on-demand", timeout=240, parameters={
            "model": "champion", "input": str(inputs), "output": str(output)})
        assert run.state.is_completed(), (run.state, serve.stdout.read1(100000) if serve.poll() else "")
        table = pq.read_table(output)
        assert table.num_rows == 500 and table.schema.metadata[b"model_fingerprint"].decode() == models[0].name
        # (the same deployment from Prefect's own CLI: tests/flows/test_postgres.py)

        # what serve does not allow fails at once, in one line naming the parameter, and writes nothing
        other_root = tmp_path / "other-root"
        refusals = [
            ({"output": f"{allowed}/../escaped.parquet"}, "parameter output="),
            ({"overrides": {"artifacts.root": str(other_root)}}, "parameter overrides sets artifacts.root, which a caller cannot change"),
        ]  # inputs, other places, config_file and the other override rules: tests/flows/test_policy.py
        for extra, expected in refusals:
            parameters = {"model": "champion", "input": str(inputs), "output": str(allowed / "refused.parquet"), **extra}
            run = run_deployment("batch-prediction/on-demand", timeout=240, parameters=parameters)
            assert run.state.is_failed(), (extra, run.state)
            assert f"served run refused: {expected}" in run.state.message and "\n" not in run.state.message
        run = run_deployment("tuning/on-demand-tuning", timeout=240, parameters={  # served tuning: the same policy
            "overrides": {"artifacts.root": str(other_root)}})
        assert run.state.is_failed() and "served run refused: parameter overrides sets artifacts.root" in run.state.message
        assert not (tmp_path / "escaped.parquet").exists() and not other_root.exists()
        assert not (allowed / "refused.parquet").exists()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "tfpipe-pool", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    by_name = {d.name: d for d in api(lambda c: c.read_deployments())}
    training, prediction = by_name["scheduled-training"], by_name["on-demand"]
    assert training.work_pool_name == "tfpipe-pool" and prediction.work_pool_name == "tfpipe-pool"
    assert [s.schedule.cron for s in training.schedules] == ["0 2 * * *"]
    assert training.entrypoint == "flows/training.py:training_pipeline"
    assert by_name["on-demand-tuning"].entrypoint == "flows/tuning.py:tuning_flow"


def test_cli_run_prints_the_summary_blessed_or_not(prefect_server, tmp_path):
    """The summary on stdout; a gate that refuses the model is a normal outcome: exit 0, the decision and no
    predictions. (The whole command in a new process on a temporary server: tests/flows/test_newcomer.py.)"""
    from tests.conftest import invoke_cli

    args = [a for k, v in {**TINY, "artifacts.root": str(tmp_path / "a")}.items() for a in ("--set", f"{k}={v}")]
    code, out, err = invoke_cli("run", *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("test accuracy: ") and lines[1].startswith("gate: BLESSED")
    assert "data: no anomalies" in lines  # the validate stage's verdict on the data it trained on
    assert any(line.startswith("predictions: ") and "(300 rows)" in line for line in lines)
    model_line = next(line for line in lines if line.startswith("model: "))
    assert model_line.split()[1].endswith("model.keras") and (tmp_path / "a" / "train").is_dir()

    strict = [a for k, v in {**TINY, "artifacts.root": str(tmp_path / "b"), "evaluate.min_accuracy": 0.99}.items()
              for a in ("--set", f"{k}={v}")]
    code, out, err = invoke_cli("run", *strict)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[1].startswith("gate: NOT blessed (min_accuracy: accuracy ") and "< 0.9900" in lines[1]
    assert "champion: none" in lines and "predictions: none (no champion)" in lines
    assert not (tmp_path / "b" / "champion.json").exists() and not (tmp_path / "b" / "predict").exists()


def test_tfpipe_run_as_two_multi_worker_workers(prefect_server, tmp_path):
    """`tfpipe run` on each host of a cluster (TF_CONFIG set): both workers train, the chief evaluates."""
    from tasks.distributed.cluster import free_port, worker_env

    root = tmp_path / "artifacts"
    sets = {**TINY, "artifacts.root": str(root), "train.strategy": "multi_worker", "train.batch_size": 40,
            "train.collective_timeout_s": 60}
    args = [sys.executable, "-m", "flows.cli", "run", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen(args, cwd=REPO, env={**worker_env(ports, i), "PREFECT_API_URL": prefect_server},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(2)]
    outputs = finish(procs, timeout=300)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "Collective ops must be configured" not in err
    chief_out, worker_out = outputs[0][0], outputs[1][0]
    assert chief_out.startswith("test accuracy: ") and "predictions: " in chief_out  # stdout: the summary alone
    assert "epoch 1/1: " in outputs[0][1]  # the custom loop's epoch line is a log line, on stderr
    assert worker_out.startswith("model: ") and "trained as one worker; the chief evaluates" in worker_out
    models = [p.name for p in (root / "train").iterdir() if not p.name.startswith(".")]
    assert len(models) == 1 and models[0] in worker_out and models[0] in chief_out
    assert json.load(open(root / "train" / models[0] / "manifest.json"))["replicas"] == 2


def run_while_the_server_dies(tmp_path, restart: bool, env: dict) -> tuple[subprocess.CompletedProcess, str]:
    """`tfpipe run` against a server that is killed once training has checkpointed its first epoch. With
    `restart`, the server starts again on the same port and database once the model is published: the run's next
    call to the API (the train task's final state) then meets a server that is down, and goes through the client's
    retries. Returns (result, API URL)."""
    from tasks.distributed.cluster import free_port

    port, home, root = free_port(), tmp_path / "prefect-home", tmp_path / "artifacts"
    server = start_server(home, port)
    url = f"http://127.0.0.1:{port}/api"
    sets = {"data.limit": 1500, "train.epochs": 3, "train.batch_size": 64, "evaluate.min_accuracy": 0.5,
            "artifacts.root": str(root)}
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                           cwd=REPO, env={**os.environ, **env, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: list(root.glob("train/.work-*/checkpoints/checkpoint")), run)
        kill_server(server)
        if restart:
            wait_for(lambda: published(root, "train"), run)
            server = start_server(home, port)
        out, err = run.communicate(timeout=400)
        return subprocess.CompletedProcess(run.args, run.returncode, out, err), url
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        if server.poll() is None:
            kill_server(server)


def wait_for(found, proc: subprocess.Popen, timeout: float = 240):
    """Poll `found()` until it returns something true while `proc` runs; that value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = found()
        if value:
            return value
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s")


def published(root, stage: str) -> list:
    return [p for p in (root / stage).iterdir() if (p / "manifest.json").exists()] if (root / stage).exists() else []


def test_server_lost_for_good_the_stages_publish_and_the_run_exits_in_one_line(tmp_path):
    # Few client retries, so the test does not wait out the default back-off (about a minute per call).
    result, url = run_while_the_server_dies(tmp_path, restart=False, env={"PREFECT_CLIENT_MAX_RETRIES": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tfpipe: error: lost the Prefect server at {url} (") and last.endswith(
        "the stages that finished published their outputs: re-run once the server is back and they are reused")
    root = tmp_path / "artifacts"
    assert len(published(root, "train")) == 1 and len(published(root, "ingest")) == 1  # training finished its work
    assert not list((root / "train").glob(".work-*"))


def test_server_restarted_while_the_run_needs_it_the_run_completes(tmp_path):
    result, url = run_while_the_server_dies(tmp_path, restart=True, env={})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("test accuracy: ") and "gate: BLESSED" in result.stdout
    server = start_server(tmp_path / "prefect-home", int(url.split(":")[2].split("/")[0]))
    try:
        runs = httpx.post(f"{url}/flow_runs/filter", json={}, timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        assert httpx.get(f"{url}/flows/{runs[0]['flow_id']}", timeout=10).json()["name"] == "training-pipeline"
    finally:
        kill_server(server)
