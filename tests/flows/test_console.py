"""What `tfpipe` prints: no TensorFlow C++ or CUDA lines unless -v, progress bars on a terminal only."""

import json
import os
import pty
import re
import subprocess
import sys

import pyarrow.parquet as pq

from flows.console import NATIVE_LOG_LINE
from tests.conftest import MNIST, REPO, invoke_cli, run_cli


def native_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if NATIVE_LOG_LINE.match(line.encode()) or "cuInit" in line or "CUDA" in line]


def test_predict_prints_no_tensorflow_startup_lines_unless_verbose(trained, tmp_path):
    _, _, model = trained
    args = ["predict", "--model", model.uri, "--allow-unblessed", "--input", str(MNIST / "test.parquet"),
            "--set", f"artifacts.root={tmp_path}"]
    quiet = run_cli(*args, "--output", str(tmp_path / "a.parquet"))
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert native_lines(quiet.stderr) == [] and "Traceback" not in quiet.stderr
    assert "predictions by model" in quiet.stdout and "tfpipe.predict: predicted" in quiet.stderr
    verbose = run_cli("-v", *args, "--output", str(tmp_path / "b.parquet"))
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert native_lines(verbose.stderr), verbose.stderr[-2000:]


def run_with_terminal_stderr(args: list[str]) -> str:
    """stderr of `tfpipe ARGS` when it is a pseudo-terminal, as the user's shell gives it."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=300)
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tmp_path, caplog):
    args = ["train", "--set", "data.limit=1000", "--set", "train.epochs=1", "--set", "train.batch_size=64"]
    terminal = run_with_terminal_stderr([*args, "--set", f"artifacts.root={tmp_path / 'a'}"])
    assert re.search(r"ingest train .*rows", terminal) and re.search(r"epoch 1/1 .*batches", terminal)
    assert "━" in terminal and re.search(r"loss \d+\.\d{4}", terminal)  # the bar, with the running loss
    model = next(p for p in (tmp_path / "a" / "train").iterdir() if not p.name.startswith("."))
    inputs = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, 1000), inputs)
    terminal = run_with_terminal_stderr(["predict", "--model", str(model), "--allow-unblessed", "--input", str(inputs),
                                         "--output", str(tmp_path / "p.parquet"), "--set",
                                         f"artifacts.root={tmp_path / 'a'}", "--set", "predict.batch_size=100"])
    assert re.search(r"predict .*rows", terminal)
    with caplog.at_level("INFO", logger="tfpipe"):  # stderr not a terminal: in this process, captured
        code, _, err = invoke_cli(*args, "--set", f"artifacts.root={tmp_path / 'b'}")
    assert code == 0, err
    assert "━" not in err and "batches" not in err and "\x1b[" not in err
    assert "epoch 1/1: accuracy=" in caplog.text  # the plain per-epoch line


def test_a_failed_run_prints_no_traceback_and_ends_with_one_line(prefect_server, tmp_path):
    done = run_cli("run", "--set", f"artifacts.root={tmp_path}", "--set", f"data.source=npz:{tmp_path}/missing.npz",
                   env={"PREFECT_API_URL": prefect_server})  # the session's server: no temporary one to wait for
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and native_lines(done.stderr) == []
    assert done.stderr.strip().splitlines()[-1] == (
        f"tfpipe: error: {tmp_path}/missing.npz does not exist: data.source=npz:PATH needs an .npz file with "
        "x_train, y_train, x_test, y_test (keras.datasets layout)")


def test_quiet_python_logs_twice_attaches_each_filter_once():
    count = ("import json, logging; from flows.console import quiet_python_logs\n"
             "quiet_python_logs(); quiet_python_logs()\n"
             "loggers = [logging.getLogger(), logging.getLogger('prefect'), logging.getLogger('prefect.flow_runs')]\n"
             "print(json.dumps([[len(h.filters) for h in loggers[0].handlers], [len(l.filters) for l in loggers[1:]]]))")
    done = subprocess.run([sys.executable, "-c", count], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    handler_filters, logger_filters = json.loads(done.stdout.strip().splitlines()[-1])
    assert handler_filters and all(n == 2 for n in handler_filters)  # Dask teardown, queue drain notes
    assert logger_filters == [1, 1]


def test_the_error_line_stays_last_while_native_code_keeps_writing():
    # As TensorFlow's threads do when a collective is lost: lines on descriptor 2 before and after the failure.
    script = ("import os, sys, threading\n"
              "from flows import console, errors\n"
              "console.configure([])\n"
              "started = threading.Event()\n"
              "def native():\n"
              "    while True:\n"
              "        os.write(2, b'The tasks have crashed.\\n'); started.set()\n"
              "threading.Thread(target=native, daemon=True).start()\n"
              "started.wait()\n"
              "try:\n"
              "    errors.fail('error: worker 0 lost contact with worker 1', 1)\n"
              "except BaseException:\n"
              "    sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "The tasks have crashed." in lines  # passed on while the command ran
    assert lines[-1] == "tfpipe: error: worker 0 lost contact with worker 1"
