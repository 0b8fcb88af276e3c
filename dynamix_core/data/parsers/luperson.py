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
image costs ~1 KB where the table costs ~100 B (``benchmarks/bench_ingest_memory.py``). ``keys.pkl``
itself is read chunk by chunk (:mod:`dynamix_core.data.pickle_stream`) when it has the shape
Python's pickler gives a list, or a dict of lists, of str and int; any other pickle is unpickled
whole (builtins only).
"""

from __future__ import annotations

import builtins
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb
import numpy as np
import pyarrow as pa

from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers._common import require_dir
from dynamix_core.data.pickle_stream import PickleLists, UnsupportedPickle
from dynamix_core.data.records import BadInputError, InputReport, make_key
from dynamix_core.data.sample_table import Same, SampleTableBuilder, column_codes

LUPERSON_KEY_RE = re.compile(r"(?P<video>[0-9A-Za-z]+_[0-9A-Za-z]+_[0-9A-Za-z]+)_\d+")
LUPERSON_NL_KEY_RE = re.compile(r"(?P<video>\d+)_(?P<tracklet>\d+)_(?P<frame>\d+)_\d+")
T = TypeVar("T")
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


class _Unpickled:
    """A ``keys.pkl`` unpickled whole, served as :class:`PickleLists` serves one it streams: its lists
    in chunks, in order, each chunk's entries released once the next one is asked for."""

    def __init__(self, content: object, chunk: int):
        self.chunk = chunk
        self.top = "list" if isinstance(content, list) else "dict" if isinstance(content, dict) else type(content).__name__
        named = [(None, content)] if isinstance(content, list) else list(content.items()) if isinstance(content, dict) else []
        self.lists = [(name, values) for name, values in named if isinstance(values, list)]
        self.lengths = {name: len(values) for name, values in self.lists}
        self.kinds = {k: type(v).__name__ for k, v in content.items()} if isinstance(content, dict) else {}

    def __iter__(self) -> Iterator[tuple[str | None, list]]:
        for name, values in self.lists:
            for start in range(0, len(values), self.chunk):
                end = min(start + self.chunk, len(values))
                yield name, values[start:end]
                values[start:end] = [None] * (end - start)


def read_key_lists(keys_path: Path, consume: Callable[["PickleLists | _Unpickled"], T], report: InputReport | None = None,
                   chunk: int = BATCH) -> T:
    """``consume(lists)`` over the lists of ``keys_path``: streamed chunk by chunk (:class:`PickleLists`:
    the keys are never all in memory), or, for a pickle of another shape, unpickled whole with
    :func:`load_keys_pickle`. A stream found unsupported part-way is consumed again from the start
    from the whole unpickling, with the problems ``consume`` reported in between taken back."""
    mark = len(report.problems) if report is not None else 0
    try:
        return consume(PickleLists(keys_path, chunk=chunk))
    except UnsupportedPickle:
        if report is not None:
            del report.problems[mark:]
    return consume(_Unpickled(load_keys_pickle(keys_path), chunk))


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


def _valid_batches(chunks: Iterator[list], keys_path: Path, lmdb_dir: Path, report: InputReport,
                   key_re: re.Pattern, key_form: str) -> Iterator[list[tuple[int, str, re.Match]]]:
    """Per chunk of keys, ``(index, key, match)`` of its well-formed keys present in the LMDB; the
    others are rejected (per chunk: malformed keys, then missing ones)."""
    env = _open_store(lmdb_dir)
    start = 0
    for keys in chunks:
        valid = []
        for i, key in enumerate(keys, start):
            match = key_re.fullmatch(key) if isinstance(key, str) else None
            if match is None:
                report.reject(f"{keys_path}[{i}]", f"malformed key: {key!r}, expected {key_form}")
                continue
            valid.append((i, key, match))
        missing = _missing_from_lmdb(env, [key for _, key, _ in valid])
        for _, key in sorted((i, key) for i, key, _ in valid if key in missing):
            report.reject(f"{lmdb_dir}[{key}]", f"missing file: listed in {keys_path.name} but not in the LMDB")
        yield [entry for entry in valid if entry[1] not in missing]
        start += len(keys)


def _add(builder: SampleTableBuilder, dataset: str, store: str, keys: list[str], videos: list[str],
         source_pids: list | None = None, tracklets: list | None = None, frames: list[int] | None = None) -> None:
    builder.add({
        "key": [make_key(dataset, "train", k) for k in keys], "dataset": Same(dataset), "split": Same("train"),
        "source_pid": source_pids if source_pids is not None else Same(None), "source_camid": videos,
        "container": Same(store), "member": keys, "ext": Same("jpg"), "domain": Same("single"),
        "source_video": videos, "source_tracklet": tracklets if tracklets is not None else Same(None),
        "frame": frames if frames is not None else Same(-1),
    })


def parse_luperson(root: Path, report: InputReport, *, dataset: str) -> pa.Table:
    """Every image of a LUPerson store, as a :data:`SAMPLE_SCHEMA` table; unlabeled, one camera per video."""
    keys_path, lmdb_dir = store_paths(root)

    def consume(lists) -> pa.Table:
        def chunks() -> Iterator[list]:
            for name, items in lists:
                if name is None or name == "keys":
                    yield items

        builder = SampleTableBuilder()
        for valid in _valid_batches(chunks(), keys_path, lmdb_dir, report, LUPERSON_KEY_RE, "CC_TT_VVVV_IIIIIIII"):
            _add(builder, dataset, str(lmdb_dir), [key for _, key, _ in valid], [match["video"] for _, _, match in valid])
        if lists.top != "list" and lists.kinds.get("keys") != "list":
            kind = lists.kinds.get("keys", lists.top)
            raise BadInputError(f"{keys_path}: keys is a {kind}; expected a list of str")
        return builder.finish()

    return read_key_lists(keys_path, consume, report)


def _int64(items: list) -> tuple[np.ndarray, dict[int, object]]:
    """``items`` as int64, and ``{position: value}`` of those that are no int (or do not fit)."""
    if all(type(v) is int for v in items):
        try:
            return np.array(items, np.int64), {}
        except OverflowError:
            pass
    values, bad = np.zeros(len(items), np.int64), {}
    for j, v in enumerate(items):
        if type(v) is int and -2**63 <= v < 2**63:
            values[j] = v
        else:
            bad[j] = v
    return values, bad


def parse_luperson_nl(root: Path, report: InputReport, *, dataset: str) -> pa.Table:
    """Every image of a LUPerson-NL store, as a :data:`SAMPLE_SCHEMA` table; identity = tracklet, video-local."""
    keys_path, lmdb_dir = store_paths(root)

    def consume(lists) -> pa.Table:
        pid_parts: list[np.ndarray] = []
        bad_pids: dict[int, object] = {}

        def chunks() -> Iterator[list]:
            offset = 0  # pids read so far
            for name, items in lists:
                if name == "keys":
                    yield items
                elif name == "pids":
                    values, bad = _int64(items)
                    bad_pids.update({offset + j: v for j, v in bad.items()})
                    pid_parts.append(values)
                    offset += len(values)

        builder, rows = SampleTableBuilder(), []
        for valid in _valid_batches(chunks(), keys_path, lmdb_dir, report, LUPERSON_NL_KEY_RE, "VVVVV_PPPPPP_FFFFFFF_OO"):
            keys = [key for _, key, _ in valid]
            videos = [match["video"] for _, _, match in valid]
            tracklets = [match["tracklet"] for _, _, match in valid]
            _add(builder, dataset, str(lmdb_dir), keys, videos, [f"{v}_{t}" for v, t in zip(videos, tracklets)],
                 tracklets, [int(match["frame"]) for _, _, match in valid])
            rows.append(np.array([i for i, _, _ in valid], np.int64))
        if lists.top != "dict" or not {"keys", "pids"} <= set(lists.kinds):
            raise BadInputError(f"{keys_path}: expected a dict with 'keys' and 'pids' (LUPerson-NL)")
        if lists.kinds["keys"] != "list" or lists.kinds["pids"] != "list" or \
                lists.lengths["keys"] != lists.lengths["pids"]:
            raise BadInputError(f"{keys_path}: 'keys' and 'pids' must be lists of equal length (LUPerson-NL)")
        table = builder.finish()
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        pids = np.concatenate(pid_parts)[rows] if pid_parts else np.zeros(0, np.int64)
        if bad_pids:
            bad = np.flatnonzero(np.isin(rows, np.fromiter(bad_pids, np.int64)))
            for row, member in zip(bad.tolist(), table.column("member").take(pa.array(bad)).to_pylist()):
                report.reject(f"{lmdb_dir}[{member}]",
                              f"bad pid: {bad_pids[int(rows[row])]!r} in {keys_path.name}, expected an int")
            keep = np.ones(len(rows), bool)
            keep[bad] = False
            table, pids = table.filter(pa.array(keep)), pids[keep]
        return _one_pid_per_tracklet(table, pids, lmdb_dir, report)

    return read_key_lists(keys_path, consume, report)


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

