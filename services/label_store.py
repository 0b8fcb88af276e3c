"""The label store: a named Ray actor that knows the latest label version and hands trainers what
changed since the version they hold, plus the published centroids of their shard of identities.

Storage is :class:`dynamix_core.labeling.label_table.LabelStore` (one parquet per version, written
to a temporary name and renamed; an audit log); centroids of each version are an ``.npz`` beside it,
also written atomically. The actor keeps no state that storage does not have: after a restart
(``max_restarts=-1``) it re-reads the newest readable version, and a corrupt or missing newest
file is reported while the previous version stays in force (a corrupt one is moved aside, so the
next commit can take its number).

Trainers never block on it: they poll ``latest()`` with ``ray.wait(timeout=0)`` and only fetch
``changes_since()`` when a newer version exists.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from dynamix_core.centroids.sharded import owner_rank
from dynamix_core.labeling.label_table import LabelStore, LabelStoreError, LabelTable

log = logging.getLogger(__name__)


@dataclass
class LabelDelta:
    """What a trainer applies to move from ``since`` to ``version``."""

    version: int
    step: int
    keys: np.ndarray  # keys whose label changed (object array)
    pids: np.ndarray  # their new labels (-1 = not used)
    centroid_ids: np.ndarray  # identities with published centroids owned by the asking rank
    centroids: np.ndarray  # (M, D) float32
    centroid_videos: np.ndarray  # (M,) video of each identity
    full: bool  # True when the delta is the whole table (trainer too far behind)
    #: single-camera identities in use up to ``version`` (1 + the largest label or published id),
    #: the same for every rank: each rank's bank spans ``bank_offset + num_identities`` rows
    num_identities: int = 0


def _centroid_path(store: LabelStore, version: int) -> Path:
    return store.root / f"centroids-v{version:08d}.npz"


def _save_npz_atomic(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LabelStoreService:
    """The actor's logic (plain class: unit-testable without Ray)."""

    def __init__(self, root: str):
        self.store = LabelStore(root)
        self.version: int | None = None
        self.table: LabelTable | None = None
        self.step = 0
        self._recover()

    def _recover(self) -> None:
        version = self.store.latest_version()  # warns about newer unreadable versions
        self._set_aside_newer(-1 if version is None else version)
        if version is None:
            return
        self.version, self.table = version, self.store.read(version)
        history = {r["version"]: r for r in self.store.history()}
        self.step = int(history.get(version, {}).get("step", 0))
        log.info("label store %s: recovered version %d (step %d)", self.store.root, version, self.step)

    def _set_aside_newer(self, version: int) -> None:
        """Rename the (unreadable) version files newer than ``version`` to ``<name>.corrupt-<time>``:
        versions are immutable, so left in place they would make every later commit fail; renamed,
        the next commit reuses their number and the evidence stays on disk."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for path in self.store.root.glob("v*.parquet"):
            if path.stem[1:].isdigit() and int(path.stem[1:]) > version:
                aside = path.with_name(f"{path.name}.corrupt-{stamp}")
                os.replace(path, aside)
                log.warning("label store %s: unreadable %s moved to %s", self.store.root, path.name, aside.name)

    def root(self) -> str:
        """The folder this store serves (resolved)."""
        return str(self.store.root.resolve())

    def latest(self) -> tuple[int | None, int]:
        return self.version, self.step

    def initialise(self, keys: list[str], pids: np.ndarray) -> int:
        """Version 0 (tracker labels, or all -1 for ReMix); a no-op when a version exists already."""
        if self.version is not None:
            return self.version
        table = LabelTable.initial(np.asarray(keys, dtype=object), np.asarray(pids, dtype=np.int64))
        self.store.write(table, parent=None, step=0)
        self.version, self.table, self.step = table.version, table, 0
        return table.version

    def commit(self, keys, pids, *, step: int, centroid_ids, centroids, centroid_videos, videos=(),
               num_splits: int = 0, num_merges: int = 0) -> int:
        """A new version: ``keys`` get ``pids``; centroids published for ``centroid_ids``."""
        if self.table is None:
            raise LabelStoreError("commit before initialise: the store holds no version yet")
        table = self.table.updated(np.asarray(keys, dtype=object), np.asarray(pids, dtype=np.int64))
        _save_npz_atomic(_centroid_path(self.store, table.version), ids=np.asarray(centroid_ids, dtype=np.int64),
                         centroids=np.asarray(centroids, dtype=np.float32),
                         videos=np.asarray(centroid_videos, dtype=np.int64))
        self.store.write(table, parent=self.version, step=step, videos_relabeled=videos,
                         num_splits=num_splits, num_merges=num_merges)
        self.version, self.table, self.step = table.version, table, step
        return table.version

    def changes_since(self, since: int | None, rank: int = 0, world_size: int = 1, sharded: bool = False,
                      until: int | None = None, bank_offset: int = 0) -> LabelDelta:
        """Labels changed after ``since`` up to version ``until`` (default: the latest), and the
        centroids published in between. With a sharded bank only the rows ``rank`` owns: single
        identity ``g`` is bank row ``bank_offset + g``, held by rank
        :func:`~dynamix_core.centroids.owner_rank` of that row (the bank's own rule). Data-parallel
        ranks pass the same ``until`` so they switch to the same version at the same step."""
        if self.table is None:
            raise LabelStoreError("no label version yet")
        until = self.version if until is None else until
        if until > self.version:
            raise LabelStoreError(f"label version {until} does not exist yet (latest is {self.version})")
        target = self.table if until == self.version else self.store.read(until)
        full = since is None or since > until or not self.store.path_of(since).is_file()
        if full:
            keys, pids = target.keys, target.pids
        else:
            old = self.store.read(since)
            changed = old.pids != target.pids  # tables of one run share key order (updated() keeps it)
            keys, pids = target.keys[changed], target.pids[changed]
        ids, rows, videos = [], [], []
        first = 1 if full else since + 1
        for version in range(first, until + 1):  # newer versions overwrite older rows
            path = _centroid_path(self.store, version)
            if not path.is_file():
                continue
            with np.load(path) as z:
                ids.append(z["ids"]), rows.append(z["centroids"]), videos.append(z["videos"])
        num_identities = int(target.pids.max(initial=-1)) + 1
        if ids:
            ids_M, rows_MD, videos_M = np.concatenate(ids), np.concatenate(rows), np.concatenate(videos)
            _, last = np.unique(ids_M[::-1], return_index=True)  # newest publication of each identity
            keep = len(ids_M) - 1 - last
            ids_M, rows_MD, videos_M = ids_M[keep], rows_MD[keep], videos_M[keep]
            num_identities = max(num_identities, int(ids_M.max(initial=-1)) + 1)
            if sharded:
                own = owner_rank(ids_M + bank_offset, world_size) == rank
                ids_M, rows_MD, videos_M = ids_M[own], rows_MD[own], videos_M[own]
        else:
            ids_M, rows_MD, videos_M = np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        return LabelDelta(until, self.step, keys, pids, ids_M, rows_MD, videos_M, full, num_identities)

    def history(self) -> list[dict]:
        return self.store.history()


# max_restarts=-1: a killed store comes back and recovers from storage; max_task_retries=-1: calls
# made while it restarts are retried instead of failing the trainer.
LabelStoreActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(LabelStoreService)


def store_actor_name(run_name: str) -> str:
    return f"dynamix-labels-{run_name}"


def get_or_create_store(run_name: str, root: str, namespace: str = "dynamix"):
    """The run's label store actor (created on first use, found by name afterwards). A live store
    of the same run name that serves another folder is refused: its labels belong to another run."""
    store = LabelStoreActor.options(name=store_actor_name(run_name), namespace=namespace, get_if_exists=True,
                                    lifetime="detached").remote(root)
    serving = ray.get(store.root.remote())
    if serving != str(Path(root).resolve()):
        raise ValueError(
            f"label store {store_actor_name(run_name)!r} is live and serves {serving}, not {Path(root).resolve()}: "
            f"another run named {run_name!r} (other run.storage) is running or was left behind; stop it "
            f"(dynamix stop) or choose another run.name")
    return store
