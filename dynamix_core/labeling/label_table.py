"""Versioned pseudo-labels addressed by row (SPEC 1.1, 2.3a): the run's single-camera images have a
fixed order (the rows of its ``index.parquet``), and a label version is an int32 pid per row.

A version costs what it changed, not the size of the table. On disk (one folder)::

    v00000000.snap.npy        every pid (int32, -1 = unlabeled): version 0 and every ``snapshot_every``-th
    v00000007.delta.npz       rows (int64, sorted) whose pid version 7 changed, and their pids (int32)
    v00000007.centroids.npz   centroids version 7 published: ids, centroids (float32), videos
    centroids-base/           the newest publication of every identity up to ``base_version`` (merged
                              from retired centroid files), partitioned by identity range:
      p0000012.npz              identities 12 * P .. 13 * P - 1 that were ever published: ids (sorted),
                                centroids, videos, version (P = ``partition_ids``, 256 by default)
      manifest.json             base_version, P, and per partition its newest version and row count
    history.jsonl             one audit record per version
    pins.json                 versions a checkpoint references (kept whatever their age)

Version ``v`` is read as the newest snapshot at or below ``v`` plus the deltas after it. The delta
file is a version's commit point: its snapshot and centroid files are written before it, so a
version exists exactly when its delta (snapshot for version 0) is readable; files of an uncommitted
version are overwritten by the next commit. Every file is written to a temporary name in the folder
and renamed, so a reader sees the old file or the new one, never half of one.

Retention (:meth:`LabelTable.collect`): version 0 (the initial labels), the last ``keep_versions``
versions and every pinned one stay readable, and so do the deltas after the oldest of them (a trainer that holds it can be moved
forward by deltas alone); older label files are deleted and older centroid files are merged into
the base, so "which centroids did versions (a, b] publish" stays answerable for any retained ``a``.

The base costs what changed, not its size (K identities x D floats): merging a retired centroid file
reads and rewrites only the partitions its identities fall in, then the manifest, then deletes the
file; no process ever holds the whole base. A crash part-way leaves the retired file in place (it is
newer than the manifest's ``base_version``, so readers still use it, and its publications win over
any partition row it already reached), and the next collect merges it again (idempotent). Readers
skip the base when the version they hold is at or after ``base_version`` (a lagging trainer reads
only the centroid files it missed), read only partitions with a publication newer than that
version otherwise, and filter each partition to the asking rank's identities as it is read. A table
written before partitions (one ``centroids-base.npz``) is split into partitions on first use.

A version file that is missing or unreadable is reported (naming the file) and the newest readable
version stays in force: :meth:`LabelTable.latest_version` skips it with a warning, :meth:`read` of it
raises :class:`LabelTableError`.
"""

from __future__ import annotations

import io
import json
import re
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from dynamix_core import storage

_FILE = re.compile(r"^v(\d{8})\.(snap\.npy|delta\.npz|centroids\.npz)$")
HISTORY_FILE = "history.jsonl"
PINS_FILE = "pins.json"
BASE_DIR = "centroids-base"
MANIFEST_FILE = "manifest.json"
LEGACY_BASE_FILE = "centroids-base.npz"  # one whole K x D file (tables written before partitions)
PARTITION_IDS = 256
#: the defaults of a label table (the run config's labeling.snapshot_every / keep_versions use them)
SNAPSHOT_EVERY = 32  # every this many versions the whole table is stored, the others only their changed rows
KEEP_VERSIONS = 8  # newest versions kept readable besides pinned ones
MERGE_THREADS = 8  # partitions merged at once (their I/O overlaps)


class LabelTableError(RuntimeError):
    """A label version file is missing, unreadable or invalid."""


def merge_newest(ids, rows, videos, versions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per identity: its newest publication (highest version; later position wins a tie)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return ids, np.asarray(rows, np.float32), np.asarray(videos, np.int64), np.asarray(versions, np.int64)
    order = np.lexsort((np.arange(len(ids)), np.asarray(versions), ids))  # by id, then version, then position
    last = np.r_[ids[order][1:] != ids[order][:-1], True]
    keep = order[last]
    return ids[keep], np.asarray(rows)[keep], np.asarray(videos)[keep], np.asarray(versions)[keep]


class LabelTable:
    """A folder of row-addressed label versions, their published centroids and the audit log."""

    def __init__(self, root: str | Path, *, snapshot_every: int = SNAPSHOT_EVERY, keep_versions: int = KEEP_VERSIONS,
                 partition_ids: int = PARTITION_IDS):
        """``root``: a local folder or an object-store URI (``s3://bucket/run/labels``).
        ``partition_ids``: identities per centroid-base partition of a new table (an existing base
        keeps the size its manifest records)."""
        if snapshot_every < 1 or keep_versions < 1 or partition_ids < 1:
            raise ValueError(f"snapshot_every ({snapshot_every}), keep_versions ({keep_versions}) and "
                             f"partition_ids ({partition_ids}) must be >= 1")
        self.root = str(root)
        storage.makedirs(self.root)
        self.snapshot_every = snapshot_every
        self.keep_versions = keep_versions
        self.partition_ids = partition_ids
        self._legacy_checked = False

    # --- paths -------------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def snapshot_path(self, version: int) -> str:
        return self.path(f"v{version:08d}.snap.npy")

    def delta_path(self, version: int) -> str:
        return self.path(f"v{version:08d}.delta.npz")

    def centroid_path(self, version: int) -> str:
        return self.path(f"v{version:08d}.centroids.npz")

    def base_path(self, name: str) -> str:
        return storage.join(self.root, BASE_DIR, name)

    def partition_path(self, partition: int) -> str:
        return self.base_path(f"p{partition:07d}.npz")

    def commit_path(self, version: int) -> str:
        """The file whose presence makes ``version`` exist."""
        return self.snapshot_path(0) if version == 0 else self.delta_path(version)

    def listing(self) -> dict[str, int]:
        """``name -> size`` of the files in the table (one LIST on an object store)."""
        return storage.listdir(self.root)

    def _files(self, listing: dict[str, int] | None = None) -> dict[str, set[int]]:
        found: dict[str, set[int]] = {"snap.npy": set(), "delta.npz": set(), "centroids.npz": set()}
        for name in self.listing() if listing is None else listing:
            if m := _FILE.match(name):
                found[m.group(2)].add(int(m.group(1)))
        return found

    # --- reading -----------------------------------------------------------------------------------

    def committed_versions(self) -> list[int]:
        files = self._files()
        return sorted(files["delta.npz"] | ({0} & files["snap.npy"]))

    def latest_version(self) -> int | None:
        """Newest readable version (None if there is none); newer unreadable ones are warned about."""
        for version in reversed(self.committed_versions()):
            try:
                self.read(version)
                return version
            except LabelTableError as exc:
                warnings.warn(f"{exc}; falling back to the previous version", stacklevel=2)
        return None

    def _load(self, path: str, version: int, what: str):
        try:
            raw = storage.read_bytes(path)
        except FileNotFoundError:
            raise LabelTableError(f"label version {version}: {what} file {path} is missing") from None
        try:
            data = np.load(io.BytesIO(raw), allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                data = {k: data[k] for k in data.files}
            return data
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise LabelTableError(f"label version {version}: cannot read {path}: {exc}") from exc

    def read_snapshot(self, version: int) -> np.ndarray:
        pids = self._load(self.snapshot_path(version), version, "snapshot")
        if pids.ndim != 1 or pids.dtype != np.int32:
            raise LabelTableError(f"label version {version}: {self.snapshot_path(version)} holds {pids.dtype} "
                                  f"{pids.shape}, expected a 1-d int32 pid array")
        return pids

    def read_delta(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows version ``version`` changed and their new pids."""
        data = self._load(self.delta_path(version), version, "delta")
        if not {"rows", "pids"} <= set(data) or len(data["rows"]) != len(data["pids"]):
            raise LabelTableError(f"label version {version}: {self.delta_path(version)} must hold equal-length "
                                  f"'rows' and 'pids', has {sorted(data)}")
        return data["rows"].astype(np.int64), data["pids"].astype(np.int32)

    def read(self, version: int | None = None) -> np.ndarray:
        """The pid of every row at ``version`` (default: the latest readable one), int32."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise LabelTableError(f"no readable label version in {self.root}")
        files = self._files()
        if version != 0 and version not in files["delta.npz"]:
            raise LabelTableError(f"label version {version}: delta file {self.delta_path(version)} is missing")
        snaps = sorted(v for v in files["snap.npy"] if v <= version)
        for base in reversed(snaps):  # the newest snapshot whose chain is complete
            try:
                pids = self.read_snapshot(base).copy()
                for v in range(base + 1, version + 1):
                    rows, new = self.read_delta(v)
                    pids[rows] = new
                return pids
            except LabelTableError:
                if base == snaps[0]:
                    raise
        raise LabelTableError(f"label version {version}: no snapshot at or below it in {self.root}")

    def changed_rows(self, since: int, until: int) -> np.ndarray:
        """Rows whose pid versions (since, until] set (sorted, unique); needs every delta in between."""
        parts = [self.read_delta(v)[0] for v in range(since + 1, until + 1)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def can_move(self, since: int, until: int) -> bool:
        """Whether the deltas (since, until] are all still on disk."""
        deltas = self._files()["delta.npz"]
        return all(v in deltas for v in range(since + 1, until + 1))

    # --- centroids ---------------------------------------------------------------------------------

    def base_manifest(self) -> dict:
        """The base's manifest: ``base_version`` (newest version merged), ``partition_ids`` and
        ``partitions`` (partition -> [newest version in it, rows])."""
        self._split_legacy_base()
        try:
            raw = storage.read_bytes(self.base_path(MANIFEST_FILE))
        except FileNotFoundError:
            return {"base_version": 0, "partition_ids": self.partition_ids, "partitions": {}}
        try:
            manifest = json.loads(raw)
            manifest["partitions"] = {int(p): [int(a), int(b)] for p, (a, b) in manifest["partitions"].items()}
            int(manifest["base_version"]), int(manifest["partition_ids"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelTableError(f"cannot read the centroid base manifest {self.base_path(MANIFEST_FILE)}: {exc}") from exc
        return manifest

    def base_version(self) -> int:
        """Centroid files up to this version were merged into the base."""
        return int(self.base_manifest()["base_version"])

    def read_partition(self, partition: int) -> dict[str, np.ndarray]:
        """One base partition: ids (sorted), centroids, videos, version."""
        data = self._load(self.partition_path(partition), -1, "centroid base partition")
        if not {"ids", "centroids", "videos", "version"} <= set(data):
            raise LabelTableError(f"centroid base partition {self.partition_path(partition)} lacks "
                                  f"ids/centroids/videos/version, has {sorted(data)}")
        return data

    def centroids_between(self, since: int | None, until: int, owned=None):
        """The newest publication up to ``until`` of every identity whose newest publication is in
        (since, until] (``since=None``: every identity); ``owned(ids) -> bool mask`` keeps a shard
        (applied to each file as it is read). Returns ids, centroids, videos.

        Reads the centroid files in (since, until] and, only when ``since`` is before the base's
        version, the base partitions holding a publication newer than ``since``."""
        lo = -1 if since is None else since
        manifest = self.base_manifest()
        base_version = int(manifest["base_version"])
        if until < base_version:
            raise LabelTableError(f"centroids up to version {until} were merged into {self.base_path('')} "
                                  f"(at version {base_version}); only newer ones can be listed")

        def kept(ids, rows, videos, versions, mask=None):
            mask = np.ones(len(ids), bool) if mask is None else mask
            if owned is not None:
                mask &= np.asarray(owned(ids), bool)
            return ids[mask], rows[mask], videos[mask], versions[mask]

        files = []
        for v in sorted(self._files()["centroids.npz"]):
            if max(base_version, lo) < v <= until:
                z = self._load(self.centroid_path(v), v, "centroid")
                ids = z["ids"].astype(np.int64)
                files.append(kept(ids, _rows2d(z["centroids"], len(ids)), z["videos"].astype(np.int64),
                                  np.full(len(ids), v, np.int64)))
        new = _merge_parts(files, self.root)
        base = []
        if lo < base_version:  # a file's publication is newer than any base row: it wins
            for p, (newest, _) in sorted(manifest["partitions"].items()):
                if newest > lo:
                    z = self.read_partition(p)
                    ids = z["ids"].astype(np.int64)
                    mask = (z["version"] > lo) & ~np.isin(ids, new[0])
                    base.append(kept(ids, _rows2d(z["centroids"], len(ids)), z["videos"].astype(np.int64),
                                     z["version"], mask))
        if base:
            parts = [new, *base]
            dim = _width(parts, self.root)
            new = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1].reshape(len(p[0]), dim) for p in parts]),
                   np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))
        return new[0], new[1].astype(np.float32, copy=False), new[2]

    def _merge_into_base(self, version: int, manifest: dict) -> None:
        """Merge the centroid file of ``version`` into the partitions its identities fall in; then
        the manifest records it (the caller deletes the file afterwards)."""
        z = self._load(self.centroid_path(version), version, "centroid")
        ids = z["ids"].astype(np.int64)
        rows = _rows2d(z["centroids"], len(ids)).astype(np.float32, copy=False)
        videos = z["videos"].astype(np.int64)
        size = int(manifest["partition_ids"])
        storage.makedirs(storage.join(self.root, BASE_DIR))
        if len(ids) and ids.min() < 0:
            raise LabelTableError(f"label version {version}: {self.centroid_path(version)} has negative identity ids")
        part = ids // size
        order = np.argsort(part, kind="stable")
        bounds = np.flatnonzero(np.r_[True, part[order][1:] != part[order][:-1], True])

        def merge(sel: np.ndarray) -> tuple[int, list[int]]:
            p = int(part[sel[0]])
            parts = [(ids[sel], rows[sel], videos[sel], np.full(len(sel), version, np.int64))]
            if p in manifest["partitions"]:
                old = self.read_partition(p)
                parts.insert(0, (old["ids"].astype(np.int64), _rows2d(old["centroids"], len(old["ids"])),
                                 old["videos"].astype(np.int64), old["version"].astype(np.int64)))
            m_ids, m_rows, m_videos, m_versions = _merge_parts(parts, self.root)
            _atomic_npz(self.partition_path(p), ids=m_ids, centroids=m_rows.astype(np.float32, copy=False),
                        videos=m_videos, version=m_versions)
            return p, [int(m_versions.max()), len(m_ids)]

        # partitions are independent files: their reads, writes and fsyncs (or uploads) overlap
        with ThreadPoolExecutor(max_workers=MERGE_THREADS) as pool:
            done = list(pool.map(merge, [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
        manifest["partitions"].update(dict(done))
        manifest["base_version"] = max(int(manifest["base_version"]), version)
        self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict) -> None:
        body = {"base_version": int(manifest["base_version"]), "partition_ids": int(manifest["partition_ids"]),
                "partitions": {str(p): v for p, v in sorted(manifest["partitions"].items())}}
        _atomic_bytes(self.base_path(MANIFEST_FILE), json.dumps(body, separators=(",", ":")).encode())

    def _split_legacy_base(self) -> None:
        """A table written before partitions holds one ``centroids-base.npz``: split it into
        partitions (once; the file is deleted after the manifest is written)."""
        if self._legacy_checked:
            return
        legacy = self.path(LEGACY_BASE_FILE)
        if storage.exists(legacy):
            z = self._load(legacy, -1, "centroid base")
            if not storage.exists(self.base_path(MANIFEST_FILE)):
                ids = z["ids"].astype(np.int64)
                rows = _rows2d(z["centroids"], len(ids)).astype(np.float32, copy=False)
                size = self.partition_ids
                storage.makedirs(storage.join(self.root, BASE_DIR))
                manifest = {"base_version": int(z["base_version"]), "partition_ids": size, "partitions": {}}
                part = ids // size
                for p in np.unique(part):
                    sel = np.flatnonzero(part == p)
                    sel = sel[np.argsort(ids[sel])]
                    _atomic_npz(self.partition_path(int(p)), ids=ids[sel], centroids=rows[sel],
                                videos=z["videos"].astype(np.int64)[sel], version=z["version"].astype(np.int64)[sel])
                    manifest["partitions"][int(p)] = [int(z["version"][sel].max()), len(sel)]
                self._write_manifest(manifest)
            storage.delete(legacy)
        self._legacy_checked = True

    # --- writing -----------------------------------------------------------------------------------

    def write(self, version: int, *, rows: np.ndarray, pids_after: np.ndarray, parent: int | None, step: int,
              centroids: tuple | None = None, record: dict | None = None) -> int:
        """Commit ``version``: ``rows`` changed to ``pids_after[rows]`` (``pids_after`` is the whole
        table at this version; version 0 stores it whole). ``centroids`` = (ids, rows, videos)."""
        if storage.exists(self.commit_path(version)):
            raise LabelTableError(f"label version {version} already exists at {self.commit_path(version)}; "
                                  "versions are immutable")
        pids_after = np.asarray(pids_after, dtype=np.int32)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if centroids is not None and len(centroids[0]):
            ids, cents, vids = centroids
            _atomic_npz(self.centroid_path(version), ids=np.asarray(ids, np.int64),
                        centroids=np.asarray(cents, np.float32), videos=np.asarray(vids, np.int64))
        full = {"version": version, "parent": parent, "step": int(step), "num_rows": len(pids_after),
                "num_changed": len(rows), "timestamp": time.time(), **(record or {})}
        if version % self.snapshot_every == 0:
            _atomic_bytes(self.snapshot_path(version), _npy_bytes(pids_after))
        if version > 0:  # the commit point; it carries its audit record in case the log line is lost
            _atomic_npz(self.delta_path(version), rows=rows, pids=pids_after[rows], record=np.array(json.dumps(full)))
        records = [r for r in self._log_records() if r["version"] != version] + [full]
        _atomic_bytes(self.path(HISTORY_FILE), "".join(json.dumps(r) + "\n" for r in records).encode())
        return version

    def _log_records(self) -> list[dict]:
        try:
            text = storage.read_bytes(self.path(HISTORY_FILE)).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def history(self) -> list[dict]:
        """Audit records of the committed versions, by version (retired versions keep their record)."""
        committed = set(self.committed_versions())
        newest = max(committed, default=-1)  # records above it belong to versions that were lost
        records = {r["version"]: r for r in self._log_records() if r["version"] <= newest}
        for v in committed - set(records):  # a crash between the commit and its log line
            if v == 0:
                records[0] = {"version": 0, "parent": None, "step": 0}
                continue
            try:
                records[v] = json.loads(str(self._load(self.delta_path(v), v, "delta")["record"]))
            except (LabelTableError, KeyError):
                continue  # unreadable: latest_version() reports it
        return [records[v] for v in sorted(records)]

    # --- retention ---------------------------------------------------------------------------------

    def pins(self) -> list[int]:
        try:
            return json.loads(storage.read_bytes(self.path(PINS_FILE)))
        except FileNotFoundError:
            return []

    def pin(self, version: int, keep: int) -> list[int]:
        """Keep ``version`` readable (a checkpoint references it); only the newest ``keep`` pins count."""
        pins = [v for v in self.pins() if v != version] + [int(version)]
        pins = sorted(pins)[-keep:] if keep > 0 else []
        _atomic_bytes(self.path(PINS_FILE), json.dumps(pins).encode())
        return pins

    def collect(self, latest: int, held: Iterable[int] = ()) -> int:
        """Delete what no retained version needs; merge retired centroid files into the base.
        ``held``: versions in use right now (the trainers' current one), retained like pins.
        Returns the oldest retained version."""
        pins = [v for v in [*self.pins(), *held] if v is not None and v <= latest]
        oldest = min([max(0, latest - self.keep_versions + 1)] + pins)
        files = self._files()
        snaps = [v for v in files["snap.npy"] if v <= oldest]
        chain_start = max(snaps) if snaps else 0
        for v in files["snap.npy"]:
            if 0 < v < chain_start:  # version 0 (the initial labels) stays: quality is measured against it
                storage.delete(self.snapshot_path(v))
        for v in files["delta.npz"]:
            if v < chain_start:  # the snapshot at chain_start stands for everything before it
                storage.delete(self.delta_path(v))
        retire = sorted(v for v in files["centroids.npz"] if v <= oldest)
        if retire:
            manifest = self.base_manifest()
            for v in retire:  # one file at a time: memory is one file and one partition
                if v > int(manifest["base_version"]):  # else merged already (a crash before its delete)
                    self._merge_into_base(v, manifest)
                storage.delete(self.centroid_path(v))
        return oldest

    def disk_bytes(self) -> int:
        """Bytes of the table's files, the centroid base included."""
        return sum(self.listing().values()) + sum(storage.listdir(storage.join(self.root, BASE_DIR)).values())


def _rows2d(rows: np.ndarray, n: int) -> np.ndarray:
    """Centroid rows as (n, D) (an empty publication may be stored as (0,) or (0, 0))."""
    rows = np.asarray(rows)
    return rows.reshape(n, rows.shape[1] if rows.ndim == 2 else 0) if n == 0 else rows


def _width(parts: list[tuple], where: str) -> int:
    dims = {p[1].shape[1] for p in parts if len(p[0])}
    if len(dims) > 1:
        raise LabelTableError(f"centroids of different widths {sorted(dims)} in {where}")
    return dims.pop() if dims else 0


def _merge_parts(parts: list[tuple], where: str) -> tuple:
    """merge_newest over (ids, rows, videos, versions) parts of one width."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    dim = _width(parts, where)
    if len(parts) == 1 and len(np.unique(parts[0][0])) == len(parts[0][0]):
        ids, rows, videos, versions = parts[0]
        order = np.argsort(ids, kind="stable")
        return ids[order], rows.reshape(len(ids), dim)[order], videos[order], versions[order]
    return merge_newest(np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1].reshape(len(p[0]), dim) for p in parts]),
                        np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _atomic_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_bytes(path, buf.getvalue())


def _atomic_bytes(path: str, data: bytes) -> None:
    """Local: temp file + fsync + rename; object store: one whole-object upload."""
    storage.write_bytes_atomic(path, data)
