"""Prefect 3 flows over the tfpipe stages, the deployments that run them, and the `tfpipe` CLI."""

import logging
import os

# Quiet TensorFlow's C++ start-up chatter, and forward the stages' own loggers (tfpipe.*) into Prefect's run
# logs; both must be set before TensorFlow / Prefect configure logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tfpipe")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The stages also run outside flows (the per-stage CLI commands): their logs then stay local, without a warning.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

# The stages log progress (cache hits, epochs, gate decisions) at INFO: let it through to Prefect's handlers.
logging.getLogger("tfpipe").setLevel(logging.INFO)
