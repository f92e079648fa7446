"""Shared test set-up: two logical CPU devices (before any TensorFlow op), a temp PREFECT_HOME, tiny datasets."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="tfpipe-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("TFPIPE_ARTIFACTS", None)
for _name in [n for n in os.environ if n.startswith("TFPIPE__")]:
    os.environ.pop(_name)
# Serving formats only where a test names them (export.formats): each costs a check in a process of its own,
# seconds per training, and most tests are about something else. The environment reaches every process a test
# starts; a test's --set or overrides beat it (tests/flows/test_newcomer.py runs without it: a new user's defaults).
os.environ["TFPIPE__EXPORT__FORMATS"] = "[]"

import flows  # noqa: E402,F401  (environment defaults)
# Prefect's logging set-up (on its first import of prefect.main) closes every logging handler made before it, and
# TensorFlow's absl handler closes its stream, which under pytest is the capture's stderr: Prefect first.
import prefect.main  # noqa: E402,F401
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

# Multi-replica tests mirror over two logical CPU devices; this must happen before the first TF op.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from pipeline_config import PipelineConfig, load_config  # noqa: E402
from tasks.distributed.cluster import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "data" / "mnist"


# The defaults before schedules and augmentation: what tiny models in tests learn fastest with, in a test that
# needs a model good enough to pass a gate (the defaults' warm-up and augmentation are for full datasets).
PLAIN_TRAINING = ["train.lr_schedule.name=constant", "train.optimizer.learning_rate=0.001",
                  "data.augment.translation=0", "data.augment.rotation=0", "data.augment.zoom=0"]


def make_config(root: Path, *overrides: str, **kw) -> PipelineConfig:
    return load_config(overrides=[f"artifacts.root={root}", *overrides], **kw)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tfpipe ARGS` in a fresh process (the real entry point), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once all have exited; any still running after `timeout` is killed."""
    import os
    import signal

    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def mnist_arrays(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(MNIST / f"{split}.parquet").slice(0, n)
    x = np.frombuffer(table.column("image").combine_chunks().buffers()[1], np.uint8, count=n * 784).reshape(n, 28, 28, 1)
    return x.copy(), table.column("label").to_numpy().astype(np.int64)


def write_parquet_source(directory: Path, train: tuple, test: tuple, image_type: str = "fixed", metadata: dict | None = None):
    """A parquet: source directory with train.parquet and test.parquet in one of the accepted image encodings."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in (("train", train), ("test", test)):
        flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
        if image_type == "fixed":
            images = pa.array([r.tobytes() for r in flat], pa.binary(flat.shape[1]))
        elif image_type == "binary":
            images = pa.array([r.tobytes() for r in flat], pa.binary())
        elif image_type == "list":
            images = pa.array([r.tolist() for r in flat], pa.list_(pa.uint8()))
        else:
            raise ValueError(image_type)
        table = pa.table({"image": images, "label": pa.array(y, pa.int64())})
        if metadata is not None:
            table = table.replace_schema_metadata(metadata)
        pq.write_table(table, directory / f"{split}.parquet")
    return directory


class LineWatch:
    """A process's output read line by line on a thread, so that a test can wait for a line it prints (a real
    event) with a deadline instead of sleeping."""

    def __init__(self, stream):
        import threading

        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 240) -> str:
        """The first line matching the regular expression `pattern`; AssertionError at the end of output or after
        `timeout` seconds."""
        import re

        deadline = time.time() + timeout
        seen = 0
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise AssertionError(f"output ended without {pattern!r}: {self.text()[-3000:]}")
                    if re.search(pattern, line):
                        return line
                seen = len(self.lines)
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError(f"no line {pattern!r} within {timeout:.0f}s: {self.text()[-3000:]}")
                self.changed.wait(left)

    def text(self) -> str:
        """Everything read so far (all of it, once the process has ended and `join` returned)."""
        return "".join(line for line in self.lines if line is not None)

    def join(self, timeout: float = 30) -> str:
        self.thread.join(timeout)
        return self.text()


def saved_epochs(checkpoint_index: str) -> int:
    """The epochs a training work dir's checkpoint says are done, from its `checkpoints/checkpoint` index text: the
    newest checkpoint is number `epochs done` (an epoch's end saves ckpt-<epoch>; a kill saves nothing more)."""
    import re

    return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', checkpoint_index, re.M).group(1))


def artifacts_under(root: Path) -> list[Path]:
    """Every file under an artifact root except the lease files (`.leases/`), which are not artifacts."""
    return [p for p in root.rglob("*") if p.is_file() and ".leases" not in p.relative_to(root).parts] \
        if root.exists() else []


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny model trained once for the evaluate/predict tests: (config, dataset, model artifact)."""
    from tasks.data.ingest import ingest
    from tasks.train.stage import train

    root = tmp_path_factory.mktemp("trained") / "artifacts"
    cfg = make_config(root, "data.limit=1200", "train.epochs=2", "train.batch_size=64", "evaluate.min_accuracy=0.3",
                      "export.formats=[saved_model]", *PLAIN_TRAINING)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    model = train(cfg, dataset)
    return cfg, dataset, model


def copy_of(trained, destination: Path):
    """The session's published root copied to `destination`, with the config and references pointing there: for
    tests that change a root (a champion, more models), so that the session's own stays as it was made."""
    import shutil

    cfg, dataset, model = trained
    shutil.copytree(cfg.artifacts.root, destination)
    moved = cfg.model_copy(deep=True)
    moved.artifacts.root = str(destination)
    relocate = lambda ref: ref.model_copy(update={"uri": ref.uri.replace(cfg.artifacts.root, str(destination))})  # noqa: E731
    return moved, relocate(dataset), relocate(model)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with the bucket `tfp`; the standard AWS variables point at it (for subprocesses too)."""
    import logging

    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    S3FileSystem.clear_instance_cache()  # fsspec keeps one per process, with the endpoint of an earlier server
    # the bucket, through the AWS_* variables just set; moto keeps its buckets per process, across servers, so an
    # earlier module's server may have made it already
    S3FileSystem().makedirs("tfp", exist_ok=True)
    S3FileSystem.clear_instance_cache()
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


def invoke_cli(*args: str):
    """`tfpipe ARGS` in this process (fast; the same code path as the entry point): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def start_server(home, port: int, env: dict | None = None) -> subprocess.Popen:
    """A Prefect server of its own (SQLite under `home` unless `env` names another database), up and healthy."""
    import httpx

    full_env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    full_env.pop("PREFECT_API_URL", None)
    Path(home).mkdir(parents=True, exist_ok=True)
    log_path = Path(home) / f"server-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code in (200, 401):
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the Prefect server did not start")


def kill_server(proc: subprocess.Popen) -> None:
    crash(proc)


def crash(proc: subprocess.Popen) -> None:
    """A real crash of a process started in a session of its own: SIGKILL to its whole group, no chance to clean
    up; waits for it. Nothing when it has ended."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def tfpipe_process(*args: str):
    """`tfpipe ARGS` running in a session of its own (stdout and stderr piped); crashed on leaving if still
    running, so that a failed test leaves no training behind."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        crash(proc)


# ------------------------------------------------------------------------------ PostgreSQL

def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    assert found, f"{name} not found: install PostgreSQL (apt-get install -y postgresql; .ci/run does)"
    return found


def as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account Debian's package creates."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    """A PostgreSQL cluster on a loopback port with a `prefect` database and pg_trgm; yields its asyncpg URL."""
    directory = tempfile.mkdtemp(prefix="tfpipe-pg-")
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
    data, port = os.path.join(directory, "data"), free_port()

    def run(cmd: list[str]) -> None:
        done = subprocess.run(as_postgres_user(cmd), capture_output=True, text=True, timeout=120, cwd=directory)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run([pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "tfpipe", "--no-sync"])
    run([pg_bin("pg_ctl"), "-D", data, "-w", "-l", os.path.join(directory, "postgres.log"), "-o",
         f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
    try:
        psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "tfpipe", "-v", "ON_ERROR_STOP=1"]
        run([*psql, "-d", "postgres", "-c", "CREATE DATABASE prefect"])
        run([*psql, "-d", "prefect", "-c", "CREATE EXTENSION pg_trgm"])
        yield f"postgresql+asyncpg://tfpipe@127.0.0.1:{port}/prefect", psql
    finally:
        subprocess.run(as_postgres_user([pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "stop"]), capture_output=True,
                       timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ photos

def photo(rng, height: int, width: int, hue: int) -> np.ndarray:
    """A photo-like RGB image: a smooth gradient in the class's colour with noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.zeros((height, width, 3), np.float64)
    base[..., hue] = 120 + 100 * np.sin(x / max(width, 1) * 3.1) * np.cos(y / max(height, 1) * 2.3)
    base += rng.normal(0, 12, base.shape)
    return base.clip(0, 255).astype(np.uint8)


def save(image: Image.Image, path, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()
