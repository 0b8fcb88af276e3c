"""Recognise a dataset's on-disk layout (``dynamix ingest --format auto``)."""

from __future__ import annotations

import os
import re
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


#: Key forms that tell the two LMDB stores apart (SPEC 1.2); the last field alone (8 vs 2 digits)
#: keeps them disjoint. Both stores may hold a ``pids`` list (the LUPerson release's own loader
#: reads ``keys`` and ``pids``), so its presence decides nothing.
_LUPERSON_DETECT_RE = re.compile(r"[0-9A-Za-z]+_[0-9A-Za-z]+_[0-9A-Za-z]{4}_\d{8}")
_LUPERSON_NL_DETECT_RE = re.compile(r"\d{5}_\d{6}_\d{7}_\d{2}")
#: keys looked at to decide (the first ones of keys.pkl)
_KEYS_CHECKED = 1000


def detect_format(root: str | Path) -> str:
    """The format name (a key of ``FORMATS``) of the data set at ``root``, or a
    :class:`BadInputError` listing the layouts it knows."""
    return detect_format_why(root)[0]


def detect_format_why(root: str | Path) -> tuple[str, str]:
    """``(format, why)``: the format of the data set at ``root`` and what in the layout decided it."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest", f"a {root.suffix.lower()} file"
    if not root.is_dir():
        raise BadInputError(f"{root}: {'not a folder' if root.exists() else 'does not exist'}; expected one of: "
                            + "; ".join(_LAYOUTS))
    if (root / "keys.pkl").is_file() and (root / "lmdb").is_dir():
        return _lmdb_format(root / "keys.pkl")
    image_dirs = {d for dirs in msmt17.IMAGE_DIRS.values() for d in dirs.values()}
    has_lists = any((root / name).is_file() for name, _, _ in msmt17.LIST_FILES)
    if has_lists and any((root / d).is_dir() for d in image_dirs):
        return "msmt17", "list_*.txt next to MSMT17 image folders"
    if any((root / v).is_dir() for v in market.CUHK03_VARIANTS):
        return "cuhk03np", "labeled/ or detected/ folders"
    split_dirs = [root / name for name, _ in market.SPLIT_FOLDERS if (root / name).is_dir()]
    named = {"market1501": market.MARKET1501.name_re, "dukemtmc": market.DUKEMTMC.name_re}
    if split_dirs:
        found = _first_named(split_dirs, named)
        if found is None:
            raise BadInputError(f"{root}: Market-style folders whose file names follow neither Market-1501 "
                                f"({market.MARKET1501.name_form}) nor DukeMTMC-reID ({market.DUKEMTMC.name_form})")
        return found, "Market-style folders with file names of that dataset"
    if _first_named([root], {"randperson": randperson.NAME_RE}) is not None:
        return "randperson", "a folder of pid_sXX_cYY_fNNNNNN.jpg"
    raise BadInputError(f"{root}: unrecognised layout; expected one of: " + "; ".join(_LAYOUTS))


def _lmdb_format(keys_path: Path) -> tuple[str, str]:
    """LUPerson or LUPerson-NL, from the form of the keys: the one form that some of the first keys
    follow while none follows the other (malformed keys are left to the parser to report). A store
    whose keys fit neither form or mix both is refused: guessing would read country/city as
    video/tracklet, or the reverse."""
    forms = {"luperson": (_LUPERSON_DETECT_RE, "CC_TT_VVVV_IIIIIIII"),
             "luperson_nl": (_LUPERSON_NL_DETECT_RE, "VVVVV_PPPPPP_FFFFFFF_OO")}

    def consume(lists) -> tuple[list, list[str], bool]:
        """The first keys, the forms they fit, and whether there is a 'pids' list (read to the end
        only for the LUPerson-NL form: the list may follow the keys)."""
        sample, fitting = [], []
        stream = iter(lists)
        for name, items in stream:
            if name is None or name == "keys":
                sample = [k for k in items[:_KEYS_CHECKED] if isinstance(k, str)]
                break
        fitting = [fmt for fmt, (pattern, _) in forms.items() if any(pattern.fullmatch(k) for k in sample)]
        if fitting == ["luperson_nl"]:
            for _ in stream:
                pass
            return sample, fitting, lists.kinds.get("pids") == "list"
        return sample, fitting, False

    sample, fitting, has_pids = luperson.read_key_lists(keys_path, consume, chunk=_KEYS_CHECKED)
    if not sample and not fitting:
        raise BadInputError(f"{keys_path}: no key list found; expected a list of keys or a dict with 'keys'")
    if len(fitting) == 1:
        fmt = fitting[0]
        if fmt == "luperson_nl" and not has_pids:
            raise BadInputError(f"{keys_path}: keys of the LUPerson-NL form {forms[fmt][1]} but no 'pids' list; "
                                f"pass --format luperson to ingest them unlabeled")
        return fmt, f"keys.pkl keys of the form {forms[fmt][1]} (of the first {len(sample)} keys)"
    raise BadInputError(
        f"{keys_path}: cannot tell LUPerson from LUPerson-NL: of the first {len(sample)} keys (e.g. {sample[:1]}), "
        f"{'some follow each' if fitting else 'none follows either'} of the forms "
        f"{[form for _, form in forms.values()]}; pass --format luperson or --format luperson_nl"
    )


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
