"""One trial of a tuning study, on a Dask worker: the ordinary train stage with the trial's config, each epoch's
objective reported to the study, stopped at once when the pruner says so (nothing is published then)."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from pipeline_config import load_config
from tasks.errors import PipelineError
from tasks.store import storage
from tasks.store.storage import join
from tasks.tune.study import open_study, trial_overrides

log = logging.getLogger("tfpipe.tune")


def objective_value(history: list[dict], objective: str, best_epoch: int | None) -> float:
    """What the trial reached: the epoch whose weights were published (early stopping's best), else the last."""
    epoch = history[best_epoch - 1] if best_epoch else history[-1]
    return float(epoch[objective])


def run_trial(config_file: str | None, overrides: dict[str, Any] | None, number: int, params: dict[str, Any],
              threads: int | None = None) -> dict:
    """Train trial `number` with `params` over the study's config. Returns how it ended: complete (with its
    value), pruned or failed (with the one-line reason); the orchestrator tells the study."""
    import optuna

    from tasks.distributed.devices import configure_devices, limit_threads
    from tasks.train.worker import ingest_for
    from tasks.model.precision import resolve_precision
    from tasks.train.checkpoints import clear_work
    from tasks.train.stage import train, train_fingerprint

    if threads:
        limit_threads(threads)
    study_cfg = load_config(config_file, overrides)
    study = open_study(study_cfg)
    trial = optuna.trial.Trial(study, _trial_id(study, number))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    cfg = load_config(config_file, trial_overrides(overrides, params))
    objective = cfg.tune.objective
    try:
        configure_devices(cfg.train)
        dataset = ingest_for(cfg)
        fp = train_fingerprint(cfg, dataset, resolve_precision(cfg.train.precision)[0])
        trial.set_user_attr("model_fingerprint", fp)
        reported = set(_reported_epochs(study, number))

        def on_epoch(record: dict) -> None:
            _report(trial, reported, record["epoch"], float(record[objective]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"{objective}={record[objective]:.4f} after epoch {record['epoch']}")

        started = time.perf_counter()
        try:
            model = train(cfg, dataset, on_epoch=on_epoch)
        except optuna.TrialPruned as exc:
            clear_work(cfg, fp)  # nothing to resume: the trial is over
            log.info("trial %d pruned: %s", number, exc)
            return {"state": "pruned"}
        history = storage.read_json(join(model.uri, model.history_path))
        for record in history["epochs"]:  # a cache hit, or a resumed run's epochs before the interruption
            _report(trial, reported, record["epoch"], float(record[objective]))
        trial.set_user_attr("cache_hit", model.cache_hit)
        value = objective_value(history["epochs"], objective, history.get("best_epoch"))
        log.info("trial %d: %s=%.4f (model %s%s, %.0fs)", number, objective, value, fp[:12],
                 ", cache hit" if model.cache_hit else "", time.perf_counter() - started)
        return {"state": "complete", "value": value}
    except PipelineError as exc:  # this trial's config cannot train (a bad value, too little memory): the next may
        trial.set_user_attr("error", str(exc))
        log.warning("trial %d failed: %s", number, exc)
        return {"state": "failed", "error": str(exc)}


def _trial_id(study, number: int) -> int:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t._trial_id  # Optuna's storage key; a Trial object on another process is built from it
    raise PipelineError(f"trial {number} is not in study {study.study_name}: was the study's storage reset?")


def _reported_epochs(study, number: int) -> list[int]:
    return [step for t in study.get_trials(deepcopy=False) if t.number == number for step in t.intermediate_values]


def _report(trial, reported: set[int], epoch: int, value: float) -> None:
    if epoch not in reported:
        trial.report(value, epoch)
        reported.add(epoch)
