"""Hyperparameter tuning: the Optuna study, its storage, sampler and pruner, study.json and the best preset
(study.py), and one trial on a Dask worker, the ordinary train stage (trial.py).

May import: tasks.train, tasks.distributed, tasks.model, tasks.store.
"""
