"""Row-addressed label versions (dynamix_core/labeling/label_table.py) against a reference that keeps
every version whole in memory: reads of every retained version, deltas, centroids published
between two versions, retention with pins, the cost of a version on disk, the audit history, and
recovery from crashes, corrupt and missing files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import dynamix_core.labeling.label_table as lt
from dynamix_core.labeling import LabelTable, LabelTableError

DIM = 3


class Reference:
    """Every version's whole table and every publication, kept in memory (the naive model)."""

    def __init__(self, pids):
        self.tables = [np.asarray(pids, np.int32).copy()]
        self.published: list[tuple[int, int, np.ndarray, int]] = []  # (version, id, row, video)

    def commit(self, rows, pids, ids, cents, videos):
        table = self.tables[-1].copy()
        table[rows] = pids
        self.tables.append(table)
        v = len(self.tables) - 1
        self.published += [(v, int(i), c, int(vid)) for i, c, vid in zip(ids, cents, videos)]
        return v

    def centroids(self, since, until):
        newest = {}
        for v, i, c, vid in self.published:  # in version order: later ones win
            if v <= until:
                newest[i] = (v, c, vid)
        lo = -1 if since is None else since
        return {i: (c, vid) for i, (v, c, vid) in newest.items() if v > lo}


def commit_both(store, ref, rng, n_rows, version):
    rows = rng.choice(n_rows, size=rng.integers(1, 6), replace=False)
    pids = rng.integers(-1, 40, size=len(rows))
    ids = rng.choice(40, size=rng.integers(0, 4), replace=False)
    cents = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    videos = rng.integers(0, 9, size=len(ids))
    v = ref.commit(rows, pids, ids, cents, videos)
    assert v == version
    store.write(version, rows=rows[ref.tables[-2][rows] != pids], pids_after=ref.tables[-1], parent=version - 1,
                step=10 * version, centroids=(ids, cents, videos))
    store.collect(version)


def assert_centroids(got, expected):
    ids, rows, videos = got
    assert sorted(ids.tolist()) == sorted(expected)
    for i, row, vid in zip(ids.tolist(), rows, videos.tolist()):
        np.testing.assert_array_equal(row, expected[i][0])
        assert vid == expected[i][1]


@pytest.fixture
def root(label_root):
    return label_root


def test_every_retained_version_reads_as_the_reference_and_older_ones_are_gone(root):
    rng = np.random.default_rng(0)
    n = 50
    store = LabelTable(root, snapshot_every=4, keep_versions=3)
    ref = Reference(rng.integers(-1, 20, size=n))
    store.write(0, rows=np.zeros(0, np.int64), pids_after=ref.tables[0], parent=None, step=0)
    store.pin(5, keep=2)  # a checkpoint of version 5 (pinned before it exists, as a worker may)
    for version in range(1, 19):
        commit_both(store, ref, rng, n, version)
        retained = {0, 5} | set(range(max(0, version - 2), version + 1))
        for v in range(version + 1):
            if v in retained and v <= version:
                np.testing.assert_array_equal(store.read(v), ref.tables[v], err_msg=f"v{v} at {version}")
                assert store.read(v).dtype == np.int32
        for since in sorted(retained - {0}):  # a holder of a retained version moves forward by deltas
            if since <= version:
                assert store.can_move(since, version)
                changed = store.changed_rows(since, version)
                differs = np.flatnonzero(ref.tables[since] != ref.tables[version])
                assert set(differs) <= set(changed.tolist())
                for until in range(since, version + 1):
                    assert_centroids(store.centroids_between(since, until), ref.centroids(since, until))
        assert_centroids(store.centroids_between(None, version), ref.centroids(None, version))
    # versions before the oldest retained one (the pin, 5) were deleted: asking names what is missing;
    # everything after it stays (a holder of version 5 moves forward by deltas)
    with pytest.raises(LabelTableError, match=r"v00000003\.delta\.npz is missing"):
        store.read(3)
    np.testing.assert_array_equal(store.read(10), ref.tables[10])
    # a newer pin releases the oldest: version 5 goes at the next collect
    store.pin(17, keep=1)
    commit_both(store, ref, rng, n, 19)
    with pytest.raises(LabelTableError):
        store.read(5)
    np.testing.assert_array_equal(store.read(17), ref.tables[17])
    np.testing.assert_array_equal(store.read(0), ref.tables[0])  # the initial labels always stay


def test_a_version_costs_its_changed_rows_not_the_table(tmp_path):
    n = 200_000
    store = LabelTable(tmp_path, snapshot_every=1000, keep_versions=2)
    pids = np.arange(n, dtype=np.int32) // 20
    store.write(0, rows=np.zeros(0, np.int64), pids_after=pids, parent=None, step=0)
    before = store.disk_bytes()
    rows = np.arange(1000, 1100)
    pids[rows] = -1
    store.write(1, rows=rows, pids_after=pids, parent=0, step=1)
    added = store.disk_bytes() - before
    # 100 changed rows: int64 row + int32 pid each, plus the npz framing, the audit line: << 4 * n
    assert added < 100 * 12 + 4000, added
    rows_d, pids_d = store.read_delta(1)
    np.testing.assert_array_equal(rows_d, rows)
    assert (pids_d == -1).all()


def test_history_records_each_version_and_survives_a_lost_log_line(root):
    from dynamix_core import storage

    store = LabelTable(root)
    store.write(0, rows=[], pids_after=[0, 0, 1, 1], parent=None, step=0)
    store.write(1, rows=[1], pids_after=[0, 7, 1, 1], parent=0, step=120,
                record={"videos_relabeled": [3], "num_splits": 1, "num_merges": 0})
    hist = store.history()
    assert [h["version"] for h in hist] == [0, 1]
    assert hist[1]["parent"] == 0 and hist[1]["step"] == 120 and hist[1]["videos_relabeled"] == [3]
    assert hist[1]["num_changed"] == 1 and hist[1]["num_rows"] == 4
    # a crash between the commit and its log line: the record carried by the delta fills the gap
    log = store.path("history.jsonl")
    lines = storage.read_bytes(log).decode().splitlines()
    storage.write_bytes_atomic(log, lines[0] + "\n")
    assert [h["version"] for h in store.history()] == [0, 1] and store.history()[1]["step"] == 120
    storage.delete(log)
    assert LabelTable(root).latest_version() == 1  # versions are found by scanning the folder
    with pytest.raises(LabelTableError, match="immutable"):
        store.write(1, rows=[], pids_after=[0, 7, 1, 1], parent=0, step=1)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_newest_version_is_reported_and_the_previous_stays_in_force(tmp_path, damage):
    store = LabelTable(tmp_path)
    store.write(0, rows=[], pids_after=[0, 0, 1], parent=None, step=0)
    store.write(1, rows=[2], pids_after=[0, 0, 5], parent=0, step=1)
    path = Path(store.delta_path(1))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:30])
        with pytest.warns(UserWarning, match=r"v00000001\.delta\.npz.*falling back"):
            assert store.latest_version() == 0
        with pytest.raises(LabelTableError, match=r"cannot read .*v00000001\.delta\.npz"):
            store.read(1)
    else:
        path.unlink()
        assert store.latest_version() == 0  # no longer a version at all
        with pytest.raises(LabelTableError, match=r"v00000001\.delta\.npz is missing"):
            store.read(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.read().tolist() == [0, 0, 1]


def test_a_crash_before_the_commit_point_leaves_no_version_and_the_next_commit_takes_its_number(tmp_path, monkeypatch):
    store = LabelTable(tmp_path, snapshot_every=2)
    store.write(0, rows=[], pids_after=[0, 0, 1, 1], parent=None, step=0)
    store.write(1, rows=[0], pids_after=[3, 0, 1, 1], parent=0, step=1)
    real = lt._atomic_bytes

    def fail_on_delta(path, data):
        if str(path).endswith(".delta.npz"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(lt, "_atomic_bytes", fail_on_delta)
    with pytest.raises(OSError, match="disk full"):  # version 2: centroids and snapshot land, its delta does not
        store.write(2, rows=[1], pids_after=[3, 4, 1, 1], parent=1, step=2,
                    centroids=([9], np.ones((1, DIM), np.float32), [0]))
    monkeypatch.setattr(lt, "_atomic_bytes", real)
    assert store.latest_version() == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert [h["version"] for h in store.history()] == [0, 1]
    store.write(2, rows=[2], pids_after=[3, 0, 8, 1], parent=1, step=3, centroids=([4], np.zeros((1, DIM)), [1]))
    assert store.read(2).tolist() == [3, 0, 8, 1]  # the new version 2, not the lost one
    assert_centroids(store.centroids_between(1, 2), {4: (np.zeros(DIM, np.float32), 1)})
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_merge_newest_keeps_the_highest_version_of_each_identity():
    ids, rows, videos, versions = lt.merge_newest([5, 1, 5, 1], np.arange(8).reshape(4, 2), [0, 1, 2, 3],
                                                  [2, 1, 3, 1])
    assert ids.tolist() == [1, 5] and versions.tolist() == [1, 3]
    assert rows.tolist() == [[6, 7], [4, 5]] and videos.tolist() == [3, 2]  # tie at v1: the later row wins


def test_listing_survives_a_file_that_another_process_renames_away(tmp_path, monkeypatch):
    """The label folder is shared: the labelling coordinator writes its state file there atomically
    (a temporary file, then a rename) while the store lists the folder. A name seen by the scan and
    gone before its size is read is not part of the folder; the listing must not fail on it."""
    table = LabelTable(tmp_path, snapshot_every=2, keep_versions=2)
    table.write(0, rows=np.zeros(0, np.int64), pids_after=np.arange(4, dtype=np.int32), parent=None, step=0)
    tmp_state = tmp_path / ".coordinator_state.json.tmp-1"
    tmp_state.write_text("{}")
    real_scandir = lt.storage.os.scandir

    def scandir_then_rename(folder):  # the rename lands between the scan and the stat
        entries = list(real_scandir(folder))
        if tmp_state.exists():
            tmp_state.replace(tmp_path / "coordinator_state.json")
        return iter(entries)

    monkeypatch.setattr(lt.storage.os, "scandir", scandir_then_rename)
    assert table.latest_version() == 0
    assert ".coordinator_state.json.tmp-1" not in table.listing()
