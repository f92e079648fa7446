"""The stages as plain functions over TensorFlow and pyarrow; no Prefect, no CLI (flows/ wraps them). They log to
`tfpipe.*`. A room per stage or role, each room importing only rooms above it in this list (its docstring
says which):

- store/: every path, publishing, references and `cache:`, leases, gc
- registry/: the champion, the published models, how the champion changes
- preprocess/: an encoded image or an array to the model's pixels (Pillow, and its twin in the serving graph)
- validation/: image statistics, the validate stage, drift at prediction
- data/: sources, prediction inputs, splits, the ingest stage, the reader
- model/: building a model, backbones, a published model, precision
- distributed/: devices, strategies, the multi-worker cluster
- serve/: signatures, serving formats and their parity check, batch prediction
- evaluate/: metrics, the gate, figures, the model card
- train/: the train stage and its steps, a multi-worker worker
- tune/: the Optuna study and one trial
Beside the rooms, in tasks/ itself, what any room may use: errors.py (the errors a user fixes), progress.py
(terminal progress bars), tracking.py (MLflow tracking of training runs and their evaluations: train and evaluate
both report to it).
"""

import logging
import os
import sys

# Set by a `tfpipe` command for itself and the processes it starts (Dask workers, training workers): "1" quiet,
# "0" verbose (-v).
QUIET_ENV = "TFPIPE_QUIET"


def configure_logging() -> None:
    """Stage logs (cache hits, epochs, gate decisions) on stderr at INFO (with -v also DEBUG: progress within an
    epoch), everything else at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("tfpipe").setLevel(logging.DEBUG if os.environ.get(QUIET_ENV) == "0" else logging.INFO)
