"""tfpipe tune: Optuna studies whose trials are train stages on a Dask cluster; pruning, resuming after kill -9,
PostgreSQL storage with separate Dask workers, the best trial's preset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.distributed.cluster import free_port
from tests.conftest import PLAIN_TRAINING, REPO, crash, run_cli

TINY = ["data.limit=600", "train.batch_size=32", *PLAIN_TRAINING, "evaluate.min_accuracy=0.05"]
LEARNING_RATE = "train.optimizer.learning_rate"


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def write_tune_config(path: Path, **tune) -> Path:
    path.write_text(yaml.safe_dump({"tune": {"search_space": {LEARNING_RATE: {"low": 3.0e-4, "high": 3.0e-3, "log": True}},
                                             **tune}}))
    return path


def study_json(root: Path) -> dict:
    found = list((root / "tune").glob("*/study.json"))
    return json.loads(found[0].read_text()) if found else {"trials": []}


def published(root: Path, fp: str) -> Path | None:
    manifest = root / "train" / fp / "manifest.json"
    return manifest if manifest.exists() else None


def half_done(root: Path) -> list[str]:
    """Fingerprints of trials with a checkpoint and no published model, once some trial has finished."""
    if not any(t["state"] == "complete" for t in study_json(root)["trials"]):
        return []
    return [w.parent.parent.name.removeprefix(".work-") for w in (root / "train").glob(".work-*/checkpoints/checkpoint")
            if not published(root, w.parent.parent.name.removeprefix(".work-"))]


def kill_with_a_trial_half_done(proc: subprocess.Popen, root: Path, log: Path) -> tuple[dict, list[str]]:
    """SIGKILL the study's whole process group at a moment when one trial has finished and another has a
    checkpoint but no model: the group is frozen (SIGSTOP) to look, so nothing moves between looking and killing."""
    deadline = time.time() + 480
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if half_done(root):
            os.killpg(proc.pid, signal.SIGSTOP)
            unfinished = half_done(root)
            if unfinished:
                before = study_json(root)
                crash(proc)
                return before, unfinished
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.2)
    pytest.fail("no trial got half-way: " + log.read_text()[-3000:])


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created)


def test_a_study_killed_mid_trial_resumes_without_training_twice_and_its_preset_is_a_cache_hit(prefect_server, tmp_path):
    root = tmp_path / "artifacts"
    config = write_tune_config(tmp_path / "tune.yaml", trials=4, parallel=2, sampler="random", pruner="none")
    args = ["tune", "--config", str(config), *sets(f"artifacts.root={root}", "train.epochs=2", "export.formats=[saved_model]",
                                                   *TINY)]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, stdout=out, stderr=out, env=env,
                                start_new_session=True)
        try:
            before, unfinished = kill_with_a_trial_half_done(proc, root, log)
        finally:
            crash(proc)

    done = run_cli(*args, env={"PREFECT_API_URL": prefect_server}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_json(root)
    trials = {t["number"]: t for t in study["trials"]}
    assert sorted(trials) == [0, 1, 2, 3] and all(t["state"] == "complete" for t in trials.values()), study
    for t in before["trials"]:  # finished before the kill: kept, not trained again
        if t["state"] == "complete":
            assert trials[t["number"]]["worker"] == t["worker"] and trials[t["number"]]["value"] == t["value"]
    for fp in unfinished:  # running at the kill: resumed from its checkpoint
        assert json.loads((root / "train" / fp / "history.json").read_text())["resumed_from_epoch"] >= 1
    assert all(published(root, t["model_fingerprint"]) for t in trials.values())  # each under its fingerprint
    assert len(trials) == len({t["model_fingerprint"] for t in trials.values()})
    assert len([d for d in (root / "ingest").iterdir() if not d.name.startswith(".")]) == 1  # one ingest for all
    assert not list((root / "train").glob(".work-*"))
    best = max(trials.values(), key=lambda t: t["value"])
    assert study["best_trial"] == best["number"]
    assert all(len(t["epochs"]) == 2 and t["value"] == t["epochs"][-1] for t in trials.values())  # each epoch reported
    assert f"best: trial {best['number']}, objective {best['value']:.4f}" in done.stdout
    exports = {t["number"]: json.loads(published(root, t["model_fingerprint"]).read_text())["exports"] for t in trials.values()}
    assert {n for n, e in exports.items() if e} == {best["number"]} and "saved_model" in exports[best["number"]]

    rows = json.loads(latest_artifact("tuning-study").data)  # the study table on the dashboard
    assert sorted((r["trial"], r["state"], r["model"]) for r in rows) == sorted(
        (t["number"], "complete", t["model_fingerprint"][:12]) for t in trials.values())

    preset = Path(done.stdout.split("preset: ")[1].split()[0])
    header = preset.read_text().split("\n\n")[0]
    assert f"Reaches: val_accuracy {best['value']:.4f}" in header and "Run:   tfpipe run --config" in header
    again = run_cli("train", "--config", str(preset), "--set", f"artifacts.root={root}", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    model = json.loads(again.stdout)
    assert model["fingerprint"] == best["model_fingerprint"] and model["cache_hit"]


def test_hopeless_trials_are_pruned_after_their_first_epoch_in_both_styles_and_publish_nothing(prefect_server, tmp_path):
    from flows.tuning import tuning_flow

    root = tmp_path / "artifacts"
    space = {LEARNING_RATE: {"low": 1.0e-9, "high": 1.0e-2, "log": True}, "train.mode": {"choices": ["fit", "custom"]}}
    good, hopeless = {LEARNING_RATE: 3.0e-3}, {LEARNING_RATE: 1.0e-9}
    overrides = {"artifacts.root": str(root), "train.epochs": 2, "tune.search_space": space, "tune.trials": 3,
                 "tune.parallel": 1, "tune.objective": "val_loss", "tune.pruner": "median",
                 "tune.pruning_startup_trials": 1,  # a good trial, then a hopeless one in each style
                 "tune.enqueue": [{**good, "train.mode": "fit"}, {**hopeless, "train.mode": "fit"},
                                  {**hopeless, "train.mode": "custom"}],
                 **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY)}}
    summary = tuning_flow(overrides=overrides)
    first, *pruned = sorted(summary.trials, key=lambda t: t["number"])
    assert first["state"] == "complete" and first["params"][LEARNING_RATE] == 3.0e-3 and len(first["epochs"]) == 2
    assert [t["params"]["train.mode"] for t in pruned] == ["fit", "custom"]
    for trial in pruned:
        assert trial["state"] == "pruned" and len(trial["epochs"]) == 1  # stopped at once
        assert trial["epochs"][0] > first["epochs"][0]  # its val_loss: worse than the finished trial's
        assert published(root, trial["model_fingerprint"]) is None
        assert not (root / "train" / f".work-{trial['model_fingerprint']}").exists()
    assert summary.best_trial == first["number"] and summary.best_model.endswith(first["model_fingerprint"])


def test_a_study_on_postgresql_runs_its_trials_on_two_separate_dask_workers(prefect_server, postgres, tmp_path):
    import optuna

    url, psql = postgres
    subprocess.run([*psql, "-d", "postgres", "-c", "CREATE DATABASE optuna"], check=True, capture_output=True)
    study_db = url.replace("postgresql+asyncpg://", "postgresql://").rsplit("/", 1)[0] + "/optuna"
    port = free_port()
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                 "--no-nanny", "--dashboard-address", ":0"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for _ in range(2)]
    try:
        root = tmp_path / "artifacts"
        config = write_tune_config(tmp_path / "tune.yaml", trials=2, parallel=2, sampler="random", pruner="none",
                                   storage=study_db, dask_address=f"tcp://127.0.0.1:{port}")
        done = run_cli("tune", "--config", str(config), *sets(f"artifacts.root={root}", "train.epochs=1", *TINY),
                       env={"PREFECT_API_URL": prefect_server}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        for proc in [*workers, scheduler]:
            crash(proc)
    study = study_json(root)
    assert study["storage"] == study_db and [t["state"] for t in study["trials"]] == ["complete", "complete"]
    assert {int(t["worker"].rsplit(":", 1)[1]) for t in study["trials"]} == {w.pid for w in workers}
    stored = optuna.load_study(study_name=study["study"], storage=study_db.replace("postgresql://", "postgresql+psycopg://"))
    assert sorted(t.value for t in stored.trials) == sorted(t["value"] for t in study["trials"])
    assert not list((root / "tune").glob("*/journal.log"))  # the study lives in the database alone


def test_a_study_that_cannot_start_says_why_in_one_line(prefect_server, tmp_path):
    closed = f"postgresql://tfpipe@127.0.0.1:{free_port()}/optuna"
    config = write_tune_config(tmp_path / "tune.yaml", storage=closed)
    server = {"PREFECT_API_URL": prefect_server}
    done = run_cli("tune", "--config", str(config), "--set", f"artifacts.root={tmp_path}", env=server)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"tfpipe: error: cannot open the study database {closed}")
    assert not (tmp_path / "ingest").exists()
    empty = run_cli("tune", "--set", f"artifacts.root={tmp_path}", env=server)
    assert empty.returncode == 1
    assert empty.stderr.strip().splitlines()[-1].startswith("tfpipe: error: tune.search_space is empty")
    bad = run_cli("tune", "--set", "tune.search_space={train.epoch: {low: 1, high: 3}}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "tfpipe: config error: tune.search_space: train.epoch=1: train.epoch: unknown key (did you mean epochs?)"]
