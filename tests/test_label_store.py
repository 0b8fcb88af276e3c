"""The label store service (services/label_store.py): version semantics of ``changes_since`` against
hand-computed deltas, recovery from its folder (clean, corrupt newest file, missing newest file),
and the named Ray actor coming back from a kill with its latest version."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from dynamix_core.labeling.label_table import LabelStoreError
from services.label_store import LabelStoreService, get_or_create_store

KEYS = ["k0", "k1", "k2", "k3", "k4", "k5"]
PIDS_V0 = np.array([0, 0, 1, 1, -1, 2])
DIM = 4
RNG = np.random.default_rng(0)
#: centroid rows published by v1 (ids 5, 0) and v2 (ids 6, 5: id 5 is published again)
CENT_V1 = RNG.normal(size=(2, DIM)).astype(np.float32)
CENT_V2 = RNG.normal(size=(2, DIM)).astype(np.float32)


def build_store(root) -> LabelStoreService:
    """v0 = PIDS_V0; v1 (step 10): k0 -> 5, k1 -> 0 (unchanged); v2 (step 20): k4 -> 6."""
    svc = LabelStoreService(str(root))
    assert svc.initialise(KEYS, PIDS_V0) == 0
    assert svc.commit(["k0", "k1"], [5, 0], step=10, centroid_ids=[5, 0], centroids=CENT_V1,
                      centroid_videos=[1, 0], videos=[0, 1], num_splits=1) == 1
    assert svc.commit(["k4"], [6], step=20, centroid_ids=[6, 5], centroids=CENT_V2,
                      centroid_videos=[2, 1], videos=[2]) == 2
    return svc


def as_dict(keys, values) -> dict:
    return dict(zip(np.asarray(keys).tolist(), np.asarray(values).tolist()))


def labels_of(delta_or_service) -> dict:
    """key -> pid of a delta, or of the table a service holds."""
    obj = getattr(delta_or_service, "table", None) or delta_or_service
    return as_dict(obj.keys, obj.pids)


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
FULL_V2 = {"k0": 5, "k1": 0, "k2": 1, "k3": 1, "k4": 6, "k5": 2}


def test_delta_holds_only_changed_keys_and_newer_centroids(tmp_path):
    svc = build_store(tmp_path)
    assert svc.latest() == (2, 20)

    since0 = svc.changes_since(0)
    assert not since0.full and (since0.version, since0.step) == (2, 20)
    assert labels_of(since0) == {"k0": 5, "k4": 6}  # k1 was re-set to its old pid: no change
    assert_centroids(since0, ALL_CENTROIDS)

    since1 = svc.changes_since(1)
    assert labels_of(since1) == {"k4": 6}
    assert_centroids(since1, {5: (CENT_V2[1], 1), 6: (CENT_V2[0], 2)})  # only what v2 published

    current = svc.changes_since(2)
    assert not current.full and len(current.keys) == 0 and len(current.centroid_ids) == 0


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
    with pytest.raises(LabelStoreError, match="commit before initialise"):
        LabelStoreService(str(tmp_path / "empty")).commit(["k0"], [1], step=1, centroid_ids=[],
                                                          centroids=np.zeros((0, DIM)), centroid_videos=[])
    svc = build_store(tmp_path)
    assert svc.initialise(KEYS, np.full(len(KEYS), -1)) == 2
    assert labels_of(svc) == FULL_V2


def test_a_new_service_recovers_latest_version_and_step(tmp_path):
    build_store(tmp_path)
    again = LabelStoreService(str(tmp_path))
    assert again.latest() == (2, 20)
    assert labels_of(again) == FULL_V2
    assert labels_of(again.changes_since(0)) == {"k0": 5, "k4": 6}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_newest_version_falls_back_and_commits_continue(tmp_path, damage):
    svc = build_store(tmp_path)
    newest = svc.store.path_of(2)
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:20])
    else:
        newest.unlink()
    with pytest.warns(UserWarning, match="label version 2.*falling back"):
        again = LabelStoreService(str(tmp_path))
    assert again.latest() == (1, 10)  # v1 and its step stay in force
    assert labels_of(again) == {**FULL_V2, "k4": -1}
    # v2's centroids are no longer part of the store's state
    assert_centroids(again.changes_since(None), {5: (CENT_V1[0], 1), 0: (CENT_V1[1], 0)})
    # the store goes on: the next commit takes the lost version's number
    assert again.commit(["k5"], [9], step=30, centroid_ids=[9], centroids=CENT_V2[:1], centroid_videos=[3]) == 2
    reopened = LabelStoreService(str(tmp_path))
    assert reopened.latest() == (2, 30)
    assert labels_of(reopened) == {**FULL_V2, "k4": -1, "k5": 9}
    if damage == "truncate":  # the damaged file is kept for inspection under another name
        assert len(list(tmp_path.glob("v00000002.parquet.corrupt-*"))) == 1


def test_store_actor_comes_back_after_a_kill(ray_local, tmp_path):
    ray = ray_local
    build_store(tmp_path)  # versions written before the actor exists: it starts by recovering them
    name = f"store-test-{uuid.uuid4().hex[:8]}"
    actor = get_or_create_store(name, str(tmp_path))
    try:
        assert ray.get(actor.latest.remote()) == (2, 20)
        version = ray.get(actor.commit.remote(["k2"], [8], step=25, centroid_ids=[8], centroids=CENT_V1[:1],
                                              centroid_videos=[1]))
        assert version == 3
        ray.kill(actor, no_restart=False)
        # calls made while it restarts are retried (max_task_retries=-1) and see the recovered state
        assert ray.get(actor.latest.remote(), timeout=120) == (3, 25)
        delta = ray.get(actor.changes_since.remote(2))
        assert labels_of(delta) == {"k2": 8}
        # found by name afterwards: the same (restarted) actor, not a second store
        assert ray.get(get_or_create_store(name, str(tmp_path)).commit.remote(
            ["k3"], [9], step=26, centroid_ids=[], centroids=np.zeros((0, DIM)), centroid_videos=[])) == 4
        assert ray.get(actor.latest.remote()) == (4, 26)
    finally:
        ray.kill(actor, no_restart=True)
