"""Versioned label tables (SPEC 1.1, 2.3a): pseudo-labels live beside the shards, joined at read time.

On disk (one folder)::

    v00000000.parquet   key (str), pid (int64), version (int64)   one full snapshot per version
    v00000001.parquet   ...
    history.jsonl       one audit record per version

``version`` in a snapshot is the version in which that row's pid was last set, so the rows a version
changed are those with ``version == v``. Every file is written to a temporary name in the same folder
and ``os.replace``d, so a reader sees the old file or the new one, never half of one. The audit record
is also stored in the snapshot's parquet metadata (written atomically with the data); ``history``
falls back to it for a version whose log line a crash prevented.

A version file that is missing or unreadable is reported (naming the file) and the newest readable
version stays in force: :meth:`LabelStore.latest_version` skips it with a warning, :meth:`read` of it
raises :class:`LabelStoreError`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_VERSION_FILE = re.compile(r"^v(\d{8})\.parquet$")
_META_KEY = b"dynamix_label_history"
HISTORY_FILE = "history.jsonl"


class LabelStoreError(RuntimeError):
    """A label version file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class LabelTable:
    """One version of the labels: sample key -> pid (int64, -1 = unlabeled)."""

    keys: np.ndarray  # (N,) str
    pids: np.ndarray  # (N,) int64
    set_in: np.ndarray  # (N,) int64 version that last set each pid
    version: int

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.pids) == len(self.set_in)):
            raise ValueError(
                f"keys ({len(self.keys)}), pids ({len(self.pids)}), set_in ({len(self.set_in)}) differ in length"
            )
        uniq, counts = np.unique(self.keys, return_counts=True)
        if len(uniq) != len(self.keys):
            raise ValueError(f"label table v{self.version}: duplicate keys {uniq[counts > 1][:5].tolist()}")

    @classmethod
    def initial(cls, keys, pids) -> "LabelTable":
        keys = np.asarray(keys, dtype=object)
        return cls(keys, np.asarray(pids, dtype=np.int64), np.zeros(len(keys), dtype=np.int64), 0)

    def lookup(self, keys) -> np.ndarray:
        """pids of ``keys`` (every key must be in the table)."""
        keys = np.asarray(keys, dtype=object)
        order = np.argsort(self.keys)
        pos = np.searchsorted(self.keys[order], keys)
        pos = np.minimum(pos, len(order) - 1)
        found = self.keys[order][pos] == keys
        if not found.all():
            raise KeyError(f"keys not in label table v{self.version}: {keys[~found][:5].tolist()}")
        return self.pids[order][pos]

    def updated(self, keys, pids) -> "LabelTable":
        """The next version: ``keys`` get ``pids`` (keys must exist), every other row is unchanged."""
        keys = np.asarray(keys, dtype=object)
        order = np.argsort(self.keys)
        pos = np.searchsorted(self.keys[order], keys)
        pos = np.minimum(pos, len(order) - 1)
        if not (self.keys[order][pos] == keys).all():
            raise KeyError(f"update of keys absent from label table v{self.version}")
        rows = order[pos]
        new_pids, new_set = self.pids.copy(), self.set_in.copy()
        version = self.version + 1
        changed = new_pids[rows] != np.asarray(pids, dtype=np.int64)
        new_pids[rows] = np.asarray(pids, dtype=np.int64)
        new_set[rows[changed]] = version
        return LabelTable(self.keys, new_pids, new_set, version)


class LabelStore:
    """A folder of label-table versions plus the audit log."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_of(self, version: int) -> Path:
        return self.root / f"v{version:08d}.parquet"

    def _listed_versions(self) -> list[int]:
        on_disk = {int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_FILE.match(p.name))}
        logged = {int(r["version"]) for r in self._log_records()}
        return sorted(on_disk | logged)

    def latest_version(self) -> int | None:
        """Newest readable version (None if there is none); newer unreadable ones are warned about."""
        for version in reversed(self._listed_versions()):
            try:
                self._read_table(version)
                return version
            except LabelStoreError as exc:
                warnings.warn(f"{exc}; falling back to the previous version", stacklevel=2)
        return None

    def read(self, version: int | None = None) -> LabelTable:
        """One version (default: the latest readable one)."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise LabelStoreError(f"no readable label version in {self.root}")
        return self._read_table(version)

    def _read_table(self, version: int) -> LabelTable:
        path = self.path_of(version)
        if not path.is_file():
            raise LabelStoreError(f"label version {version}: file {path} is missing")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise LabelStoreError(f"label version {version}: cannot read {path}: {exc}") from exc
        if table.column_names != ["key", "pid", "version"]:
            raise LabelStoreError(
                f"label version {version}: {path} has columns {table.column_names}, expected key, pid, version"
            )
        try:
            return LabelTable(
                np.asarray(table["key"].to_pylist(), dtype=object),
                table["pid"].to_numpy().astype(np.int64),
                table["version"].to_numpy().astype(np.int64),
                version,
            )
        except ValueError as exc:
            raise LabelStoreError(f"label version {version}: {path}: {exc}") from exc

    def write(
        self, table: LabelTable, *, parent: int | None, step: int, videos_relabeled=(), num_splits: int = 0,
        num_merges: int = 0,
    ) -> int:
        """Store ``table`` as its version (must not exist yet) and append its audit record."""
        path = self.path_of(table.version)
        if path.exists():
            raise LabelStoreError(f"label version {table.version} already exists at {path}; versions are immutable")
        record = {
            "version": table.version, "parent": parent, "step": int(step),
            "videos_relabeled": sorted(int(v) for v in videos_relabeled), "num_splits": int(num_splits),
            "num_merges": int(num_merges), "num_rows": len(table.keys),
            "num_changed": int((table.set_in == table.version).sum()), "timestamp": time.time(),
        }
        arrow = pa.table(
            {"key": pa.array(table.keys.tolist(), pa.string()), "pid": pa.array(table.pids, pa.int64()),
             "version": pa.array(table.set_in, pa.int64())}
        ).replace_schema_metadata({_META_KEY: json.dumps(record).encode()})
        _atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))
        records = [r for r in self._log_records() if r["version"] != table.version] + [record]
        text = "".join(json.dumps(r) + "\n" for r in records)
        _atomic_write(self.root / HISTORY_FILE, lambda tmp: Path(tmp).write_text(text))
        return table.version

    def _log_records(self) -> list[dict]:
        path = self.root / HISTORY_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def history(self) -> list[dict]:
        """Audit records by version; a snapshot whose log line is missing contributes its embedded copy."""
        records = {r["version"]: r for r in self._log_records()}
        for p in self.root.iterdir():
            m = _VERSION_FILE.match(p.name)
            if m and int(m.group(1)) not in records:
                try:
                    meta = pq.read_schema(p).metadata or {}
                except (OSError, pa.ArrowException):
                    continue  # unreadable snapshot: latest_version() reports it
                if _META_KEY in meta:
                    records[int(m.group(1))] = json.loads(meta[_META_KEY])
        return [records[v] for v in sorted(records)]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
