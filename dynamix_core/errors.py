"""Failures that no retry can fix and that the command line reports in one line.

:class:`StopRun` is raised for a deterministic failure found while a job runs (a run folder held by
another run, data that cannot fill a batch, a first labelling round that failed): the driver does not
let Ray Train restart its workers for it, and ``dynamix`` prints its message as the one line of the
error. :func:`os_error_line` says the same for a file system that refuses a write (read-only, no
permission, no space left).
"""

from __future__ import annotations

import errno
import re


class StopRun(RuntimeError):
    """A failure that a restart would meet again; its message is one line saying what to do."""


#: errno -> what the user can do about it
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space there or choose another output folder",
    errno.EDQUOT: "the disk quota is exhausted; free space there or choose another output folder",
    errno.EROFS: "the file system is read-only; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write to, or fix its permissions",
}


def os_error_line(exc: BaseException) -> str | None:
    """One line naming the path and what to do for a write refused by the file system (``exc``, or an
    ``OSError`` it wraps, e.g. through Ray); None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OS_ADVICE:
            where = exc.filename or "the output folder"
            return f"cannot write {where}: {_OS_ADVICE[exc.errno]}"
        match = _ERRNO_TEXT.search(str(exc))  # a wrapper that kept only the text (Ray's retry messages)
        if match and int(match[1]) in _OS_ADVICE:
            return f"cannot write {match[2] or 'the output folder'}: {_OS_ADVICE[int(match[1])]}"
        exc = getattr(exc, "cause", None) or exc.__cause__ or getattr(exc, "_base_exc", None)
    return None


#: ``[Errno 28] No space left on device: '/path'`` inside another error's message
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\][^:'\n]*(?:: '([^'\n]+)')?")
