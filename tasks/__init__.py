"""The stages as plain functions over TensorFlow and pyarrow; no Prefect, no CLI. They log to `tfpipe.*`."""

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
