"""Recognise a dataset's on-disk layout (``dynamix ingest --format auto``)."""

from __future__ import annotations

import os
from pathlib import Path

from dynamix_core.data.parsers import luperson, market, msmt17, randperson
from dynamix_core.data.records import BadInputError

MANIFEST_SUFFIXES = (".csv", ".parquet")
_LAYOUTS = (
    "a .csv/.parquet manifest file",
    "keys.pkl + lmdb/ (luperson, luperson_nl)",
    "list_*.txt + train/, test/ or mask_*_v2/ (msmt17)",
    "labeled/ or detected/ (cuhk03np)",
    "bounding_box_train/, bounding_box_test/, query/ (market1501, dukemtmc)",
    "a folder of pid_sXX_cYY_fNNNNNN.jpg (randperson)",
)


def detect_format(root: str | Path) -> str:
    """The format name (a key of ``FORMATS``) of the data set at ``root``, or a
    :class:`BadInputError` listing the layouts it knows."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if not root.is_dir():
        raise BadInputError(f"{root}: {'not a folder' if root.exists() else 'does not exist'}; expected one of: "
                            + "; ".join(_LAYOUTS))
    if (root / "keys.pkl").is_file() and (root / "lmdb").is_dir():
        return _lmdb_format(root / "keys.pkl")
    image_dirs = {d for dirs in msmt17.IMAGE_DIRS.values() for d in dirs.values()}
    has_lists = any((root / name).is_file() for name, _, _ in msmt17.LIST_FILES)
    if has_lists and any((root / d).is_dir() for d in image_dirs):
        return "msmt17"
    if any((root / v).is_dir() for v in market.CUHK03_VARIANTS):
        return "cuhk03np"
    split_dirs = [root / name for name, _ in market.SPLIT_FOLDERS if (root / name).is_dir()]
    named = {"market1501": market.MARKET1501.name_re, "dukemtmc": market.DUKEMTMC.name_re}
    if split_dirs:
        found = _first_named(split_dirs, named)
        if found is None:
            raise BadInputError(f"{root}: Market-style folders whose file names follow neither Market-1501 "
                                f"({market.MARKET1501.name_form}) nor DukeMTMC-reID ({market.DUKEMTMC.name_form})")
        return found
    if _first_named([root], {"randperson": randperson.NAME_RE}) is not None:
        return "randperson"
    raise BadInputError(f"{root}: unrecognised layout; expected one of: " + "; ".join(_LAYOUTS))


def _lmdb_format(keys_path: Path) -> str:
    # LUPerson's own keys.pkl may carry a "pids" list too: the key form decides.
    content = luperson.load_keys_pickle(keys_path)
    if isinstance(content, dict) and "pids" in content:
        keys = content.get("keys")
        first = keys[0] if isinstance(keys, list) and keys else None
        if isinstance(first, str) and luperson.LUPERSON_NL_KEY_RE.fullmatch(first):
            return "luperson_nl"
    return "luperson"


def _first_named(folders: list[Path], patterns: dict) -> str | None:
    """The name of the pattern that fully matches the first matching file name met in ``folders``.

    Directory order, not sorted: a RandPerson folder holds ~1.8M files and the first match decides."""
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                for fmt, pattern in patterns.items():
                    if pattern.fullmatch(entry.name):
                        return fmt
    return None
