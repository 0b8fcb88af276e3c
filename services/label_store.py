"""The label store: a named Ray actor that knows the latest label version and hands trainers what
changed since the version they hold, plus the published centroids of their shard of identities.

Labels are addressed by row of the run's ``index.parquet`` (fixed order): the actor holds the
current version as one int32 array, a commit writes only the rows it changed
(:class:`dynamix_core.labeling.label_table.LabelTable`: deltas, periodic snapshots, retention of the
last versions and of every version a checkpoint pinned, old centroids merged into a base partitioned
by identity range, of which a commit rewrites only the partitions it touched), and
every rank that asks for the same step gets the same delta: it is put into the object store once
and shared. The actor keeps no state that storage does not have: after a restart
(``max_restarts=-1``) it re-reads the newest readable version, and a corrupt or missing newest
file is reported while the previous version stays in force (a corrupt one is moved aside, so the
next commit can take its number).

Trainers never block on it: they poll ``latest()`` with ``ray.wait(timeout=0)`` and only fetch
``changes_since()`` when a newer version exists.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from dynamix_core import storage
from dynamix_core.centroids.sharded import owner_rank
from dynamix_core.labeling.label_table import KEEP_VERSIONS, SNAPSHOT_EVERY, LabelTable, LabelTableError, merge_newest

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None where there is no glibc). A commit frees arrays of tens of MB;
    glibc keeps such freed blocks in its heap once its adaptive mmap threshold has grown, so
    without a trim the store's RSS carries every commit's transient copies."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@dataclass
class LabelDelta:
    """What a trainer applies to move from ``since`` to ``version``."""

    version: int
    step: int
    rows: np.ndarray | None  # rows (of the run's index) whose label changed; None when ``full``
    pids: np.ndarray | None  # their new labels, int32 (-1 = not used); ``full``: every row's label
    centroid_ids: np.ndarray  # identities with published centroids owned by the asking rank
    centroids: np.ndarray  # (M, D) float32
    centroid_videos: np.ndarray  # (M,) video of each identity
    full: bool  # True when the delta is the whole table (trainer too far behind, or first call)
    #: single-camera identities in use up to ``version`` (1 + the largest label or published id),
    #: the same for every rank: each rank's bank spans ``bank_offset + num_identities`` rows
    num_identities: int = 0
    #: ``[ObjectRef of (rows, pids)]`` when the labels travel through the object store (one put
    #: shared by every rank that asks for the same versions); :meth:`labels` resolves it
    shared: list | None = None

    def labels(self) -> tuple[np.ndarray | None, np.ndarray]:
        if self.pids is None:
            self.rows, self.pids = ray.get(self.shared[0])
        return self.rows, self.pids

    def apply(self, labels: np.ndarray | None) -> np.ndarray:
        """``labels`` (int32, one per row) moved to this version (a new array when ``full``)."""
        rows, pids = self.labels()
        if self.full or labels is None:
            return np.array(pids, dtype=np.int32)
        labels[rows] = pids
        return labels


class LabelStore:
    """The run's label store, the only writer of its :class:`LabelTable`: the actor's logic (plain
    class: unit-testable without Ray; the actor is :data:`LabelStoreActor`)."""

    #: deltas kept for re-serving (every rank asks for the same one within a step)
    cache_size = 4
    #: newest commits whose changed rows and centroids stay in memory: at least this many, and at
    #: least the retained ``keep_versions`` + 2, so a trainer lagging within the retention window
    #: switches from memory, in time proportional to what changed, without reading the centroid base
    recent_versions = 4

    def __init__(self, root: str, snapshot_every: int = SNAPSHOT_EVERY, keep_versions: int = KEEP_VERSIONS):
        self.table = LabelTable(root, snapshot_every=snapshot_every, keep_versions=keep_versions)
        self.recent_versions = max(type(self).recent_versions, keep_versions + 2)
        self.version: int | None = None
        self.pids: np.ndarray | None = None  # int32, the latest version
        self.step = 0
        self.num_identities = 0
        self._identities_at: dict[int, int] = {}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        #: what the newest commits of this process changed and published, so that the trainers'
        #: switch to them reads nothing from storage: version -> (rows, (ids, centroids, videos))
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._held: int | None = None  # the version trainers last switched to (kept by retention)
        self._step_versions: dict[int, int] | None = None  # step -> newest version committed for it
        self._recover()

    def _share(self, payload):
        """Hook: the Ray actor puts ``payload`` into the object store once (see LabelStoreActor)."""
        return None

    def _recover(self) -> None:
        version = self.table.latest_version()  # warns about newer unreadable versions
        self._set_aside_newer(-1 if version is None else version)
        if version is None:
            return
        self.version, self.pids = version, self.table.read(version)
        history = {r["version"]: r for r in self.table.history()}
        self._identities_at = {v: int(r.get("num_identities", 0)) for v, r in history.items()}
        self.step = int(history.get(version, {}).get("step", 0))
        self.num_identities = max(int(self.pids.max(initial=-1)) + 1, self._identities_at.get(version, 0))
        log.info("label store %s: recovered version %d (step %d)", self.table.root, version, self.step)

    def _set_aside_newer(self, version: int) -> None:
        """Rename the (unreadable) version files newer than ``version`` to ``<name>.corrupt-<time>``:
        versions are immutable, so left in place they would make every later commit fail; renamed,
        the next commit reuses their number and the evidence stays on disk."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for name in self.table.listing():
            head = name.split(".")[0]
            if name.startswith("v") and head[1:].isdigit() and int(head[1:]) > version and ".corrupt-" not in name:
                aside = f"{name}.corrupt-{stamp}"
                _move(self.table.path(name), self.table.path(aside))
                log.warning("label store %s: unreadable %s moved to %s", self.table.root, name, aside)

    def root(self) -> str:
        """The folder this store serves (resolved)."""
        return _canonical(self.table.root)

    def latest(self) -> tuple[int | None, int]:
        return self.version, self.step

    def current(self) -> dict:
        """Latest version, its step, row count and identities in use (the coordinator numbers new
        identities after them)."""
        return {"version": self.version, "step": self.step, "num_identities": self.num_identities,
                "num_rows": 0 if self.pids is None else len(self.pids)}

    def free_ids(self) -> np.ndarray:
        """Identities below ``num_identities`` that no row holds any more, except those the newest
        commit retired; the coordinator gives new identities these numbers first, so the
        trainers' centroid banks stop growing with every relabel and reuse the retired rows.

        Reuse is safe for labels: a trainer moving from any version to a later one receives every
        row changed in between and the centroids published in between, and a reused number is
        always published with its new centroid. The newest commit's retirements wait one more
        commit so that a batch a trainer prepared under the previous version never meets a bank
        row that already holds another identity. After a restart the newest commit's changes
        are not in memory: nothing is reused until this process has committed once."""
        if self.pids is None or self.version not in self._recent:
            return np.zeros(0, dtype=np.int64)
        held = self.pids[self.pids >= 0]
        free = np.bincount(held, minlength=self.num_identities)[: self.num_identities] == 0
        _, before, _ = self._recent[self.version]
        free[before[(before >= 0) & (before < self.num_identities)]] = False
        return np.flatnonzero(free).astype(np.int64)

    def initialise(self, pids: np.ndarray) -> int:
        """Version 0: one label per row of the run's index (tracker labels, or all -1 for ReMix); a
        no-op when a version exists already (for the same number of rows)."""
        pids = np.asarray(pids)
        if self.version is not None:
            if len(pids) != len(self.pids):
                raise LabelTableError(
                    f"label store {self.table.root} holds {len(self.pids)} rows, the run's index has {len(pids)}: "
                    "the single-camera data changed under a running run; start a new run.name")
            return self.version
        table = pids.astype(np.int32)
        self.table.write(0, rows=np.zeros(0, np.int64), pids_after=table, parent=None, step=0,
                         record={"num_identities": int(table.max(initial=-1)) + 1})
        self.version, self.pids, self.step = 0, table, 0
        self.num_identities = self._identities_at[0] = int(table.max(initial=-1)) + 1
        return 0

    def initialise_from_index(self, index_path: str, with_labels: bool) -> int:
        """:meth:`initialise` from the run's index itself (its ``label`` column, or all -1), so the
        driver never holds a per-row array."""
        from dynamix_core import storage

        pids = storage.read_table(index_path, columns=["label"])["label"].to_numpy().astype(np.int32)
        return self.initialise(pids if with_labels else np.full(len(pids), -1, dtype=np.int32))

    def read_rows(self, rows) -> tuple[int, np.ndarray]:
        """The latest version and the labels of ``rows`` in it (int32)."""
        if self.pids is None:
            raise LabelTableError("no label version yet")
        return self.version, self.pids[np.asarray(rows, dtype=np.int64)]

    def commit(self, rows, pids, *, step: int, centroid_ids, centroids, centroid_videos, videos=(),
               num_splits: int = 0, num_merges: int = 0) -> int:
        """A new version: ``rows`` get ``pids``; centroids published for ``centroid_ids``."""
        if self.pids is None:
            raise LabelTableError("commit before initialise: the store holds no version yet")
        rows = np.asarray(rows, dtype=np.int64)
        pids = np.asarray(pids, dtype=np.int32)
        if len(rows) != len(pids):
            raise ValueError(f"commit: {len(rows)} rows but {len(pids)} labels")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.pids)):
            raise ValueError(f"commit: rows outside 0..{len(self.pids) - 1}")
        ids = np.asarray(centroid_ids, dtype=np.int64)
        changed = np.unique(rows[self.pids[rows] != pids])
        before = self.pids[changed].copy()  # kept in memory: older versions are rebuilt from the current one
        old = self.pids[rows].copy()
        self.pids[rows] = pids  # in place (no copy of the table); undone if the write fails
        version = self.version + 1
        num_identities = max(self.num_identities, int(pids.max(initial=-1)) + 1, int(ids.max(initial=-1)) + 1)
        try:
            self.table.write(version, rows=changed, pids_after=self.pids, parent=self.version, step=step,
                             centroids=(ids, centroids, centroid_videos),
                             record={"videos_relabeled": sorted(int(v) for v in videos), "num_splits": int(num_splits),
                                     "num_merges": int(num_merges), "num_identities": num_identities})
        except BaseException:
            self.pids[rows] = old
            raise
        self.version, self.step, self.num_identities = version, step, num_identities
        self._identities_at[version] = num_identities
        if self._step_versions is not None:
            self._step_versions[int(step)] = version
        cents = np.asarray(centroids, np.float32)
        self._recent[version] = (changed, before, (ids, cents.reshape(len(ids), cents.shape[-1] if cents.ndim == 2 else 0),
                                           np.asarray(centroid_videos, np.int64)))
        while len(self._recent) > self.recent_versions:
            self._recent.popitem(last=False)
        # the trainers' current version stays too: a checkpoint pins it only when one is written
        self.table.collect(version, held=[self._held])
        if _malloc_trim() is not None:
            _malloc_trim()(0)  # hand the heap's free pages back to the system
        return version

    def pin(self, version: int, keep: int) -> list[int]:
        """A checkpoint references ``version``: keep it readable (the newest ``keep`` pins count)."""
        return self.table.pin(version, keep)

    def _cached(self, key: tuple, compute):
        if key not in self._cache:
            self._cache[key] = compute()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _in_memory(self, since: int | None, until: int) -> bool:
        return since is not None and 0 <= since < until and all(v in self._recent for v in range(since + 1, until + 1))

    def _labels(self, since: int | None, until: int) -> tuple:
        """(full, rows, pids, shared) for (since, until], computed once for every rank."""
        if self._in_memory(since, until) or since == until:
            full = False
        else:
            full = since is None or since < 0 or since > until or not self.table.can_move(since, until)
        target = self._table_at(until)
        if full:
            rows, pids = None, target.copy()
        else:
            if self._in_memory(since, until):
                parts = [self._recent[v][0] for v in range(since + 1, until + 1)]
                rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            else:
                rows = self.table.changed_rows(since, until)
            pids = target[rows]
        return full, rows, pids, self._share((rows, pids))

    def _table_at(self, until: int) -> np.ndarray:
        """Every row's label at ``until``: the current table, or the current one with the newest
        commits undone when this process made them (so a version rank 0 just chose stays servable
        after retention deleted it from storage), else read from storage."""
        if until == self.version:
            return self.pids
        if all(v in self._recent for v in range(until + 1, self.version + 1)):
            table = self.pids.copy()
            for v in range(self.version, until, -1):
                changed, before, _ = self._recent[v]
                table[changed] = before
            return table
        return self.table.read(until)

    def _reads_base(self, since: int | None, until: int) -> bool:
        """Whether the centroids of (since, until] come from the partitioned base (a trainer's first
        call, or one behind the base), not only from memory or the newer centroid files."""
        return not self._in_memory(since, until) and (since is None or since < self.table.base_version())

    def _centroids(self, since: int | None, until: int, owned=None) -> tuple:
        """Newest publication of each identity published in (since, until]: from memory when this
        process committed those versions, else from storage (``owned``: filter to a rank's identities
        while reading, so a sharded trainer's first call never gathers the whole base)."""
        if not self._in_memory(since, until):
            merged_up_to = self.table.base_version()
            if until < merged_up_to:
                # publications up to `until` were merged into the base (only each identity's newest is
                # kept): hand out the newest known ones; they only initialise bank rows
                return self.table.centroids_between(since, merged_up_to, owned)
            return self.table.centroids_between(since, until, owned)
        ids, rows, videos, versions = [], [], [], []
        for v in range(since + 1, until + 1):
            i, c, vid = self._recent[v][2]
            ids.append(i), rows.append(c), videos.append(vid), versions.append(np.full(len(i), v, np.int64))
        dim = max((r.shape[1] for r in rows if len(r)), default=0)
        merged = merge_newest(np.concatenate(ids), np.concatenate([r.reshape(len(r), dim) for r in rows]),
                              np.concatenate(videos), np.concatenate(versions))
        return merged[0], merged[1], merged[2]

    def changes_since(self, since: int | None, rank: int = 0, world_size: int = 1, sharded: bool = False,
                      until: int | None = None, bank_offset: int = 0, with_centroids: bool = True) -> LabelDelta:
        """Labels changed after ``since`` up to version ``until`` (default: the latest), and the
        centroids published in between. With a sharded bank only the rows ``rank`` owns: single
        identity ``g`` is bank row ``bank_offset + g``, held by rank
        :func:`~dynamix_core.centroids.owner_rank` of that row (the bank's own rule). Data-parallel
        ranks pass the same ``until`` so they switch to the same version at the same step, and
        share one copy of the labels. ``with_centroids=False``: labels only (a resume, whose bank
        comes from its checkpoint)."""
        if self.pids is None:
            raise LabelTableError("no label version yet")
        until = self.version if until is None else until
        if until > self.version:
            raise LabelTableError(f"label version {until} does not exist yet (latest is {self.version})")
        full, rows, pids, shared = self._cached(("labels", since, until), lambda: self._labels(since, until))
        self._held = until
        if with_centroids:
            since_c = None if full else since
            if sharded and self._reads_base(since_c, until):
                # this rank's share of the base, filtered partition by partition; not cached: each
                # rank asks once, and eight cached shares would hold the whole base
                ids_M, rows_MD, videos_M = self._centroids(
                    since_c, until, lambda g: owner_rank(g + bank_offset, world_size) == rank)
            else:
                ids_M, rows_MD, videos_M = self._cached(("centroids", since_c, until),
                                                        lambda: self._centroids(since_c, until))
        else:
            ids_M, rows_MD, videos_M = np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        num_identities = max(self._identities_at.get(until, 0), int(ids_M.max(initial=-1)) + 1)
        if sharded and len(ids_M):
            own = owner_rank(ids_M + bank_offset, world_size) == rank
            ids_M, rows_MD, videos_M = ids_M[own], rows_MD[own], videos_M[own]
        if shared is not None:
            rows, pids = None, None
        return LabelDelta(until, self.step, rows, pids, ids_M, rows_MD, videos_M, full, num_identities, shared)

    def history(self) -> list[dict]:
        return self.table.history()

    def version_for_step(self, step: int) -> int | None:
        """The newest version committed for training step ``step`` after version 0 (None: none yet):
        with ``labeling.deterministic`` each publish step's round commits exactly one. Trainers poll
        it while they wait: answered from memory, the audit log read once per process."""
        if self._step_versions is None:
            records = sorted((r for r in self.table.history() if r["version"] > 0), key=lambda r: r["version"])
            self._step_versions = {int(r.get("step", 0)): r["version"] for r in records}  # the newest wins
        return self._step_versions.get(step)

    def resources(self) -> dict:
        """This process's resident memory and the store folder's size (MiB), for monitoring."""
        rss_kb = peak_kb = 0
        try:
            with open("/proc/self/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            rss_kb, peak_kb = (int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM"))
        except (OSError, ValueError):
            pass
        return {"rss_mb": rss_kb / 1024, "peak_rss_mb": peak_kb / 1024, "disk_mb": self.table.disk_bytes() / 2**20,
                "label_mb": 0.0 if self.pids is None else self.pids.nbytes / 2**20}


def _canonical(root: str) -> str:
    """A store root as compared between runs: a resolved local path, or the URI as given."""
    return str(root).rstrip("/") if storage.is_remote(root) else str(Path(storage.local_path(root)).resolve())


def _move(src: str, dst: str) -> None:
    if storage.is_remote(src):  # no rename on an object store: copy, then delete
        storage.write_bytes_atomic(dst, storage.read_bytes(src))
        storage.delete(src)
    else:
        os.replace(storage.local_path(src), storage.local_path(dst))


class _SharedLabelStore(LabelStore):
    def _share(self, payload):
        return [ray.put(payload)]


# max_restarts=-1: a killed store comes back and recovers from storage; max_task_retries=-1: calls
# made while it restarts are retried instead of failing the trainer.
LabelStoreActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(_SharedLabelStore)


def store_actor_name(run_name: str) -> str:
    return f"dynamix-labels-{run_name}"


def get_or_create_store(run_name: str, root: str, namespace: str = "dynamix", *,
                        snapshot_every: int = SNAPSHOT_EVERY, keep_versions: int = KEEP_VERSIONS):
    """The run's label store actor (created on first use, found by name afterwards). A live store
    of the same run name that serves another folder is refused: its labels belong to another run."""
    store = LabelStoreActor.options(name=store_actor_name(run_name), namespace=namespace, get_if_exists=True,
                                    lifetime="detached").remote(root, snapshot_every, keep_versions)
    serving = ray.get(store.root.remote())
    if serving != _canonical(root):
        raise ValueError(
            f"label store {store_actor_name(run_name)!r} is live and serves {serving}, not {_canonical(root)}: "
            f"another run named {run_name!r} (other run.storage) is running or was left behind; stop it "
            f"(dynamix stop) or choose another run.name")
    return store

