"""The tuning flow: one ingest, then Optuna trials on Dask (each the ordinary train stage with the trial's config),
then the best trial's model through the normal gate and its config as a preset."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel

from flows import dashboard
from flows.dask_cluster import dask_runner, threads_per_worker
from flows.policy import served_call
from flows.stages import evaluate_task, ingest_task, resolved, validate_task
from pipeline_config import PipelineConfig, load_config
from tasks.distributed.devices import configure_devices
from tasks.errors import PipelineError, first_line
from tasks.model.build import check_model_config
from tasks.store.lease import stage_lease
from tasks.store.publish import find_published, stage_dir
from tasks.store.refs import EvaluationArtifact, ModelArtifact
from tasks.store.storage import check_reachable, join
from tasks.tune import study as tuning


class TuneSummary(BaseModel):
    study: str
    study_json: str
    trials: list[dict]
    best_trial: int | None
    best_value: float | None
    best_model: str | None
    preset: str | None
    evaluation: EvaluationArtifact | None
    seconds: float


@flow(name="tuning")
def tuning_flow(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TuneSummary:
    started = time.perf_counter()
    config_file, overrides = served_call(config_file, overrides)  # under tfpipe serve: what callers may set
    cfg = load_config(config_file, overrides)
    check_reachable(cfg.artifacts.root)
    tuning.check_tunable(cfg)
    tuning.open_study(cfg)  # an unreachable study database: one line, before any work
    configure_devices(cfg.train)
    check_model_config(cfg)
    try:
        # 1. ingest and validate: one cache for every trial (a trial that changes data.* ingests its own)
        validation = validate_task(cfg, ingest_task(cfg))
        # 2. trials: Optuna asks, Dask workers train, Optuna is told; one run of a study at a time
        with stage_lease(cfg.artifacts.root, tuning.STAGE, tuning.study_name(cfg)):
            if tuning.work_left(cfg, tuning.open_study(cfg)):  # a finished study starts no cluster
                run_trials.with_options(task_runner=dask_runner(cfg.tune.dask_address, cfg.tune.parallel))(
                    config_file, overrides)
        study = tuning.open_study(cfg)
        record = tuning.write_study(cfg, study)
        best = tuning.best_trial(study)
        if best is None:
            raise PipelineError(f"no trial of study {record['study']} finished ({states_line(record['trials'])}): see "
                                f"{join(tuning.study_dir(cfg), tuning.STUDY_JSON)}")
        # 3. evaluate: the best trial's model through the normal gate (promoted only if the gate says so)
        best_cfg = load_config(config_file, tuning.trial_overrides(overrides, best.params, exports=True))
        model = export_task(best_cfg, best.user_attrs["model_fingerprint"])
        evaluation = evaluate_task(best_cfg, resolved(ingest_task(best_cfg)), model, validation)
        # 4. the best config as a preset, and the study on the dashboard
        preset = tuning.write_best_preset(cfg, config_file, overrides, best, evaluation.metrics["accuracy"],
                                          evaluation.blessed)
        dashboard.markdown("tuning-report", _report(record, best, evaluation, preset), description="tfpipe tune")
        return TuneSummary(study=record["study"], study_json=join(tuning.study_dir(cfg), tuning.STUDY_JSON),
                           trials=record["trials"], best_trial=best.number, best_value=best.value,
                           best_model=model.uri, preset=preset, evaluation=evaluation,
                           seconds=time.perf_counter() - started)
    finally:
        dashboard.drain()


@task(name="trial", cache_policy=NO_CACHE)
def trial_task(config_file: str | None, overrides: dict[str, Any] | None, number: int, params: dict[str, Any],
               threads: int) -> dict:
    from tasks.tune.trial import run_trial

    return run_trial(config_file, overrides, number, params, threads)


@flow(name="tuning-trials")
def run_trials(config_file: str | None, overrides: dict[str, Any] | None) -> None:
    """Keep `tune.parallel` trials running until the study has `tune.trials` (or the timeout passed); the trials a
    killed run left running go first, resuming from their checkpoints."""
    cfg = load_config(config_file, overrides)
    log = get_run_logger()
    study = tuning.open_study(cfg)
    tuning.enqueue(cfg, study)
    threads, budget, deadline = threads_per_worker(cfg.tune.parallel), tuning.budget(cfg), _deadline(cfg)
    running = {}
    for orphan in tuning.orphans(study):
        log.info("trial %d resumes (its run was interrupted)", orphan.number)
        running[trial_task.submit(config_file, overrides, orphan.number, orphan.params, threads)] = orphan.number
    while True:
        while len(running) < cfg.tune.parallel and len(tuning.started_trials(study)) < budget and time.time() < deadline:
            trial = study.ask(tuning.distributions(cfg))
            log.info("trial %d starts: %s", trial.number, trial.params)
            running[trial_task.submit(config_file, overrides, trial.number, trial.params, threads)] = trial.number
        if not running:
            break
        future = next(as_completed(list(running)))
        number = running.pop(future)
        try:
            result = future.result()
        except Exception as exc:  # the task itself failed (its worker died, say): the trial failed
            result = {"state": "failed", "error": f"{type(exc).__name__}: {first_line(exc)}"}
        tuning.tell(study, number, result)
        record = tuning.write_study(cfg, study)
        dashboard.table("tuning-study", description="one row per trial", rows=[_row(t) for t in record["trials"]])
        log.info("trial %d %s%s", number, result["state"], f": {result['value']:.4f}" if "value" in result else "")


def _deadline(cfg: PipelineConfig) -> float:
    return time.time() + cfg.tune.timeout if cfg.tune.timeout else float("inf")


@task(name="export-best", cache_policy=NO_CACHE)
def export_task(cfg: PipelineConfig, fp: str) -> ModelArtifact:
    """The best trial's model with the configured serving formats (trials publish model.keras alone)."""
    from tasks.serve.export import export_published, missing_formats
    from tasks.store.refs import model_artifact

    manifest = find_published(cfg.artifacts.root, "train", fp)
    if manifest is None:
        raise PipelineError(f"the best trial's model {fp[:12]} is not published under {cfg.artifacts.root}: was it "
                            "removed (tfpipe gc)? Run tfpipe tune again to retrain it")
    if missing_formats(cfg.export, manifest):
        manifest = export_published(cfg, fp, missing_formats(cfg.export, manifest))
    return model_artifact(stage_dir(cfg.artifacts.root, "train", fp), manifest, cache_hit=True)


def _row(trial: dict) -> dict:
    """A study.json trial as a dashboard row (the UI sorts columns by name)."""
    return {"trial": trial["number"], "state": trial["state"],
            "objective": None if trial["value"] is None else round(trial["value"], 6),
            "objective per epoch": ", ".join(f"{v:.4f}" for v in trial["epochs"]),
            "parameters": ", ".join(f"{k}={v}" for k, v in trial["params"].items()),
            "seconds": None if trial["duration_s"] is None else round(trial["duration_s"], 1),
            "model": (trial["model_fingerprint"] or "")[:12]}


def states_line(trials: list[dict]) -> str:
    states = [t["state"] for t in trials]
    return ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no trials"


def _report(record: dict, best, evaluation: EvaluationArtifact, preset: str) -> str:
    return "\n".join([
        f"# Study {record['study']}", f"- objective `{record['objective']}` ({record['direction']}), sampler "
        f"`{record['sampler']}`, pruner `{record['pruner']}`; trials: {states_line(record['trials'])}",
        f"- best: trial {best.number}, {record['objective']} {best.value:.4f}: "
        + ", ".join(f"`{k}={v}`" for k, v in best.params.items()),
        f"- its model `{best.user_attrs['model_fingerprint'][:12]}`: test accuracy "
        f"{evaluation.metrics['accuracy']:.4f}, gate **{'BLESSED' if evaluation.blessed else 'NOT BLESSED'}**",
        f"- preset: `{preset}`"])
