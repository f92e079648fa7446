"""Serving a model: the SavedModel's signatures (signatures.py), the serving formats written beside model.keras
(export.py), each checked against Keras in a process of its own (parity.py, run_exported.py), and batch
prediction, locally (predict.py) or one part per file on Dask (parts.py).

May import: tasks.data, tasks.preprocess, tasks.model, tasks.registry, tasks.validation (drift), tasks.distributed
(thread pools), tasks.store.
"""
