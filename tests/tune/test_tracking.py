"""tracking.mlflow_uri: training runs of both styles and their evaluation reach a real `mlflow server` on a loopback
port; a tracker that cannot reach its server never fails the run."""

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tasks.distributed.cluster import free_port
from tasks.tracking import MODEL_TAG
from tests.conftest import run_cli


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    home = tmp_path / "mlflow"
    home.mkdir()
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination",
                             str(home / "artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:  # up once it answers its health check
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def history(model: dict) -> list[dict]:
    with open(os.path.join(model["uri"], model["history_path"])) as f:
        return json.load(f)["epochs"]


def test_training_runs_of_both_styles_and_their_evaluation_reach_mlflow(mlflow_server, prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    common = [f"artifacts.root={tmp_path / 'artifacts'}", "data.limit=300", "train.epochs=2", "train.batch_size=50",
              "evaluate.min_accuracy=0.05", f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=tests"]
    sets = [a for item in common for a in ("--set", item)]
    fit = run_cli("run", *sets, "--set", "train.mode=fit", "--json", env={"PREFECT_API_URL": prefect_server})
    assert fit.returncode == 0, fit.stderr[-3000:]
    custom = run_cli("train", *sets, "--set", "train.mode=custom", "--json")
    assert custom.returncode == 0, custom.stderr[-3000:]
    summary, custom_model = json.loads(fit.stdout), json.loads(custom.stdout)
    models = {"fit": summary["model"], "custom": custom_model}

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tests")
    runs = {r.data.tags[MODEL_TAG]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {m["fingerprint"] for m in models.values()}
    for mode, model in models.items():
        run = runs[model["fingerprint"]]
        assert run.info.status == "FINISHED" and run.data.params["train.mode"] == mode
        assert run.data.params["data.limit"] == "300" and run.data.tags["tfpipe.dataset_fingerprint"]
        for metric in ("loss", "val_loss"):  # every epoch, as history.json has it
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
            assert [step for step, _ in logged] == [h["epoch"] for h in history(model)] == [1, 2]
            assert [value for _, value in logged] == pytest.approx([h[metric] for h in history(model)])
    evaluated = runs[summary["model"]["fingerprint"]]
    assert evaluated.data.metrics["test_accuracy"] == pytest.approx(summary["evaluation"]["metrics"]["accuracy"])
    assert "model_card.md" in [a.path for a in client.list_artifacts(evaluated.info.run_id)]
    assert "test_accuracy" not in runs[custom_model["fingerprint"]].data.metrics  # trained, not evaluated


def test_a_tracker_that_cannot_reach_its_server_never_fails_the_run(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    done = run_cli("train", "--set", f"artifacts.root={tmp_path}", "--set", "data.limit=200", "--set", "train.epochs=1",
                   "--set", f"tracking.mlflow_uri={closed}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "MLflow tracking" in line]
    assert len(warnings) == 1 and f"MLflow tracking at {closed} failed while starting the run" in warnings[0]
    assert json.loads(done.stdout)["fingerprint"]
