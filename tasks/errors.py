"""Errors a user can fix. The CLI prints their message as one line and exits non-zero, no traceback."""

import errno


class PipelineError(Exception):
    """Bad input or an unusable artifact: the message names the problem and what to do about it."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class Stopped(PipelineError):
    """A stage stopped on a signal (SIGTERM) after saving what lets the next run resume."""


class CorruptArtifact(PipelineError):
    """A published output fails its checks (a shard's sha256, a missing file): derived data, to be rebuilt."""


# errno values and TensorFlow error classes that mean the environment, not the input, is at fault
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def environment_error(exc: BaseException, doing: str) -> PipelineError | None:
    """A one-line PipelineError for a full disk or a permission problem met while `doing` something, else None.
    Covers Python's OSError and TensorFlow's own I/O errors (which carry the OS message, not an errno)."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code in _NO_SPACE or "No space left on device" in text or "Disk quota exceeded" in text:
        return PipelineError(f"no space left on the device while {doing}: free space there, or point "
                             "artifacts.root (TFPIPE_ARTIFACTS) at a larger disk; nothing partial was published")
    if code in _NO_ACCESS or type(exc).__name__ == "PermissionDeniedError" or "Permission denied" in text \
            or "Read-only file system" in text:
        return PipelineError(f"permission denied while {doing} ({first_line(exc, 160)}): make the place writable "
                             "for this user, or point artifacts.root (TFPIPE_ARTIFACTS) elsewhere")
    return None
