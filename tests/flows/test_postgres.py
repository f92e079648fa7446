"""A Prefect server on a real PostgreSQL (what a team shares between workers), started in a temp directory."""

import os
import subprocess
import sys
import time

import pyarrow.parquet as pq

from tasks.distributed.cluster import free_port
from tests.conftest import MNIST, REPO, as_postgres_user, kill_server, start_server


def test_training_flow_and_an_on_demand_deployment_on_a_postgres_backed_server(postgres, tmp_path):
    url, psql = postgres
    database = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url}
    home = tmp_path / "prefect-home"
    env = {**os.environ, **database, "PREFECT_HOME": str(home)}
    upgrade = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stdout[-2000:] + upgrade.stderr[-2000:]
    port = free_port()
    server = start_server(home, port, database)
    serve = None
    try:
        client_env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)}
        root = tmp_path / "artifacts"
        sets = ["--set", f"artifacts.root={root}", "--set", "data.limit=300", "--set", "train.epochs=1",
                "--set", "train.batch_size=50", "--set", "evaluate.min_accuracy=0.05"]
        trained = subprocess.run([sys.executable, "-m", "flows.cli", "run", *sets], cwd=REPO, env=client_env,
                                 capture_output=True, text=True, timeout=400)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "gate: BLESSED" in trained.stdout

        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--set", f"artifacts.root={root}",
                                  "--set", f"serve.allowed_outputs=[{tmp_path}]",
                                  "--set", f"serve.allowed_inputs=[{tmp_path}]"],
                                 cwd=REPO, env=client_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        output, inputs = tmp_path / "served.parquet", tmp_path / "test-500.parquet"
        pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, 500), inputs)
        deadline, run = time.time() + 120, None
        while run is None or (run.returncode != 0 and "not found" in run.stderr + run.stdout and time.time() < deadline):
            time.sleep(1)
            run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "batch-prediction/on-demand",
                                  "-p", "model=champion", "-p", f"input={inputs}", "-p",
                                  f"output={output}", "--watch", "--watch-timeout", "240"], env=client_env,
                                 capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert pq.read_table(output).num_rows == 500

        # the runs live in PostgreSQL
        query = subprocess.run(as_postgres_user([*psql, "-d", "prefect", "-tA", "-c",
                                                 "SELECT f.name, r.state_name FROM flow_run r JOIN flow f ON f.id = r.flow_id"]),
                               capture_output=True, text=True, timeout=60)
        rows = set(query.stdout.split())
        assert {"training-pipeline|Completed", "batch-prediction|Completed"} <= rows, query.stdout + query.stderr
    finally:
        if serve is not None:
            kill_server(serve)
        kill_server(server)
