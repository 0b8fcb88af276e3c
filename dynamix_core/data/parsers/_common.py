"""Helpers shared by the parsers: root checks, folder listing, junk counting, key de-duplication."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from dynamix_core.data.records import BadInputError, ImageRef, InputReport, RawSample
from dynamix_core.data.sample_table import where

#: Files an archive or a desktop leaves next to the images (the Market-1501 archive ships
#: ``Thumbs.db``): skipped without a report, so ``--strict`` still accepts the pristine archives.
_OS_METADATA = frozenset({"Thumbs.db", "desktop.ini"})


def require_dir(path: Path, expected: str) -> Path:
    """``path`` if it is a folder, else a :class:`BadInputError` saying what was ``expected`` there."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise BadInputError(f"{path}: {what}; expected {expected}")
    return path


def list_image_files(folder: Path, report: InputReport) -> list[str]:
    """Sorted names of the plain files in ``folder``. Subfolders are rejected ("unexpected entry"),
    and so are symlinks whose target is missing ("dangling symlink"); dotfiles and OS metadata files
    are skipped."""
    names: list[str] = []
    folders: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in _OS_METADATA:
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                report.reject(folder / entry.name, dangling_symlink(entry.path))
                continue
            (names if entry.is_file() else folders).append(entry.name)
    for name in sorted(folders):
        report.reject(folder / name, "unexpected entry: a folder where image files are expected")
    return sorted(names)


def dangling_symlink(path: str | Path) -> str:
    """The reason for a symlink whose target does not exist."""
    return f"dangling symlink: points to {os.readlink(path)}, which does not exist; restore the target or remove the link"


def count_junk(report: InputReport, path: Path, detail: str) -> None:
    """Count an image that the dataset's own convention says to drop (Market-1501 pid -1).

    It is reported under "junk" like a rejection but never raises in strict mode: every copy of
    the dataset holds these images, so ``--strict`` would otherwise refuse the dataset itself."""
    report.note(path, f"junk: {detail}")


def describe(image: ImageRef) -> str:
    """Where an image lives, for reports: the file path, or ``<lmdb dir>[<key>]``."""
    return where(image.container, image.member)


def unique_sorted(samples: Iterable[RawSample], report: InputReport) -> list[RawSample]:
    """``samples`` sorted by key; of several samples with one key, the one whose image location sorts
    first is kept and the others are rejected ("duplicate key"), whatever the input order."""
    ordered = sorted(samples, key=lambda s: (s.key, describe(s.image)))
    kept: list[RawSample] = []
    for sample in ordered:
        if kept and kept[-1].key == sample.key:
            report.reject(describe(sample.image), f"duplicate key: {sample.key} (also from {describe(kept[-1].image)})")
            continue
        kept.append(sample)
    return kept
