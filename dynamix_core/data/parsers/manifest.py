"""Generic manifest (SPEC 1.2): a CSV or parquet table, one image per row.

Columns ``path, pid, camid`` are required; ``video_id``, ``frame`` and ``split`` (train / query /
gallery, default train) are optional. Relative paths are resolved against the manifest's folder.
A pid of -1 or empty = unlabeled. A row with a ``video_id`` is single-camera data: its pid is also
its tracklet (the source label inside the video).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path, PurePosixPath

import pyarrow
import pyarrow.parquet as pq

from dynamix_core.data.parsers._common import dangling_symlink
from dynamix_core.data.records import DOMAINS, SPLITS, BadInputError, ImageRef, InputReport, RawSample, make_key

REQUIRED_COLUMNS = ("path", "pid", "camid")
OPTIONAL_COLUMNS = ("video_id", "frame", "split")
_IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
_FORM = f"a .csv or .parquet manifest with columns {', '.join(REQUIRED_COLUMNS)}[, {', '.join(OPTIONAL_COLUMNS)}]"


def parse_manifest(root: Path, report: InputReport, *, dataset: str, domain: str = "multi") -> list[RawSample]:
    """Every valid row of the manifest file ``root``; ``domain`` applies to all rows."""
    if domain not in DOMAINS:
        raise ValueError(f"manifest domain {domain!r}: expected one of {list(DOMAINS)}")
    if not root.is_file():
        raise BadInputError(f"{root}: no such file; expected {_FORM}")
    columns, rows = _read_table(root)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BadInputError(f"{root}: missing required column(s) {missing} (has {columns}); expected {_FORM}")
    samples = []
    for where, row in rows:
        sample = _parse_row(row, where, root.parent, report, dataset, domain)
        if sample is not None:
            samples.append(sample)
    return samples


def _read_table(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """Column names, and ``(location, row)`` per row: ``file:line`` for CSV, ``file[row i]`` for parquet."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = columns
                # line_num is read after each row is parsed: the line that row ends on
                return columns, [(f"{path}:{reader.line_num}", row) for row in reader]
        if suffix == ".parquet":
            table = pq.read_table(path)
            return table.column_names, [(f"{path}[row {i}]", row) for i, row in enumerate(table.to_pylist())]
    except (OSError, UnicodeDecodeError, csv.Error, pyarrow.ArrowException) as exc:
        raise BadInputError(f"{path}: cannot read ({exc}); expected {_FORM}") from None
    raise BadInputError(f"{path}: unknown manifest type {path.suffix!r}; expected {_FORM}")


def _as_id(value: object) -> str | None:
    """A CSV cell or parquet value as an id string; None when empty (a float NaN counts as empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an int column that went through a float (NaN-holding) column
    text = str(value).strip()
    return text or None


def _int_cell(row: dict, column: str, where: str, report: InputReport) -> int | None:
    """An integer cell, -1 when empty or absent; None (and a "bad <column>" rejection) for anything
    that is not an integer >= -1."""
    text = _as_id(row.get(column))
    if text is None:
        return -1
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < -1:
        report.reject(where, f"bad {column}: {row[column]!r}, expected an integer >= 0 (-1 or empty = unknown)")
        return None
    return value


def _parse_row(row: dict, where: str, base: Path, report: InputReport, dataset: str, domain: str) -> RawSample | None:
    rel = _as_id(row["path"])
    if rel is None:
        report.reject(where, "missing file: empty path")
        return None
    path = base / rel  # an absolute ``rel`` replaces ``base``
    ext = _IMAGE_EXTS.get(path.suffix.lower())
    if ext is None:
        report.reject(path, f"bad extension: expected one of {sorted(_IMAGE_EXTS)} (listed at {where})")
        return None
    pid = _int_cell(row, "pid", where, report)
    if pid is None:
        return None
    frame = _int_cell(row, "frame", where, report)
    if frame is None:
        return None
    camid = _as_id(row["camid"])
    if camid is None:
        report.reject(where, "bad camera: empty camid")
        return None
    split = _as_id(row.get("split")) or "train"
    if split not in SPLITS:
        report.reject(where, f"bad split: {split!r}, expected one of {list(SPLITS)}")
        return None
    if not path.is_file():
        report.reject(path, f"{dangling_symlink(path)} (listed at {where})" if path.is_symlink()
                      else f"missing file: listed at {where}")
        return None
    source_pid = str(pid) if pid >= 0 else None
    video = _as_id(row.get("video_id"))
    return RawSample(
        dataset=dataset,
        split=split,
        source_pid=source_pid,
        source_camid=camid,
        image=ImageRef(str(path), ext=ext),
        key=make_key(dataset, split, str(PurePosixPath(rel).with_suffix(""))),
        domain=domain,
        source_video=video,
        source_tracklet=source_pid if video is not None else None,
        frame=frame,
    )
