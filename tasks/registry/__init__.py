"""The model registry: the champion pointer and its history (champion.py), the published models and how a command
names one (models.py), and how the champion changes: the gate, promote, rollback (decisions.py).

May import: tasks.store.
"""
