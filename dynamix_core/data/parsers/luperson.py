"""LMDB image stores (SPEC 1.2): LUPerson (unlabeled) and LUPerson-NL (tracker labels).

A root holds ``keys.pkl`` and ``lmdb/`` (an LMDB environment whose keys are the image keys, utf-8,
and whose values are JPEG bytes). Each video is one camera, and identities are video-local.

* LUPerson: ``keys.pkl`` = a list of keys ``CC_TT_VVVV_IIIIIIII`` (country, city, video, image), or
  a dict with "keys". Video = ``CC_TT_VVVV``; no identity (``source_pid`` None).
* LUPerson-NL: ``keys.pkl`` = ``{"keys": [...], "pids": [...]}``, keys ``VVVVV_PPPPPP_FFFFFFF_OO``
  (video, tracklet, frame, object) and the tracker pid of each key. Identity = ``<video>_<tracklet>``;
  the pids are checked against it (one tracklet, one pid).
"""

from __future__ import annotations

import builtins
import pickle
import re
from pathlib import Path

import lmdb

from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers._common import require_dir
from dynamix_core.data.records import BadInputError, ImageRef, InputReport, RawSample, make_key

LUPERSON_KEY_RE = re.compile(r"(?P<video>[0-9A-Za-z]+_[0-9A-Za-z]+_[0-9A-Za-z]+)_\d+")
LUPERSON_NL_KEY_RE = re.compile(r"(?P<video>\d+)_(?P<tracklet>\d+)_(?P<frame>\d+)_\d+")
_STORE_FORM = "an LMDB image store: keys.pkl and lmdb/ (an LMDB environment with data.mdb)"


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, str and int only: a pickle can otherwise run arbitrary code."""

    _ALLOWED = frozenset({"list", "dict", "tuple", "set", "frozenset", "str", "int"})

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in self._ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_keys_pickle(path: Path) -> object:
    """The content of a ``keys.pkl``, restricted to builtin containers of str and int."""
    try:
        with open(path, "rb") as fh:
            return _BuiltinsOnlyUnpickler(fh).load()
    except Exception as exc:  # unpickling foreign bytes can fail with almost any error type
        raise BadInputError(
            f"{path}: cannot unpickle ({exc}); expected a pickle of builtin lists/dicts of str and int "
            f"(store numpy arrays as lists: .tolist())"
        ) from None


def store_paths(root: Path) -> tuple[Path, Path]:
    """``(keys.pkl, lmdb dir)`` of an LMDB store root, or a :class:`BadInputError` naming what is missing."""
    require_dir(root, _STORE_FORM)
    keys_path, lmdb_dir = root / "keys.pkl", root / "lmdb"
    missing = [str(p) for p in (keys_path, lmdb_dir / "data.mdb") if not p.is_file()]
    if missing:
        raise BadInputError(f"{root}: missing {missing}; expected {_STORE_FORM}")
    return keys_path, lmdb_dir


def _missing_from_lmdb(lmdb_dir: Path, keys: list[str]) -> set[str]:
    # Looked up in sorted (byte) order: neighbouring lookups then hit the same B-tree pages.
    missing = set()
    try:
        env = open_lmdb(str(lmdb_dir))
    except lmdb.Error as exc:
        raise BadInputError(f"{lmdb_dir}: cannot open the LMDB ({exc}); expected {_STORE_FORM}") from None
    with env.begin() as txn:
        cursor = txn.cursor()
        for key in sorted(keys, key=str.encode):
            if not cursor.set_key(key.encode()):
                missing.add(key)
    return missing


def _valid_keys(keys: object, keys_path: Path, lmdb_dir: Path, report: InputReport, key_re: re.Pattern,
                key_form: str) -> list[tuple[int, str, re.Match]]:
    """``(index, key, match)`` of the well-formed keys present in the LMDB; the others are rejected."""
    if not isinstance(keys, list):
        raise BadInputError(f"{keys_path}: keys is a {type(keys).__name__}; expected a list of str")
    valid = []
    for i, key in enumerate(keys):
        match = key_re.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            report.reject(f"{keys_path}[{i}]", f"malformed key: {key!r}, expected {key_form}")
            continue
        valid.append((i, key, match))
    missing = _missing_from_lmdb(lmdb_dir, [key for _, key, _ in valid])
    for _, key in sorted((i, key) for i, key, _ in valid if key in missing):
        report.reject(f"{lmdb_dir}[{key}]", f"missing file: listed in {keys_path.name} but not in the LMDB")
    return [entry for entry in valid if entry[1] not in missing]


def parse_luperson(root: Path, report: InputReport, *, dataset: str) -> list[RawSample]:
    """Every image of a LUPerson store; unlabeled, one camera per video."""
    keys_path, lmdb_dir = store_paths(root)
    content = load_keys_pickle(keys_path)
    keys = content["keys"] if isinstance(content, dict) and "keys" in content else content
    samples = []
    store, one = str(lmdb_dir), {}  # one string object per store and per video, shared by their images
    for _, key, match in _valid_keys(keys, keys_path, lmdb_dir, report, LUPERSON_KEY_RE, "CC_TT_VVVV_IIIIIIII"):
        video = one.setdefault(match["video"], match["video"])
        samples.append(RawSample(
            dataset=dataset, split="train", source_pid=None, source_camid=video,
            image=ImageRef(store, member=key), key=make_key(dataset, "train", key),
            domain="single", source_video=video,
        ))
    return samples


def parse_luperson_nl(root: Path, report: InputReport, *, dataset: str) -> list[RawSample]:
    """Every image of a LUPerson-NL store; identity = tracklet, video-local."""
    keys_path, lmdb_dir = store_paths(root)
    content = load_keys_pickle(keys_path)
    if not (isinstance(content, dict) and "keys" in content and "pids" in content):
        raise BadInputError(f"{keys_path}: expected a dict with 'keys' and 'pids' (LUPerson-NL)")
    keys, pids = content["keys"], content["pids"]
    if not (isinstance(keys, list) and isinstance(pids, list) and len(pids) == len(keys)):
        raise BadInputError(f"{keys_path}: 'keys' and 'pids' must be lists of equal length (LUPerson-NL)")
    samples = []
    pid_of_tracklet: dict[tuple[str, str], int] = {}
    # one string object per store, video, tracklet and identity, shared by their images instead of one
    # per image (planning holds every sample; benchmarks/bench_ingest_memory.py measures it per image)
    store, one, identity = str(lmdb_dir), {}, {}
    for i, key, match in _valid_keys(keys, keys_path, lmdb_dir, report, LUPERSON_NL_KEY_RE, "VVVVV_PPPPPP_FFFFFFF_OO"):
        video, tracklet, pid = one.setdefault(match["video"], match["video"]), match["tracklet"], pids[i]
        tracklet = one.setdefault(tracklet, tracklet)
        if type(pid) is not int:
            report.reject(f"{lmdb_dir}[{key}]", f"bad pid: {pid!r} in {keys_path.name}, expected an int")
            continue
        first = pid_of_tracklet.setdefault((video, tracklet), pid)
        if pid != first:
            report.reject(f"{lmdb_dir}[{key}]",
                          f"label mismatch: pid {pid}, but tracklet {video}_{tracklet} has pid {first}")
            continue
        source_pid = identity.get((video, tracklet))
        if source_pid is None:
            source_pid = identity[(video, tracklet)] = f"{video}_{tracklet}"
        samples.append(RawSample(
            dataset=dataset, split="train", source_pid=source_pid, source_camid=video,
            image=ImageRef(store, member=key), key=make_key(dataset, "train", key),
            domain="single", source_video=video, source_tracklet=tracklet, frame=int(match["frame"]),
        ))
    return samples
