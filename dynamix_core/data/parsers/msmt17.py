"""MSMT17 V1 and V2 (SPEC 1.2): images listed by text files, one ``<relative path> <label>`` per line.

    list_train.txt, list_val.txt  -> split "train" (train = train list + val list), images under train/
    list_query.txt, list_gallery.txt -> splits "query", "gallery", images under test/

V2 keeps the same lists and names with the images under ``mask_train_v2/`` and ``mask_test_v2/``.
A name ``0002_001_03_0303morning_0001_0.jpg`` carries the camera (1-15) in its third ``_`` field; the
official lists also hold names with more trailing fields, e.g. ``0000_018_04_0303morning_0022_0_ex.jpg``
(about 42 % of the lists), which torchreid and fast-reid read the same way (camera = third field).
Train and test labels both start at 0 and denote different people, so the source identity is
namespaced by the image part: ``train:<label>`` or ``test:<label>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from dynamix_core.data.parsers._common import require_dir
from dynamix_core.data.records import BadInputError, ImageRef, InputReport, RawSample, make_key

#: (list file, split, image part) in the order they are read.
LIST_FILES = (
    ("list_train.txt", "train", "train"),
    ("list_val.txt", "train", "train"),
    ("list_query.txt", "query", "test"),
    ("list_gallery.txt", "gallery", "test"),
)
#: version -> image part -> folder.
IMAGE_DIRS = {
    "v1": {"train": "train", "test": "test"},
    "v2": {"train": "mask_train_v2", "test": "mask_test_v2"},
}
NUM_CAMS = 15
_NAME_RE = re.compile(r"\d+_\d+_(?P<cam>\d+)_[0-9A-Za-z]+_\d+_\d+(?:_[0-9A-Za-z]+)*\.jpg")
_NAME_FORM = "PPPP_NNN_CC_<date><time>_FFFF_N[_<suffix>].jpg"


def detect_version(root: Path) -> str:
    """"v1" or "v2", from which image folders ``root`` holds."""
    found = [v for v, dirs in IMAGE_DIRS.items() if any((root / d).is_dir() for d in dirs.values())]
    if len(found) != 1:
        folders = {v: sorted(dirs.values()) for v, dirs in IMAGE_DIRS.items()}
        raise BadInputError(
            f"{root}: cannot tell the MSMT17 version (image folders of {found or 'neither'} found); expected "
            f"the folders of exactly one of {folders}, or pass the version option (v1 or v2)"
        )
    return found[0]


def parse_msmt17(root: Path, report: InputReport, *, dataset: str, version: str | None = None) -> list[RawSample]:
    """Every image listed by the list files present under ``root``; ``version`` None = auto-detect."""
    require_dir(root, "an MSMT17 folder holding list_*.txt and train/, test/ (V1) or mask_*_v2/ (V2)")
    if version is None:
        version = detect_version(root)
    if version not in IMAGE_DIRS:
        raise ValueError(f"msmt17 version {version!r}: expected one of {sorted(IMAGE_DIRS)}")
    lists = [(root / name, split, part) for name, split, part in LIST_FILES if (root / name).is_file()]
    if not lists:
        raise BadInputError(f"{root}: none of {[name for name, _, _ in LIST_FILES]} found; expected an MSMT17 folder")
    files_by_part: dict[str, set[str]] = {}
    samples = []
    for list_path, split, part in lists:
        image_dir = root / IMAGE_DIRS[version][part]
        if part not in files_by_part:
            require_dir(image_dir, f"the MSMT17 {version} image folder that {list_path.name} refers to")
            files_by_part[part] = _relative_files(image_dir)
        on_disk = files_by_part[part]
        for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
            if line.strip():
                where = f"{list_path}:{lineno}"
                sample = _parse_line(line, where, image_dir, on_disk, split, part, report, dataset)
                if sample is not None:
                    samples.append(sample)
    return samples


def _relative_files(image_dir: Path) -> set[str]:
    """Relative POSIX paths of every file under ``image_dir``.

    One walk instead of a stat per listed image: the lists hold ~126k entries."""
    files = set()
    for folder, _, names in os.walk(image_dir):
        prefix = PurePosixPath(Path(folder).relative_to(image_dir)).as_posix()
        files.update(names if prefix == "." else (f"{prefix}/{name}" for name in names))
    return files


def _parse_line(line: str, where: str, image_dir: Path, on_disk: set[str], split: str, part: str,
                report: InputReport, dataset: str) -> RawSample | None:
    fields = line.split()
    if len(fields) != 2 or not fields[1].isdigit():
        report.reject(where, f"malformed list line: {line.strip()!r}, expected '<relative path> <label>'")
        return None
    rel, label = PurePosixPath(fields[0]), int(fields[1])
    match = _NAME_RE.fullmatch(rel.name)
    if match is None or rel.is_absolute() or ".." in rel.parts:
        report.reject(where, f"malformed name: {rel}, expected <folder>/{_NAME_FORM}")
        return None
    cam = int(match["cam"])
    if not 1 <= cam <= NUM_CAMS:
        report.reject(where, f"bad camera: {cam} outside 1-{NUM_CAMS} in {rel.name}")
        return None
    if rel.as_posix() not in on_disk:
        report.reject(image_dir / rel, f"missing file: listed at {where}")
        return None
    return RawSample(
        dataset=dataset,
        split=split,
        source_pid=f"{part}:{label}",
        source_camid=f"c{cam}",
        image=ImageRef(str(image_dir / rel)),
        key=make_key(dataset, split, rel.stem),
    )
