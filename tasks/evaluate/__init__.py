"""The evaluate stage (stage.py): the metrics of one pass over the test split (metrics.py), what the gate decides
(gate.py), the figures (plots.py) and the model card written after every evaluation (model_card.py).

May import: tasks.data, tasks.model, tasks.validation, tasks.registry, tasks.store, tasks.tracking.
"""
