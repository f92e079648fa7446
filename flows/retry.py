"""When a Prefect task retries: I/O hiccups, not bad input or bad config (those fail the same way every time).
Kept apart from the stage modules so that importing it loads no TensorFlow."""

from __future__ import annotations

from pipeline_config import ConfigError
from tasks.errors import PipelineError


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except (PipelineError, ConfigError):
        return False
    except Exception:
        return True
    return False
