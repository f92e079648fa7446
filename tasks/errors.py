"""Errors a user can fix. The CLI prints their message as one line and exits non-zero, no traceback."""


class PipelineError(Exception):
    """Bad input or an unusable artifact: the message names the problem and what to do about it."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
