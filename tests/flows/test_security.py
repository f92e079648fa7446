"""A Prefect server with basic auth, and secrets (S3 keys, the auth string) kept out of everything tfpipe writes."""

import base64
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tasks.distributed.cluster import free_port
from tests.conftest import REPO, kill_server, start_server

AUTH = "admin:FAKE-AUTH-PASSWORD-7f3a91"
KEY_ID, SECRET = "AKIAFAKEKEYID7F3A91XY", "FAKE-SECRET-KEY-c0ffee-7f3a91"
SECRETS = (AUTH.split(":")[1], KEY_ID, SECRET)


@pytest.fixture
def s3_with_fake_keys():
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    bucket.mkdir("sec")
    yield env, bucket
    server.stop()


def api(url: str, path: str, body: dict, auth: str | None) -> httpx.Response:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30)


def test_auth_server_refuses_strangers_and_secrets_stay_out_of_artifacts_and_logs(s3_with_fake_keys, tmp_path):
    s3_env, s3 = s3_with_fake_keys
    home, port = tmp_path / "prefect-home", free_port()
    server = start_server(home, port, {"PREFECT_SERVER_API_AUTH_STRING": AUTH})
    url = f"http://127.0.0.1:{port}/api"
    serve = None
    try:
        assert api(url, "/flow_runs/filter", {}, None).status_code == 401  # no credentials: refused
        assert api(url, "/flow_runs/filter", {}, "admin:wrong").status_code == 401
        assert api(url, "/flow_runs/filter", {}, AUTH).status_code == 200

        env = {**os.environ, **s3_env, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": AUTH,
               "PREFECT_HOME": str(home)}
        cache = tmp_path / "cache"
        sets = ["--set", "artifacts.root=s3://sec/team", "--set", f"artifacts.local_cache={cache}", "--set",
                "data.limit=300", "--set", "train.epochs=1", "--set", "train.batch_size=50", "--set",
                "evaluate.min_accuracy=0.05"]
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", *sets], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        stranger = subprocess.run([sys.executable, "-m", "flows.cli", "run", *sets], cwd=REPO,
                                  env={**env, "PREFECT_API_AUTH_STRING": ""}, capture_output=True, text=True, timeout=400)
        assert stranger.returncode == 1 and "Traceback" not in stranger.stderr, stranger.stderr[-3000:]
        assert stranger.stderr.strip().splitlines()[-1] == (
            f"tfpipe: error: the Prefect server at {url} refused this client (401 Unauthorized): set "
            "PREFECT_API_AUTH_STRING to the user:password its PREFECT_SERVER_API_AUTH_STRING names")

        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--set", "artifacts.root=s3://sec/team"],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline, names = time.time() + 120, set()
        while time.time() < deadline and not {"scheduled-training", "on-demand"} <= names:
            assert serve.poll() is None
            names = {d["name"] for d in api(url, "/deployments/filter", {}, AUTH).json()}
            time.sleep(1)
        assert {"scheduled-training", "on-demand"} <= names  # tfpipe serve with the string serves

        # every object in the bucket, every local file, the run's output and its logs on the server
        s3.invalidate_cache()
        written = [s3.cat_file(path) for path in s3.find("sec")]
        assert any(b'"stage": "train"' in body or b'"stage":"train"' in body for body in written)
        written += [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
        written += [run.stdout.encode(), run.stderr.encode()]
        logs = api(url, "/logs/filter", {"limit": 200}, AUTH).json()
        assert any("gate:" in entry["message"] for entry in logs)
        written += [entry["message"].encode() for entry in logs]
        runs = api(url, "/flow_runs/filter", {}, AUTH).json()
        written += [str(r["parameters"]).encode() for r in runs]
        for secret in SECRETS:
            leaks = [body[:80] for body in written if secret.encode() in body]
            assert not leaks, (secret, leaks)
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)
        kill_server(server)
