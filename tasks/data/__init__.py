"""The data: every source of labelled images (sources.py, and one module per kind: parquet.py, arrays.py,
tfds.py, folders.py with image_files.py), what a prediction input is (inputs.py), the seeded splits
(splits.py), the ingest stage that writes the TFRecord cache (ingest.py), and reading it back for training and
evaluation (reader.py, with augment.py). How one image becomes pixels is tasks/preprocess/'s.

May import: tasks.preprocess, tasks.validation (statistics computed in ingest's pass), tasks.store.
"""
