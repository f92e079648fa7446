"""Errors a user can fix. The CLI prints their message as one line and exits non-zero, no traceback."""


class PipelineError(Exception):
    """Bad input or an unusable artifact: the message names the problem and what to do about it."""
