"""Prefect 3 flows over the tfpipe stages, the deployments that run them, and the `tfpipe` CLI."""

import logging
import os

# Quiet TensorFlow's C++ start-up chatter, and forward the stages' own loggers (tfpipe.*) into Prefect's run
# logs; both must be set before TensorFlow / Prefect configure logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tfpipe")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server gets 20 s to answer by default. On a new PREFECT_HOME it first creates and migrates
# its database, while this process imports TensorFlow on the same cores: 13-21 s measured on a 2-core VM, so
# the first `tfpipe run` of a new user timed out. Six times the worst measured, where the user set nothing.
EPHEMERAL_STARTUP_TIMEOUT_S = 120
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
# The stages also run outside flows (the per-stage CLI commands): their logs then stay local, without a warning.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

# The stages log progress (cache hits, epochs, gate decisions) at INFO: let it through to Prefect's handlers.
logging.getLogger("tfpipe").setLevel(logging.INFO)

# A process started by a quiet `tfpipe` (a Dask worker imports this package with the task it runs): quiet there too.
from flows.console import quiet_child_logs  # noqa: E402

quiet_child_logs()
