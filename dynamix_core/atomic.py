"""Crash-safe file replacement: temp file + fsync + rename + fsync of the folder.

A reader, or a process restarted after a crash, sees the old content or the new one, never half.
Files that a library creates private (safetensors and ``tempfile.mkstemp`` write 0600) get the mode of
any other file first (:func:`give_default_mode`), so every file of a run reads alike.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data``: a reader or a crash sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file creation mask (from ``/proc`` on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """Give ``path`` the mode that ``open(path, "w")`` would have given it (0666 less the umask:
    0644 usually), for a file a library created private."""
    os.chmod(path, 0o666 & ~umask())
