"""The stages as plain functions over TensorFlow and pyarrow; no Prefect, no CLI. They log to `tfpipe.*`."""

import logging
import sys


def configure_logging() -> None:
    """Stage logs (cache hits, epochs, gate decisions) on stderr at INFO, everything else at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("tfpipe").setLevel(logging.INFO)
