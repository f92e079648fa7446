"""A new user's first runs: the README's quick `tfpipe run` command, as written there, in a process with a new empty
PREFECT_HOME (Prefect's temporary server creates its database first), no PREFECT_API_URL and a new artifact root."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def readme_command() -> list[str]:
    """The command the README's Quickstart gives under its `newcomer-command` marker."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- newcomer-command:[^>]*-->\n```bash\n(.+?)\n```", text)
    assert block, "the README's Quickstart lost its newcomer-command block"
    return shlex.split(block.group(1))


def newcomer_env(tmp_path: Path, **extra: str) -> dict:
    """This machine's environment less anything Prefect, tfpipe or Dask was told by the tests or the developer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TFPIPE_", "DASK_"))}
    home = tmp_path / "prefect-home"
    home.mkdir()
    return {**env, "PREFECT_HOME": str(home), "TFPIPE_ARTIFACTS": str(tmp_path / "artifacts"), **extra}


def tfpipe_executable() -> str:
    """The `tfpipe` script pip installed with this Python (the README's command names it, not `python -m`)."""
    return shutil.which("tfpipe", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    assert command[0] == "tfpipe" and tfpipe_executable(), "tfpipe is not installed next to this Python"
    return subprocess.run([tfpipe_executable(), *command[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_readme_quick_run_works_on_a_new_prefect_home_twice(tmp_path):
    command = readme_command()
    assert command[:2] == ["tfpipe", "run"]
    env = newcomer_env(tmp_path)
    first = run(command, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stdout + first.stderr
    assert "Beginning flow run" in first.stderr  # the run went through Prefect (its temporary server) ...
    assert "temporary server" not in first.stderr.lower()  # ... whose start-up notes stay out of a quiet run
    summary = first.stdout.splitlines()
    assert [line.split(":")[0] for line in summary[:-1]] == ["test accuracy", "gate", "data", "model",
                                                             "champion", "predictions", "report"], first.stdout
    assert re.fullmatch(r"took \d+\.\ds", summary[-1]), summary[-1]
    assert f"model: {tmp_path / 'artifacts' / 'train'}" in first.stdout and "(cached)" not in first.stdout
    assert (tmp_path / "prefect-home" / "prefect.db").exists()  # the temporary server's database, made on this run

    second = run(command, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stdout + second.stderr
    assert re.search(r"^model: .*model\.keras \(cached\)$", second.stdout, re.M), second.stdout


def test_a_temporary_server_that_does_not_start_in_time_is_one_line(tmp_path):
    """No server answers within the (here: 1 s) startup timeout on a new PREFECT_HOME: one line saying what to do,
    exit 1, no traceback, nothing written under the artifact root."""
    result = run(readme_command(), newcomer_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "tfpipe: error: Prefect's temporary server did not answer within 1 s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): start a server (prefect server start) and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api, or raise that timeout")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "artifacts").exists()
