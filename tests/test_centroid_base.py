"""The partitioned centroid base of the label store (dynamix_core/labeling/label_table.py) against a
dense reference: a K x D array updated by plain numpy from the same publications. A version writes
only the partitions its identities fall in, a trainer holding any retained version catches up by
reading only what changed, a sharded rank gets exactly its rows, a crash part-way through a merge
loses nothing, and a store written with the old single-file base is still read."""

from __future__ import annotations

import io

import numpy as np
import pytest

import dynamix_core.labeling.label_table as lt
from dynamix_core.centroids.sharded import owner_rank
from dynamix_core.labeling import LabelTable
from services.label_store import LabelStore

K, D, P, ROWS = 1000, 4, 50, 40


class Dense:
    """Every identity's newest centroid and video, and the version that published it (-1: never)."""

    def __init__(self):
        self.cent = np.zeros((K, D), np.float32)
        self.video = np.full(K, -1, np.int64)
        self.version = np.full(K, -1, np.int64)

    def publish(self, version, ids, cents, videos):
        self.cent[ids], self.video[ids], self.version[ids] = cents, videos, version


def publication(rng, version):
    """Identities of a few videos (clusters of consecutive ids) plus a few scattered ones."""
    starts = rng.choice(K // 10, size=rng.integers(1, 4), replace=False) * 10
    ids = np.unique(np.concatenate([np.arange(s, s + rng.integers(1, 10)) for s in starts] +
                                   [rng.choice(K, size=rng.integers(0, 3))])).astype(np.int64)
    return ids, rng.normal(size=(len(ids), D)).astype(np.float32), rng.integers(0, 99, size=len(ids))


def commit(store, dense, rng, version):
    ids, cents, videos = publication(rng, version)
    dense.publish(version, ids, cents, videos)
    store.write(version, rows=[version % ROWS], pids_after=np.full(ROWS, version, np.int32), parent=version - 1,
                step=version, centroids=(ids, cents, videos))
    store.collect(version)
    return ids


def apply(held: Dense, got, version):
    ids, cents, videos = got
    held.publish(version, ids, cents, videos)


def assert_same(held: Dense, dense: Dense, mask=None):
    mask = np.ones(K, bool) if mask is None else mask
    np.testing.assert_array_equal(held.video[mask], dense.video[mask])
    np.testing.assert_array_equal(held.cent[mask], dense.cent[mask])


def new_store(root, **kw):
    store = LabelTable(root, snapshot_every=8, keep_versions=2, partition_ids=P, **kw)
    store.write(0, rows=[], pids_after=np.zeros(ROWS, np.int32), parent=None, step=0)
    return store


@pytest.fixture
def root(label_root):
    return label_root


def test_trainers_at_any_lag_and_every_shard_read_what_a_dense_array_holds(root):
    rng = np.random.default_rng(0)
    store, dense = new_store(root), Dense()
    start = Dense()  # a trainer that held version 3 and moves only at the end (3 was merged long ago)
    for version in range(1, 31):
        commit(store, dense, rng, version)
        if version == 3:
            apply(start, store.centroids_between(None, 3), 3)
    assert store.base_version() == 29  # all but the last two versions were merged
    # a trainer's first call, whole and per rank of a sharded bank (bank row = offset + identity)
    fresh = Dense()
    apply(fresh, store.centroids_between(None, 30), 30)
    assert_same(fresh, dense)
    assert set(store.centroids_between(None, 30)[0].tolist()) == set(np.flatnonzero(dense.version >= 0).tolist())
    world, offset = 3, 7
    for rank in range(world):
        mine = owner_rank(np.arange(K) + offset, world) == rank
        shard = Dense()
        got = store.centroids_between(None, 30, owned=lambda g: owner_rank(g + offset, world) == rank)
        assert mine[got[0]].all()  # nothing of another rank
        apply(shard, got, 30)
        assert_same(shard, dense, mine)
    # the trainer 27 versions behind moves to 30 with what was published after 3 (from the base)
    got = store.centroids_between(3, 30)
    assert set(got[0].tolist()) == set(np.flatnonzero(dense.version > 3).tolist())
    apply(start, got, 30)
    assert_same(start, dense)


def test_a_version_writes_only_its_own_partitions(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    store, dense = new_store(tmp_path), Dense()
    for version in range(1, 12):  # a base spread over most partitions
        commit(store, dense, rng, version)
    assert len(store.base_manifest()["partitions"]) > 10
    written: list[str] = []
    real = lt._atomic_bytes

    def record(path, data):
        written.append((str(path).rsplit("/", 1)[-1], len(data)))
        real(path, data)

    monkeypatch.setattr(lt, "_atomic_bytes", record)
    ids = np.array([2 * P + 1, 2 * P + 7, 9 * P])  # partitions 2 and 9
    store.write(12, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=11, step=12,
                centroids=(ids, np.ones((3, D), np.float32), [5, 5, 6]))
    dense.publish(12, ids, np.ones((3, D), np.float32), [5, 5, 6])
    store.collect(12)  # retires version 10 (keep 2: 11, 12)
    store.write(13, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=12, step=13)
    store.write(14, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=13, step=14)
    before = {p.name: p.read_bytes() for p in (tmp_path / "centroids-base").iterdir()}
    written.clear()
    store.collect(14)  # retires 12 (no centroid file for 13): merges exactly partitions 2 and 9
    assert sorted(name for name, _ in written) == ["manifest.json", "p0000002.npz", "p0000009.npz"]
    after = {p.name: p.read_bytes() for p in (tmp_path / "centroids-base").iterdir()}
    changed = {n for n in after if before.get(n) != after[n]}
    assert changed == {"manifest.json", "p0000002.npz", "p0000009.npz"}
    # bytes written for the base: the two partitions (<= P rows each) and the manifest, not K x D
    assert sum(size for _, size in written) < 2 * P * (D * 4 + 24) + 4096
    fresh = Dense()
    apply(fresh, store.centroids_between(None, 14), 14)
    assert_same(fresh, dense)


def test_a_trainer_at_or_after_the_base_reads_no_partition_and_one_behind_reads_only_newer_ones(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    store, dense = new_store(tmp_path), Dense()
    for version in range(1, 21):
        commit(store, dense, rng, version)
    read: list[int] = []
    real = LabelTable.read_partition
    monkeypatch.setattr(LabelTable, "read_partition", lambda self, p: read.append(p) or real(self, p))
    base = store.base_version()
    store.centroids_between(base, 20)
    assert read == []  # only the centroid files after the base
    manifest = store.base_manifest()
    since = base - 3
    got = store.centroids_between(since, 20)
    assert sorted(read) == sorted(p for p, (newest, _) in manifest["partitions"].items() if newest > since)
    assert len(read) < len(manifest["partitions"])
    assert set(got[0].tolist()) == set(np.flatnonzero(dense.version > since).tolist())


def test_a_crash_part_way_through_a_merge_loses_nothing_and_the_next_collect_finishes_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    store, dense = new_store(tmp_path), Dense()
    for version in range(1, 6):
        commit(store, dense, rng, version)
    ids = np.array([1, 3 * P, 5 * P, 7 * P])
    store.write(6, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=5, step=6,
                centroids=(ids, np.full((4, D), 6, np.float32), [1, 2, 3, 4]))
    dense.publish(6, ids, np.full((4, D), 6, np.float32), [1, 2, 3, 4])
    store.collect(6)
    store.write(7, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=6, step=7)
    real = lt._atomic_bytes

    def fail_one_partition(path, data):
        if str(path).endswith("p0000005.npz"):
            raise OSError("disk full")
        real(path, data)

    store.write(8, rows=[0], pids_after=np.zeros(ROWS, np.int32), parent=7, step=8)
    monkeypatch.setattr(lt, "_atomic_bytes", fail_one_partition)
    with pytest.raises(OSError, match="disk full"):
        store.collect(8)  # retires version 6: partition 5 fails, the others may have been written
    monkeypatch.setattr(lt, "_atomic_bytes", real)
    assert store.base_version() == 5
    assert (tmp_path / "v00000006.centroids.npz").exists()
    for held in (None, 5):
        got = LabelTable(tmp_path, partition_ids=P).centroids_between(held, 8)
        reader = Dense()
        apply(reader, got, 8)
        assert_same(reader, dense, None if held is None else dense.version > held)
    store.collect(8)
    assert not (tmp_path / "v00000006.centroids.npz").exists() and store.base_version() == 6
    fresh = Dense()
    apply(fresh, store.centroids_between(None, 8), 8)
    assert_same(fresh, dense)


def test_a_store_with_the_old_single_file_base_is_split_into_partitions(tmp_path):
    rng = np.random.default_rng(4)
    store, dense = new_store(tmp_path), Dense()
    ids = np.unique(rng.choice(K, 300)).astype(np.int64)
    cents = rng.normal(size=(len(ids), D)).astype(np.float32)
    dense.publish(1, ids, cents, ids % 7)
    buf = io.BytesIO()  # what the previous code left: one whole K x D file at version 1
    np.savez(buf, ids=ids, centroids=cents, videos=ids % 7, version=np.ones(len(ids), np.int64),
             base_version=np.array(1))
    (tmp_path / "centroids-base.npz").write_bytes(buf.getvalue())
    store = LabelTable(tmp_path, snapshot_every=8, keep_versions=2, partition_ids=P)
    store.write(1, rows=[0], pids_after=np.ones(ROWS, np.int32), parent=0, step=1)
    for version in range(2, 6):
        commit(store, dense, rng, version)
    assert not (tmp_path / "centroids-base.npz").exists()
    assert len(store.base_manifest()["partitions"]) > 1
    fresh = Dense()
    apply(fresh, store.centroids_between(None, 5), 5)
    assert_same(fresh, dense)


def test_the_service_hands_each_sharded_rank_its_rows_of_the_base_and_a_lagging_one_only_what_changed(tmp_path):
    rng = np.random.default_rng(5)
    svc = LabelStore(str(tmp_path), snapshot_every=8, keep_versions=2)
    svc.table.partition_ids = P
    svc.initialise(np.zeros(ROWS, np.int32))
    dense = Dense()
    for version in range(1, 16):
        ids, cents, videos = publication(rng, version)
        dense.publish(version, ids, cents, videos)
        assert svc.commit([version % ROWS], [version], step=version, centroid_ids=ids, centroids=cents,
                          centroid_videos=videos) == version
    again = LabelStore(str(tmp_path), snapshot_every=8, keep_versions=2)  # nothing in memory
    world, offset = 4, 3
    for rank in range(world):
        delta = again.changes_since(None, rank=rank, world_size=world, sharded=True, bank_offset=offset)
        mine = owner_rank(np.arange(K) + offset, world) == rank
        assert mine[delta.centroid_ids].all()
        shard = Dense()
        apply(shard, (delta.centroid_ids, delta.centroids, delta.centroid_videos), 15)
        assert_same(shard, dense, mine)
        assert delta.num_identities == int(np.flatnonzero(dense.version >= 0).max()) + 1
    held = again.table.base_version()
    delta = again.changes_since(held, until=15)
    assert set(delta.centroid_ids.tolist()) == set(np.flatnonzero(dense.version > held).tolist())
