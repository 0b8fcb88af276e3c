"""Versioned label tables: atomic versions, audit history, recovery, corrupt and missing files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynamix_core.labeling import LabelStore, LabelStoreError, LabelTable

KEYS = [f"synth_video_{i:03d}" for i in range(6)]


def store_with_two_versions(tmp_path):
    store = LabelStore(tmp_path / "labels")
    v0 = LabelTable.initial(KEYS, [0, 0, 1, 1, 2, 2])
    store.write(v0, parent=None, step=0)
    v1 = v0.updated(["synth_video_001", "synth_video_004"], [7, 2])
    store.write(v1, parent=0, step=120, videos_relabeled=[3], num_splits=1, num_merges=0)
    return store, v0, v1


def test_versions_round_trip_with_the_documented_columns(tmp_path):
    store, v0, v1 = store_with_two_versions(tmp_path)
    raw = pq.read_table(store.path_of(1))
    assert raw.column_names == ["key", "pid", "version"]
    assert str(raw.schema.field("pid").type) == "int64" and str(raw.schema.field("version").type) == "int64"
    # Row 1 changed in version 1; row 4 got the same pid again, so it keeps version 0.
    assert raw["version"].to_pylist() == [0, 1, 0, 0, 0, 0]
    table = store.read()
    assert table.version == 1 and table.pids.tolist() == [0, 7, 1, 1, 2, 2]
    assert table.lookup(["synth_video_001", "synth_video_005"]).tolist() == [7, 2]
    assert store.read(0).pids.tolist() == [0, 0, 1, 1, 2, 2]
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]  # temp files renamed away
    with pytest.raises(LabelStoreError, match="immutable"):
        store.write(v1, parent=0, step=1)


def test_history_records_each_version(tmp_path):
    store, _, _ = store_with_two_versions(tmp_path)
    hist = store.history()
    assert [h["version"] for h in hist] == [0, 1]
    assert hist[1]["parent"] == 0 and hist[1]["step"] == 120 and hist[1]["videos_relabeled"] == [3]
    assert hist[1]["num_splits"] == 1 and hist[1]["num_merges"] == 0 and hist[1]["num_changed"] == 1
    # A crash between the snapshot and the log line: the record embedded in the snapshot fills the gap.
    lines = (store.root / "history.jsonl").read_text().splitlines()
    (store.root / "history.jsonl").write_text(lines[0] + "\n")
    assert [h["version"] for h in store.history()] == [0, 1] and store.history()[1]["step"] == 120


def test_latest_version_recovers_by_scanning_without_the_log(tmp_path):
    store, _, _ = store_with_two_versions(tmp_path)
    (store.root / "history.jsonl").unlink()
    assert LabelStore(store.root).latest_version() == 1


def test_corrupt_latest_version_is_reported_and_the_previous_stays_in_force(tmp_path):
    store, _, _ = store_with_two_versions(tmp_path)
    store.path_of(1).write_bytes(b"PAR1 truncated garbage")
    with pytest.warns(UserWarning, match=r"v00000001\.parquet"):
        assert store.latest_version() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.read().version == 0
    with pytest.raises(LabelStoreError, match=r"v00000001\.parquet"):
        store.read(1)


def test_missing_logged_version_is_reported(tmp_path):
    store, _, _ = store_with_two_versions(tmp_path)
    store.path_of(1).unlink()
    with pytest.warns(UserWarning, match=r"v00000001\.parquet is missing"):
        assert store.latest_version() == 0
    with pytest.raises(LabelStoreError, match="missing"):
        store.read(1)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store, _, v1 = store_with_two_versions(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write(v1.updated(["synth_video_000"], [9]), parent=1, step=200)
    assert sorted(p.name for p in store.root.iterdir()) == ["history.jsonl", "v00000000.parquet", "v00000001.parquet"]
    assert store.latest_version() == 1
    assert [json.loads(x)["version"] for x in (store.root / "history.jsonl").read_text().splitlines()] == [0, 1]


def test_keys_must_be_unique_and_known(tmp_path):
    with pytest.raises(ValueError, match="duplicate keys"):
        LabelTable.initial(["a", "b", "a"], [0, 1, 2])
    table = LabelTable.initial(["a", "b"], [0, 1])
    with pytest.raises(KeyError):
        table.updated(["c"], [3])
    with pytest.raises(KeyError):
        table.lookup(["zz"])
    # A file with duplicate keys written by someone else is rejected on read, naming the file.
    store = LabelStore(tmp_path / "labels")
    import pyarrow as pa

    pq.write_table(pa.table({"key": ["a", "a"], "pid": pa.array([0, 1], pa.int64()),
                             "version": pa.array([0, 0], pa.int64())}), store.path_of(0))
    with pytest.raises(LabelStoreError, match=r"v00000000\.parquet.*duplicate"):
        store.read(0)
    assert np.asarray(table.pids).dtype == np.int64
