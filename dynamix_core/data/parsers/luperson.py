"""LMDB image stores (SPEC 1.2): LUPerson (unlabeled) and LUPerson-NL (tracker labels).

A root holds ``keys.pkl`` and ``lmdb/`` (an LMDB environment whose keys are the image keys, utf-8,
and whose values are JPEG bytes). Each video is one camera, and identities are video-local.

* LUPerson: ``keys.pkl`` = a list of keys ``CC_TT_VVVV_IIIIIIII`` (country, city, video, image), or
  a dict with "keys". Video = ``CC_TT_VVVV``; no identity (``source_pid`` None).
* LUPerson-NL: ``keys.pkl`` = ``{"keys": [...], "pids": [...]}``, keys ``VVVVV_PPPPPP_FFFFFFF_OO``
  (video, tracklet, frame, object) and the tracker pid of each key. Identity = ``<video>_<tracklet>``;
  the pids are checked against it (one tracklet, one pid).

Both return a :data:`~dynamix_core.data.sample_table.SAMPLE_SCHEMA` table built :data:`BATCH` keys
at a time, not a list of :class:`RawSample`: these stores hold 10M+ images, and a Python object per
image costs ~1 KB where the table costs ~100 B (``benchmarks/bench_ingest_memory.py``).
"""

from __future__ import annotations

import builtins
import pickle
import re
from pathlib import Path

from typing import Iterator

import lmdb
import numpy as np
import pyarrow as pa

from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers._common import require_dir
from dynamix_core.data.records import BadInputError, InputReport, make_key
from dynamix_core.data.sample_table import column_codes, concat, sample_batch

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


#: keys checked and converted per batch: the per-key Python objects (matches, column lists) of one
#: batch are alive at a time, whatever the store's size
BATCH = 1 << 16


def _open_store(lmdb_dir: Path) -> lmdb.Environment:
    try:
        return open_lmdb(str(lmdb_dir))
    except lmdb.Error as exc:
        raise BadInputError(f"{lmdb_dir}: cannot open the LMDB ({exc}); expected {_STORE_FORM}") from None


def _missing_from_lmdb(env: lmdb.Environment, keys: list[str]) -> set[str]:
    # Looked up in sorted (byte) order: neighbouring lookups then hit the same B-tree pages.
    missing = set()
    with env.begin() as txn:
        cursor = txn.cursor()
        for key in sorted(keys, key=str.encode):
            if not cursor.set_key(key.encode()):
                missing.add(key)
    return missing


def _valid_batches(keys: object, keys_path: Path, lmdb_dir: Path, report: InputReport, key_re: re.Pattern,
                   key_form: str) -> Iterator[list[tuple[int, str, re.Match]]]:
    """``(index, key, match)`` of the well-formed keys present in the LMDB, :data:`BATCH` keys of
    ``keys`` at a time; the others are rejected (per batch: malformed keys, then missing ones).
    Once a batch is consumed its entries of ``keys`` are set to None: the unpickled key strings are
    released as their rows move into the table, so the list and the table are not both whole."""
    if not isinstance(keys, list):
        raise BadInputError(f"{keys_path}: keys is a {type(keys).__name__}; expected a list of str")
    env = _open_store(lmdb_dir)
    for start in range(0, len(keys), BATCH):
        valid = []
        for i in range(start, min(start + BATCH, len(keys))):
            key = keys[i]
            match = key_re.fullmatch(key) if isinstance(key, str) else None
            if match is None:
                report.reject(f"{keys_path}[{i}]", f"malformed key: {key!r}, expected {key_form}")
                continue
            valid.append((i, key, match))
        missing = _missing_from_lmdb(env, [key for _, key, _ in valid])
        for _, key in sorted((i, key) for i, key, _ in valid if key in missing):
            report.reject(f"{lmdb_dir}[{key}]", f"missing file: listed in {keys_path.name} but not in the LMDB")
        yield [entry for entry in valid if entry[1] not in missing]
        end = min(start + BATCH, len(keys))
        keys[start:end] = [None] * (end - start)


def _columns(dataset: str, store: str, keys: list[str], videos: list[str], source_pids: list | None = None,
             tracklets: list | None = None, frames: list[int] | None = None) -> pa.Table:
    n = len(keys)
    return sample_batch({
        "key": [make_key(dataset, "train", k) for k in keys], "dataset": [dataset] * n, "split": ["train"] * n,
        "source_pid": source_pids or [None] * n, "source_camid": videos, "container": [store] * n,
        "member": keys, "ext": ["jpg"] * n, "domain": ["single"] * n, "source_video": videos,
        "source_tracklet": tracklets or [None] * n, "frame": frames or [-1] * n,
    })


def parse_luperson(root: Path, report: InputReport, *, dataset: str) -> pa.Table:
    """Every image of a LUPerson store, as a :data:`SAMPLE_SCHEMA` table; unlabeled, one camera per video."""
    keys_path, lmdb_dir = store_paths(root)
    content = load_keys_pickle(keys_path)
    keys = content["keys"] if isinstance(content, dict) and "keys" in content else content
    del content
    tables = []
    for valid in _valid_batches(keys, keys_path, lmdb_dir, report, LUPERSON_KEY_RE, "CC_TT_VVVV_IIIIIIII"):
        tables.append(_columns(dataset, str(lmdb_dir), [key for _, key, _ in valid],
                               [match["video"] for _, _, match in valid]))
    return concat(tables)


def parse_luperson_nl(root: Path, report: InputReport, *, dataset: str) -> pa.Table:
    """Every image of a LUPerson-NL store, as a :data:`SAMPLE_SCHEMA` table; identity = tracklet, video-local."""
    keys_path, lmdb_dir = store_paths(root)
    content = load_keys_pickle(keys_path)
    if not (isinstance(content, dict) and "keys" in content and "pids" in content):
        raise BadInputError(f"{keys_path}: expected a dict with 'keys' and 'pids' (LUPerson-NL)")
    keys, pids = content["keys"], content["pids"]
    del content
    if not (isinstance(keys, list) and isinstance(pids, list) and len(pids) == len(keys)):
        raise BadInputError(f"{keys_path}: 'keys' and 'pids' must be lists of equal length (LUPerson-NL)")
    tables, labels = [], []
    for valid in _valid_batches(keys, keys_path, lmdb_dir, report, LUPERSON_NL_KEY_RE, "VVVVV_PPPPPP_FFFFFFF_OO"):
        kept, videos, tracklets, frames, tracker_pids = [], [], [], [], []
        for i, key, match in valid:
            pid = pids[i]
            pids[i] = None  # released as it is read (see _valid_batches)
            if type(pid) is not int or not -2**63 <= pid < 2**63:
                report.reject(f"{lmdb_dir}[{key}]", f"bad pid: {pid!r} in {keys_path.name}, expected an int")
                continue
            kept.append(key)
            videos.append(match["video"])
            tracklets.append(match["tracklet"])
            frames.append(int(match["frame"]))
            tracker_pids.append(pid)
        tables.append(_columns(dataset, str(lmdb_dir), kept, videos, [f"{v}_{t}" for v, t in zip(videos, tracklets)],
                               tracklets, frames))
        labels.append(np.asarray(tracker_pids, np.int64))
    table = concat(tables)
    return _one_pid_per_tracklet(table, np.concatenate(labels) if labels else np.zeros(0, np.int64), lmdb_dir, report)


def _one_pid_per_tracklet(table: pa.Table, pids: np.ndarray, lmdb_dir: Path, report: InputReport) -> pa.Table:
    """``table`` without the images whose tracker pid differs from the pid of their tracklet's first
    image in ``keys.pkl`` order (each rejected: "label mismatch"). Columnar: a per-tracklet dict of
    Python objects built while the key list is released would pin the freed memory."""
    codes, _ = column_codes(table.column("source_pid"))  # source_pid = <video>_<tracklet>
    _, first, tracklet = np.unique(codes, return_index=True, return_inverse=True)
    expected = pids[first[tracklet.reshape(-1)]]
    bad = np.flatnonzero(pids != expected)
    if not len(bad):
        return table
    members = table.column("member").take(pa.array(bad)).to_pylist()
    identities = table.column("source_pid").take(pa.array(bad)).to_pylist()
    for row, member, identity in zip(bad.tolist(), members, identities):
        report.reject(f"{lmdb_dir}[{member}]",
                      f"label mismatch: pid {pids[row]}, but tracklet {identity} has pid {expected[row]}")
    keep = np.ones(len(pids), bool)
    keep[bad] = False
    return table.filter(pa.array(keep))

