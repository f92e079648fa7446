"""Hyperparameter tuning: an Optuna study whose trials are ordinary train stages.

The orchestrator (flows/tuning.py) asks the study for a trial's values; a Dask worker trains the trial's config
(trial.py: its own fingerprint, lease, checkpoints and published model; a config trained before is a cache
hit), reporting each epoch's objective so that the pruner can stop it; the orchestrator tells the study how it
ended. The study lives in Optuna's storage: a journal file under the artifact root (workers that see that
directory), or a database (`tune.storage`: PostgreSQL for workers on several machines). A killed study run again
continues: its finished trials are kept, the ones it was running resume from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from typing import Any

import numpy as np
import yaml

from pipeline_config import PipelineConfig, fingerprint, user_settings
from tasks.errors import PipelineError, first_line
from tasks.store import storage
from tasks.store.storage import join

log = logging.getLogger("tfpipe.tune")

STAGE = "tune"
STUDY_JSON = "study.json"
BEST_PRESET = "best.yaml"
# what a preset of the best trial leaves out: how the study ran, and where the artifacts are (the command says)
NOT_IN_PRESET = ("tune", "tracking", "artifacts", "rerun")


def study_name(cfg: PipelineConfig) -> str:
    """The base config and what defines the search, not how many trials run, how many at once or where: the
    same command (with more trials, say) continues the same study."""
    search = cfg.tune.model_dump(mode="json", include={"search_space", "objective", "direction", "sampler", "pruner",
                                                       "pruning_startup_trials", "warmup_epochs", "seed", "enqueue"})
    base = cfg.model_dump(mode="json", include={"data", "model", "train"})
    return "tfpipe-" + fingerprint({"base": base, "search": search})[:16]


def study_dir(cfg: PipelineConfig) -> str:
    return join(cfg.artifacts.root, STAGE, study_name(cfg))


def check_tunable(cfg: PipelineConfig) -> None:
    """Before any work: what a study cannot do."""
    if not cfg.tune.search_space:
        raise PipelineError("tune.search_space is empty: name the keys to tune, e.g. --set "
                            "'tune.search_space={train.optimizer.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}}'")
    if cfg.train.multi_worker:
        raise PipelineError("tfpipe tune trains each trial in one process (a Dask worker): unset train.strategy="
                            "multi_worker and train.local_workers, or tune with mirrored replicas (train.cpu_replicas)")
    if cfg.tune.dask_address and not cfg.tune.storage and not storage.is_local(cfg.artifacts.root):
        raise PipelineError("a bucket artifact root with a Dask scheduler needs tune.storage (a database URL such as "
                            "postgresql://user@host:5432/db): the study's journal file is on this machine only")


def redacted(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def _storage(cfg: PipelineConfig):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = cfg.tune.storage
    if url:
        try:  # SQLAlchemy's default PostgreSQL driver is psycopg2; tfpipe[postgres] installs psycopg 3
            return optuna.storages.RDBStorage(re.sub(r"^postgresql://", "postgresql+psycopg://", url),
                                              engine_kwargs={"pool_pre_ping": True})
        except ImportError as exc:
            raise PipelineError(f"tune.storage={redacted(url)} needs a database driver ({first_line(exc)}): pip install "
                                "'tfpipe[postgres]'") from None
        except Exception as exc:  # sqlalchemy.exc.OperationalError and kin: unreachable, refused, no such database
            raise PipelineError(f"cannot open the study database {redacted(url)} ({type(exc).__name__}: "
                                f"{first_line(exc)}): check tune.storage and that the server is up") from None
    if storage.is_local(cfg.artifacts.root):
        directory = study_dir(cfg)
    else:  # the journal needs a file lock: kept on this machine, beside the other local copies of a bucket root
        directory = os.path.join(os.path.expanduser(cfg.artifacts.local_cache), STAGE, study_name(cfg))
    os.makedirs(directory, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(directory, "journal.log")))


def _sampler(cfg: PipelineConfig, seed: int):
    import optuna

    tune = cfg.tune
    if tune.sampler == "grid":
        return optuna.samplers.GridSampler(grid(cfg), seed=seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # a few random trials first, then TPE; several at once: running trials count as a likely value (constant liar)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, tune.trials // 4)),
                                      constant_liar=tune.parallel > 1)


def _pruner(cfg: PipelineConfig):
    import optuna

    tune = cfg.tune
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruning_startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: PipelineConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=_storage(cfg), study_name=study_name(cfg), pruner=_pruner(cfg),
                                direction="maximize" if cfg.tune.maximize else "minimize", load_if_exists=True)
    # Seeded past the trials the study has: a resumed study draws new values, not its first run's again.
    study.sampler = _sampler(cfg, cfg.tune.seed + len(study.get_trials(deepcopy=False)))
    return study


def distributions(cfg: PipelineConfig) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in cfg.tune.search_space.items():
        if dim.choices is not None:
            out[key] = CategoricalDistribution(dim.choices)
        elif dim.integer:
            out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            out[key] = FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return out


def grid(cfg: PipelineConfig) -> dict[str, list]:
    """Every value of every dimension (choices, or a range in steps)."""
    out = {}
    for key, dim in cfg.tune.search_space.items():
        if dim.choices is not None:
            out[key] = list(dim.choices)
        elif dim.integer:
            out[key] = list(range(int(dim.low), int(dim.high) + 1, int(dim.step)))
        else:
            count = int(np.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1
            out[key] = [round(dim.low + i * dim.step, 12) for i in range(count)]
    return out


def budget(cfg: PipelineConfig) -> int:
    """Trials in the study: tune.trials, or fewer when a grid has fewer points."""
    if cfg.tune.sampler == "grid":
        return min(cfg.tune.trials, int(np.prod([len(v) for v in grid(cfg).values()])))
    return cfg.tune.trials


def started_trials(study) -> list:
    """Trials that count against the budget: finished, or running (enqueued ones wait their turn)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                    TrialState.RUNNING))


def orphans(study) -> list:
    """Trials left running by a run of the study that was killed. Called under the study's lease: no live run
    is training them."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def work_left(cfg: PipelineConfig, study) -> bool:
    """Whether a run of the study has anything to do: trials to resume, or budget left."""
    return bool(orphans(study)) or len(started_trials(study)) < budget(cfg)


def enqueue(cfg: PipelineConfig, study) -> None:
    for params in cfg.tune.enqueue:
        study.enqueue_trial(params, skip_if_exists=True)


def tell(study, number: int, result: dict) -> None:
    """The trial's end, as the worker reported it (or a crash the orchestrator saw)."""
    from optuna.trial import TrialState

    if result["state"] == "complete":
        study.tell(number, result["value"], skip_if_finished=True)
    else:
        study.tell(number, state=TrialState.PRUNED if result["state"] == "pruned" else TrialState.FAIL,
                   skip_if_finished=True)


def trial_row(trial) -> dict:
    steps = sorted(trial.intermediate_values)
    duration = trial.duration.total_seconds() if trial.duration else None
    return {"number": trial.number, "state": trial.state.name.lower(), "params": trial.params, "value": trial.value,
            "epochs": [trial.intermediate_values[s] for s in steps], "duration_s": duration,
            **{k: trial.user_attrs.get(k) for k in ("model_fingerprint", "worker", "cache_hit", "error")}}


def best_trial(study):
    """The best finished trial, or None when none finished."""
    try:
        return study.best_trial
    except ValueError:
        return None


def study_record(cfg: PipelineConfig, study) -> dict:
    best = best_trial(study)
    tune = cfg.tune
    return {"study": study_name(cfg), "objective": tune.objective,
            "direction": "maximize" if tune.maximize else "minimize", "sampler": tune.sampler, "pruner": tune.pruner,
            "storage": redacted(tune.storage) if tune.storage else "journal file", "budget": budget(cfg),
            "search_space": {k: v.model_dump(exclude_none=True) for k, v in tune.search_space.items()},
            "trials": [trial_row(t) for t in study.get_trials(deepcopy=False)],
            "best_trial": best.number if best else None}


def write_study(cfg: PipelineConfig, study) -> dict:
    record = study_record(cfg, study)
    storage.write_json(join(study_dir(cfg), STUDY_JSON), record)
    return record


def trial_overrides(overrides: dict[str, Any] | None, params: dict[str, Any], exports: bool = False) -> dict[str, Any]:
    """A trial's config: the study's overrides with the trial's values over them. A trial publishes model.keras
    alone (the serving formats, each checked in a process of its own, would cost more than the trial on a small
    model): the best trial gets them after the study, as any published model missing a format does."""
    return {**(overrides or {}), **params, **({} if exports else {"export.formats": []})}


def gpus() -> str:
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    return f" and {len(found)} GPU(s)" if found else ", no GPU"


def write_best_preset(cfg: PipelineConfig, config_file: str | None, overrides: dict | None, best,
                      test_accuracy: float | None, blessed: bool | None) -> str:
    """The best trial's config as a preset (the user's file and settings with the trial's values), with the usual
    header; `tfpipe run --config` on it reuses the trial's model (a train cache hit)."""
    settings = user_settings(config_file, trial_overrides(overrides, best.params, exports=True))
    body = {k: v for k, v in settings.items() if k not in NOT_IN_PRESET}
    minutes = best.duration.total_seconds() / 60 if best.duration else float("nan")
    reached = f"{cfg.tune.objective} {best.value:.4f} (trial {best.number} of study {study_name(cfg)})"
    if test_accuracy is not None:
        reached += f"; test accuracy {test_accuracy:.4f}, gate: {'BLESSED' if blessed else 'not blessed'}"
    path = join(study_dir(cfg), BEST_PRESET)
    header = [f"# The best trial of tfpipe tune: {', '.join(f'{k}={v}' for k, v in best.params.items())}.", "#",
              f"# Reaches: {reached}.",
              f"# Takes: {minutes:.1f} minutes to train (trial {best.number}) on {os.cpu_count()} "
              f"{platform.machine()} cores{gpus()}.",
              f"# Run:   tfpipe run --config {path} --set artifacts.root={cfg.artifacts.root}",
              "#        (the train stage reuses the trial's model: a cache hit)", ""]
    storage.write_bytes(path, ("\n".join(header) + yaml.safe_dump(body, sort_keys=False)).encode())
    return path
