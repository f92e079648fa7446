"""The model: building it from the config (build.py: the layer stack or a keras.applications backbone from
backbones.py, and the head), a published model as inference uses it (published.py), and the precision it
computes in (precision.py).

May import: tasks.data (the image shape known before ingest), tasks.store.
"""
