"""The data's checks: image statistics streamed at ingest (statistics.py), the validate stage against a schema and
the champion's data (validate.py), and skew at prediction (drift.py).

May import: tasks.registry (the champion's data, its evaluation), tasks.store.
"""
