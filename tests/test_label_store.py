"""The label store service (services/label_store.py): labels addressed by row of the run's index;
version semantics of ``changes_since`` against hand-computed deltas, recovery from its folder
(clean, corrupt newest file, missing newest file), and the named Ray actor coming back from a kill
with its latest version and sharing one copy of a delta between ranks."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from dynamix_core.labeling.label_table import LabelTable, LabelTableError
from services.label_store import LabelStore, get_or_create_store

ROWS = 6
PIDS_V0 = np.array([0, 0, 1, 1, -1, 2])
DIM = 4
RNG = np.random.default_rng(0)
#: centroid rows published by v1 (ids 5, 0) and v2 (ids 6, 5: id 5 is published again)
CENT_V1 = RNG.normal(size=(2, DIM)).astype(np.float32)
CENT_V2 = RNG.normal(size=(2, DIM)).astype(np.float32)


def build_store(root) -> LabelStore:
    """v0 = PIDS_V0; v1 (step 10): row 0 -> 5, row 1 -> 0 (unchanged); v2 (step 20): row 4 -> 6."""
    svc = LabelStore(str(root))
    assert svc.initialise(PIDS_V0) == 0
    assert svc.commit([0, 1], [5, 0], step=10, centroid_ids=[5, 0], centroids=CENT_V1,
                      centroid_videos=[1, 0], videos=[0, 1], num_splits=1) == 1
    assert svc.commit([4], [6], step=20, centroid_ids=[6, 5], centroids=CENT_V2,
                      centroid_videos=[2, 1], videos=[2]) == 2
    return svc


def labels_of(delta_or_service) -> dict:
    """row -> pid of a delta (every row when it is full), or of the table a service holds."""
    if isinstance(delta_or_service, LabelStore):
        return dict(enumerate(delta_or_service.pids.tolist()))
    rows, pids = delta_or_service.labels()
    rows = np.arange(len(pids)) if rows is None else rows
    return dict(zip(rows.tolist(), pids.tolist()))


def centroid_rows(delta) -> dict[int, tuple[np.ndarray, int]]:
    return {int(g): (row, int(v)) for g, row, v in zip(delta.centroid_ids, delta.centroids, delta.centroid_videos)}


def assert_centroids(delta, expected: dict[int, tuple[np.ndarray, int]]) -> None:
    got = centroid_rows(delta)
    assert sorted(got) == sorted(expected)
    for g, (row, video) in expected.items():
        np.testing.assert_array_equal(got[g][0], row)
        assert got[g][1] == video


# every centroid ever published, newest publication of each identity winning: id 5 comes from v2
ALL_CENTROIDS = {0: (CENT_V1[1], 0), 5: (CENT_V2[1], 1), 6: (CENT_V2[0], 2)}
FULL_V2 = {0: 5, 1: 0, 2: 1, 3: 1, 4: 6, 5: 2}


def test_delta_holds_only_changed_keys_and_newer_centroids(tmp_path):
    svc = build_store(tmp_path)
    assert svc.latest() == (2, 20)

    since0 = svc.changes_since(0)
    assert not since0.full and (since0.version, since0.step) == (2, 20)
    assert labels_of(since0) == {0: 5, 4: 6}  # row 1 was re-set to its old pid: no change
    assert_centroids(since0, ALL_CENTROIDS)

    since1 = svc.changes_since(1)
    assert labels_of(since1) == {4: 6}
    assert_centroids(since1, {5: (CENT_V2[1], 1), 6: (CENT_V2[0], 2)})  # only what v2 published

    current = svc.changes_since(2)
    assert not current.full and len(current.labels()[0]) == 0 and len(current.centroid_ids) == 0
    # applied to a trainer's int32 array, each delta gives the version's table
    held = np.array(PIDS_V0, dtype=np.int32)
    assert since0.apply(held.copy()).tolist() == list(FULL_V2.values())
    assert since1.apply(np.array([5, 0, 1, 1, -1, 2], np.int32)).tolist() == list(FULL_V2.values())


def test_deltas_served_from_memory_equal_those_read_from_storage(tmp_path):
    """The committing service answers from what it just wrote; a restarted one reads the files."""
    svc = build_store(tmp_path)
    svc.commit([2, 3], [9, 1], step=30, centroid_ids=[9], centroids=CENT_V1[:1], centroid_videos=[4])
    reopened = LabelStore(str(tmp_path))
    assert not reopened._recent and len(svc._recent) == 3
    for since in (None, 0, 1, 2, 3):
        for until in range(0 if since is None else since, 4):
            a, b = svc.changes_since(since, until=until), reopened.changes_since(since, until=until)
            assert labels_of(a) == labels_of(b), (since, until)
            assert_centroids(a, centroid_rows(b)), (since, until)


@pytest.mark.parametrize("since", [None, 7, -1], ids=["none", "future", "unknown"])
def test_full_table_when_since_is_none_or_unknown(tmp_path, since):
    delta = build_store(tmp_path).changes_since(since)
    assert delta.full
    assert labels_of(delta) == FULL_V2
    assert_centroids(delta, ALL_CENTROIDS)


def test_sharded_delta_keeps_only_the_ranks_identities(tmp_path):
    svc = build_store(tmp_path)
    for rank in range(2):
        delta = svc.changes_since(None, rank=rank, world_size=2, sharded=True)
        assert_centroids(delta, {g: c for g, c in ALL_CENTROIDS.items() if g % 2 == rank})
        assert labels_of(delta) == FULL_V2  # labels are not sharded, only centroids


def test_initialise_is_a_no_op_once_a_version_exists_and_commit_needs_one(tmp_path):
    with pytest.raises(LabelTableError, match="commit before initialise"):
        LabelStore(str(tmp_path / "empty")).commit([0], [1], step=1, centroid_ids=[],
                                                          centroids=np.zeros((0, DIM)), centroid_videos=[])
    svc = build_store(tmp_path)
    assert svc.initialise(np.full(ROWS, -1)) == 2
    assert labels_of(svc) == FULL_V2
    with pytest.raises(LabelTableError, match="holds 6 rows, the run's index has 7"):
        svc.initialise(np.full(ROWS + 1, -1))
    with pytest.raises(ValueError, match="rows outside 0..5"):
        svc.commit([6], [1], step=30, centroid_ids=[], centroids=np.zeros((0, DIM)), centroid_videos=[])


def test_a_new_service_recovers_latest_version_and_step(tmp_path):
    build_store(tmp_path)
    again = LabelStore(str(tmp_path))
    assert again.latest() == (2, 20)
    assert labels_of(again) == FULL_V2
    assert labels_of(again.changes_since(0)) == {0: 5, 4: 6}
    assert again.read_rows([4, 0]) == (2, pytest.approx(np.array([6, 5])))
    assert again.current() == {"version": 2, "step": 20, "num_identities": 7, "num_rows": ROWS}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_newest_version_falls_back_and_commits_continue(tmp_path, damage):
    svc = build_store(tmp_path)
    newest = Path(svc.table.delta_path(2))
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:20])
    else:
        newest.unlink()
    if damage == "truncate":
        with pytest.warns(UserWarning, match=r"label version 2.*v00000002\.delta\.npz.*falling back"):
            again = LabelStore(str(tmp_path))
    else:
        again = LabelStore(str(tmp_path))
    assert again.latest() == (1, 10)  # v1 and its step stay in force
    assert labels_of(again) == {**FULL_V2, 4: -1}
    # v2's centroids are no longer part of the store's state
    assert_centroids(again.changes_since(None), {5: (CENT_V1[0], 1), 0: (CENT_V1[1], 0)})
    # the store goes on: the next commit takes the lost version's number
    assert again.commit([5], [9], step=30, centroid_ids=[9], centroids=CENT_V2[:1], centroid_videos=[3]) == 2
    reopened = LabelStore(str(tmp_path))
    assert reopened.latest() == (2, 30)
    assert labels_of(reopened) == {**FULL_V2, 4: -1, 5: 9}
    if damage == "truncate":  # the damaged files are kept for inspection under another name
        assert len(list(tmp_path.glob("v00000002.delta.npz.corrupt-*"))) == 1
        assert len(list(tmp_path.glob("v00000002.centroids.npz.corrupt-*"))) == 1


def test_store_actor_comes_back_after_a_kill(ray_local, tmp_path):
    ray = ray_local
    build_store(tmp_path)  # versions written before the actor exists: it starts by recovering them
    name = f"store-test-{uuid.uuid4().hex[:8]}"
    actor = get_or_create_store(name, str(tmp_path))
    try:
        assert ray.get(actor.latest.remote()) == (2, 20)
        version = ray.get(actor.commit.remote([2], [8], step=25, centroid_ids=[8], centroids=CENT_V1[:1],
                                              centroid_videos=[1]))
        assert version == 3
        # every rank asking for the same versions gets the same object: the labels are put once
        mine = ray.get(actor.changes_since.remote(1, rank=0, world_size=2, sharded=True))
        other = ray.get(actor.changes_since.remote(1, rank=1, world_size=2, sharded=True))
        assert mine.shared is not None and other.shared[0].hex() == mine.shared[0].hex()
        assert labels_of(other) == {4: 6, 2: 8}
        ray.kill(actor, no_restart=False)
        # calls made while it restarts are retried (max_task_retries=-1) and see the recovered state
        assert ray.get(actor.latest.remote(), timeout=120) == (3, 25)
        delta = ray.get(actor.changes_since.remote(2))
        assert labels_of(delta) == {2: 8}
        # found by name afterwards: the same (restarted) actor, not a second store
        assert ray.get(get_or_create_store(name, str(tmp_path)).commit.remote(
            [3], [9], step=26, centroid_ids=[], centroids=np.zeros((0, DIM)), centroid_videos=[])) == 4
        assert ray.get(actor.latest.remote()) == (4, 26)
    finally:
        ray.kill(actor, no_restart=True)


def test_a_version_rank_0_chose_stays_servable_after_newer_commits_retire_it(tmp_path):
    """Rank 0 picks the latest version, the pool commits more (retention deletes the picked one from
    storage), then the other ranks ask for it: they must get it (found by the kill/restart pipeline
    test with labeling.keep_versions=1, where a worker crashed on the missing file)."""
    svc = LabelStore(str(tmp_path), snapshot_every=2, keep_versions=1)
    tables = [np.array([0, 0, 1, 1, 2, 2], np.int32)]
    svc.initialise(tables[0])
    rng = np.random.default_rng(3)
    for step in range(1, 5):
        rows = rng.choice(ROWS, size=3, replace=False)
        new = rng.integers(-1, 9, size=3)
        svc.commit(rows, new, step=step, centroid_ids=[step], centroids=np.full((1, DIM), step, np.float32),
                   centroid_videos=[0])
        table = tables[-1].copy()
        table[rows] = new
        tables.append(table)
    assert not Path(svc.table.delta_path(2)).exists()  # retired from storage
    for since, until in [(1, 2), (2, 3), (1, 3), (None, 2), (0, 2)]:
        delta = svc.changes_since(since, until=until)
        held = None if since is None else tables[since].copy()
        assert delta.apply(held).tolist() == tables[until].tolist(), (since, until)


def test_the_version_trainers_hold_outlives_newer_commits_until_a_checkpoint_pins_it(tmp_path):
    """A checkpoint pins its label version when it is written, which may be many commits after the
    trainers switched to it: retention must keep the version trainers hold meanwhile (the fresh-clone
    kill/restart test resumed from a checkpoint whose version had already been deleted)."""
    svc = LabelStore(str(tmp_path), snapshot_every=2, keep_versions=1)
    svc.initialise(PIDS_V0)

    def commit(step):
        return svc.commit([step % ROWS], [10 + step], step=step, centroid_ids=[], centroids=np.zeros((0, DIM)),
                          centroid_videos=[])

    commit(1), commit(2), commit(3)
    held = svc.changes_since(None).version  # the trainers switch to v3
    table = svc.changes_since(None).apply(None)
    for step in range(4, 9):
        commit(step)
    fresh = LabelTable(str(tmp_path))  # storage alone, as a restarted store or a resume reads it
    assert fresh.read(held).tolist() == table.tolist()
    svc.pin(held, keep=2)  # the checkpoint is written now
    svc.changes_since(held)  # the trainers move on to the latest
    for step in range(9, 14):
        commit(step)
    assert fresh.read(held).tolist() == table.tolist()  # pinned
    with pytest.raises(LabelTableError, match="v00000001.delta.npz is missing"):
        fresh.read(1)  # older than every version held or pinned: retired


def test_free_ids_are_the_retired_identities_but_not_the_newest_commits(tmp_path):
    """Random relabels of 60 rows against a reference written from the definition: ids below
    ``num_identities`` no row holds, minus those the newest commit took off rows; none right
    after initialise or after a restart until this process commits."""
    rng = np.random.default_rng(3)
    table = np.repeat(np.arange(20), 3).astype(np.int32)  # ids 0..19, 3 rows each
    svc = LabelStore(str(tmp_path))
    svc.initialise(table)
    assert svc.free_ids().tolist() == []
    num_ids = 20
    for commit in range(12):
        if commit == 6:  # a restart: the newest commit's retirements are unknown, so nothing is reused
            svc = LabelStore(str(tmp_path))
            assert svc.free_ids().tolist() == []
        rows = rng.choice(len(table), size=9, replace=False)
        pids = rng.choice(np.r_[np.unique(table), num_ids, num_ids + 1], size=len(rows)).astype(np.int32)
        retired_now = set(table[rows].tolist())
        table[rows] = pids
        num_ids = max(num_ids, int(pids.max()) + 1)
        svc.commit(rows, pids, step=commit, centroid_ids=np.unique(pids), centroids=np.zeros((len(np.unique(pids)), 2)),
                   centroid_videos=np.zeros(len(np.unique(pids))))
        want = sorted(set(range(num_ids)) - set(table.tolist()) - retired_now)
        assert svc.free_ids().tolist() == want
    assert svc.free_ids().tolist(), "this sequence retires identities: the check above compared something"


def test_a_trainer_lagging_within_the_retention_window_catches_up_without_reading_storage(tmp_path, monkeypatch):
    """A trainer 9 versions behind (keep_versions 8: its version's centroid files were merged into the
    base meanwhile) gets the rows changed since and the centroids published since from the store's
    memory, without reading any file (reading the base made that switch cost seconds at 1M
    identities), and exactly what a store reading everything from storage answers."""
    import dynamix_core.labeling.label_table as lt

    svc = LabelStore(str(tmp_path), snapshot_every=4, keep_versions=8)
    svc.initialise(np.arange(40, dtype=np.int32) % 7)
    rng = np.random.default_rng(5)
    for step in range(1, 15):
        rows = rng.choice(40, size=6, replace=False)
        ids = rng.choice(60, size=3, replace=False)
        svc.commit(rows, rng.integers(0, 60, size=6), step=step, centroid_ids=ids,
                   centroids=rng.normal(size=(3, DIM)).astype(np.float32), centroid_videos=ids % 5)
    latest = svc.version
    assert svc.table.base_version() > latest - 9  # the lagging trainer's publications were merged
    reference = LabelStore(str(tmp_path), snapshot_every=4, keep_versions=8)  # everything from storage
    expected = reference.changes_since(latest - 9)

    def no_reads(*args, **kwargs):
        raise AssertionError("the lagging trainer's switch read storage")

    monkeypatch.setattr(lt.storage, "read_bytes", no_reads)
    got = svc.changes_since(latest - 9)
    assert not got.full and labels_of(got) == labels_of(expected)
    assert_centroids(got, centroid_rows(expected))


def test_the_version_of_a_training_step_is_found_before_and_after_a_restart(tmp_path):
    """Step-locked labels wait for the version committed for a publish step: the newest one of that
    step, none before its commit, the same from a store recovered from the folder."""
    from services.label_store import LabelStore

    store = LabelStore(str(tmp_path))
    store.initialise(np.zeros(10, np.int32))
    assert store.version_for_step(4) is None
    for rows, pids, step in (([1], [2], 4), ([2], [3], 8), ([3], [4], 8)):
        store.commit(rows, pids, step=step, centroid_ids=[], centroids=np.zeros((0, 3)), centroid_videos=[])
    assert (store.version_for_step(4), store.version_for_step(8), store.version_for_step(0)) == (1, 3, None)
    again = LabelStore(str(tmp_path))
    assert (again.version_for_step(4), again.version_for_step(8)) == (1, 3)
