"""Ingest planning on columns, in memory bounded by identities and videos rather than images: the
columnar sample table, the LMDB parsers that build it batch by batch, and the shard planner, each against a reference written here from the
definition with one Python object per image (the form the planner used to hold)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from dynamix_core.data.parsers import luperson, parse_source, parse_source_table
from dynamix_core.data.records import IdentityMaps, ImageRef, InputReport, RawSample, make_key
from dynamix_core.data.sample_table import fill_null, identity_maps, samples_to_table, table_to_samples
from pipelines.ingest import PLAN_NAME, plan_shards, read_previous_plan, write_plan

BLOCK = 512  # tar block size (POSIX)


def make_samples(root: Path, seed: int = 0) -> list[RawSample]:
    """Single-camera videos whose images interleave in key order, and multi-camera images (some
    unlabeled), as real files of varied sizes; one listed file is missing. Sorted by key."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for frame in range(9):
        for video in ("v3", "v1", "v2"):
            if video == "v2" and frame > 4:
                continue
            key = make_key("lup", "train", f"{frame:04d}_{video}")
            samples.append(RawSample("lup", "train", f"{video}_{frame % 2}", video, ImageRef(str(root / f"{key}.jpg")),
                                     key, "single", video, str(frame % 2), frame))
    for i in range(14):
        key = make_key("mkt", "train", f"{i:04d}_x")
        samples.append(RawSample("mkt", "train", None if i % 5 == 0 else f"{i % 4:04d}", f"c{i % 3}",
                                 ImageRef(str(root / f"{key}.png"), ext="png"), key))
    for s in samples:
        Path(s.image.container).write_bytes(b"\0" * int(rng.integers(100, 3000)))
    samples.sort(key=lambda s: s.key)
    os.remove(samples[7].image.container)  # listed, but gone
    return samples


def reference_plan(samples: list[RawSample], maps: IdentityMaps, *, max_bytes: int, max_count: int,
                   shard_of: dict[str, int] | None = None, num_earlier: int = 0) -> list[tuple[int, list]]:
    """The shard plans by their definition (plan_shards' docstring), one Python object per image."""
    units: dict[tuple, list] = {}
    for s in samples:
        if not os.path.exists(s.image.container):
            continue
        size = os.path.getsize(s.image.container)
        unit = ("video", s.dataset, s.source_video) if s.source_video is not None else ("image", s.key)
        units.setdefault(unit, []).append((maps.record(s), s.image, size))

    def pack(unit_list: list[list], first: int) -> list[tuple[int, list]]:
        shards, current, current_bytes = [], [], 0
        for members in unit_list:
            unit_bytes = sum(3 * BLOCK + math.ceil(n / BLOCK) * BLOCK for _, _, n in members)
            if current and (len(current) + len(members) > max_count or current_bytes + unit_bytes > max_bytes):
                shards.append(current)
                current, current_bytes = [], 0
            current = current + members
            current_bytes += unit_bytes
        if current:
            shards.append(current)
        return [(first + i, shard) for i, shard in enumerate(shards)]

    if shard_of is not None:
        kept: dict[int, list] = {}
        new = []
        for members in units.values():
            earlier = {shard_of[r.key] for r, _, _ in members if r.key in shard_of}
            if len(earlier) == 1:
                kept.setdefault(earlier.pop(), []).extend(members)
            else:
                new.append(members)
        if sorted(kept) == list(range(num_earlier)):
            return [(i, kept[i]) for i in range(num_earlier)] + pack(new, num_earlier)
    return pack(list(units.values()), 0)


def planned(plans) -> list[tuple[int, list]]:
    return [(p.index, list(p.samples())) for p in plans]


def same_maps(a: IdentityMaps, b: IdentityMaps) -> bool:
    return all(getattr(a, m).pairs == getattr(b, m).pairs and getattr(a, m)._index == getattr(b, m)._index
               for m in ("pid", "camid", "video", "tracklet")) and a.tracklet_local == b.tracklet_local


def test_the_sample_table_round_trips_and_gives_the_same_identity_maps(tmp_path):
    samples = make_samples(tmp_path)
    table = samples_to_table(samples, batch=5)  # several batches: their dictionaries are unified
    assert table_to_samples(table) == samples
    assert same_maps(identity_maps(table), IdentityMaps.build(samples))


def test_filling_nulls_keeps_one_shared_dictionary():
    """The values equal pyarrow's own fill_null; the chunks still share one dictionary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dictionary = pa.array(["a", "b", "c"])
    chunks = [pa.DictionaryArray.from_arrays(pa.array([0, None, 2], pa.int32()), dictionary),
              pa.DictionaryArray.from_arrays(pa.array([None, 1, 1], pa.int32()), dictionary)]
    column = pa.chunked_array(chunks)
    filled = fill_null(column, "")
    assert filled.to_pylist() == pc.fill_null(column, "").to_pylist() == ["a", "", "c", "", "b", "b"]
    assert filled.type == column.type and all(c.dictionary.equals(filled.chunk(0).dictionary) for c in filled.chunks)


@pytest.mark.parametrize("limits", [{"max_count": 5, "max_bytes": 10**9}, {"max_count": 10**6, "max_bytes": 12_000}])
def test_columnar_plans_equal_the_plans_of_the_definition(tmp_path, limits):
    """Whole videos in the order of their first image, single images, missing files rejected,
    shards closed by count or by estimated bytes: the same plans, image by image, as the reference."""
    samples = make_samples(tmp_path / "src")
    report = InputReport()
    plans = plan_shards(samples_to_table(samples), identity_maps(samples_to_table(samples)), report, **limits)
    expected = reference_plan(samples, IdentityMaps.build(samples), **limits)
    assert len(expected) > 3 and planned(plans) == expected
    assert [p.path for p in report.problems] == [samples[7].image.container]
    assert report.problems[0].reason.startswith("missing file:")


@pytest.mark.parametrize("change", ["grown", "an earlier shard emptied"])
def test_a_replan_keeps_earlier_shards_as_the_definition_says(tmp_path, change):
    """With the folder's earlier plan: units whose earlier images lay in one shard stay there, the
    rest fill new shards; an earlier shard left empty means a fresh plan. Ids of the earlier plan
    are kept (the fixed maps equal those read from plan.parquet here)."""
    limits = {"max_count": 6, "max_bytes": 10**9}
    samples = make_samples(tmp_path / "src")
    earlier_samples = [s for s in samples if s.frame < 6 and not s.key.endswith(("0003_x", "0011_x"))]
    earlier = plan_shards(samples_to_table(earlier_samples), identity_maps(samples_to_table(earlier_samples)),
                          InputReport(), **limits)
    write_plan(earlier, tmp_path / PLAN_NAME, None, **limits)
    rows = pq.read_table(tmp_path / PLAN_NAME).to_pylist()
    shard_of = {r["key"]: r["shard"] for r in rows}
    if change == "an earlier shard emptied":
        gone = {r["key"] for r in rows if r["shard"] == 1}
        samples = [s for s in samples if s.key not in gone]

    previous = read_previous_plan(tmp_path, **limits)
    table = samples_to_table(samples)
    fixed = previous.fixed_maps(table)
    video_of = {r["key"]: r["video_id"] for r in rows if r["video_id"] != -1}
    assert fixed["video"] == {(s.dataset, s.source_video): video_of[s.key] for s in samples if s.key in video_of}
    assert fixed["pid"] == {(r["dataset"], r["source_pid"]): r["pid"] for r in rows if r["pid"] != -1}
    assert fixed["camid"] == {(r["dataset"], r["source_camid"]): r["camid"] for r in rows}
    maps = identity_maps(table, fixed)
    assert same_maps(maps, IdentityMaps.build(samples, fixed))

    plans = plan_shards(table, maps, InputReport(), **limits, previous=previous)
    expected = reference_plan(samples, maps, **limits, shard_of=shard_of, num_earlier=len(earlier))
    assert planned(plans) == expected
    stayed = all(shard_of[r.key] == index for index, members in expected for r, _, _ in members if r.key in shard_of)
    assert stayed == (change == "grown")  # both branches of the definition are exercised


def write_nl_store(root: Path, keys: list, pids: list, missing: set[str], protocol: int = 4) -> None:
    (root / "lmdb").mkdir(parents=True)
    with lmdb.open(str(root / "lmdb"), map_size=2**24) as env, env.begin(write=True) as txn:
        for key in keys:
            if isinstance(key, str) and key not in missing:
                txn.put(key.encode(), b"\xff\xd8" + key.encode() + b"\xff\xd9")
    (root / "keys.pkl").write_bytes(pickle.dumps({"keys": keys, "pids": pids}, protocol=protocol))


@pytest.mark.parametrize("protocol, last_pid", [(4, "int"), (0, "int"), (4, "None")])
def test_lmdb_parsers_read_in_batches_as_in_one(tmp_path, monkeypatch, protocol, last_pid):
    """A LUPerson-NL store parsed 4 keys at a time (malformed keys, missing entries and a pid
    mismatch on both sides of the batch edges) gives the samples and problems of the definition:
    video, tracklet and frame read from each key by hand here. Protocol 4 is streamed; protocol 0,
    and a None pid at the very end (found after every key was checked), are unpickled whole, and
    the problems the stream had reported are not reported twice."""
    from dynamix_core.data.lmdb_io import close_lmdb_handles

    keys, pids = [], []
    for i in range(23):
        video, tracklet = 10 + i % 3, i % 2
        keys.append(f"{video:05d}_{tracklet:06d}_{i:07d}_00")
        pids.append(100 * video + tracklet)
    keys[5], keys[12] = "not-a-key", 42
    pids[17] += 1  # tracklet of key 17 labelled differently from its first image
    pids[22] = None if last_pid == "None" else pids[22]
    missing = {keys[3], keys[9]}
    write_nl_store(tmp_path / "nl", keys, pids, missing, protocol)

    monkeypatch.setattr(luperson, "BATCH", 4)
    if protocol == 4 and last_pid == "int":  # streamed: the whole-file unpickling is never needed

        def unpickle_whole(path):
            raise AssertionError(f"{path} was unpickled whole")

        monkeypatch.setattr(luperson, "load_keys_pickle", unpickle_whole)
    report = InputReport()
    samples = parse_source("luperson_nl", tmp_path / "nl", report, dataset="nl")
    close_lmdb_handles()

    expected = []
    for i, key in enumerate(keys):
        if i in (5, 12, 17) or key in missing or pids[i] is None:
            continue
        video, tracklet, frame, _ = key.split("_")
        expected.append(RawSample("nl", "train", f"{video}_{tracklet}", video,
                                  ImageRef(str(tmp_path / "nl" / "lmdb"), member=key), make_key("nl", "train", key),
                                  "single", video, tracklet, int(frame)))
    assert samples == sorted(expected, key=lambda s: s.key)
    reasons = sorted(p.reason.split(":")[0] for p in report.problems)
    assert reasons == sorted(["label mismatch", "malformed key", "malformed key", "missing file", "missing file"]
                             + ["bad pid"] * (last_pid == "None"))

    monkeypatch.setattr(luperson, "BATCH", 1 << 16)
    one_batch = InputReport()
    table = parse_source_table("luperson_nl", tmp_path / "nl", one_batch, dataset="nl")
    assert table_to_samples(table) == samples
    assert sorted((p.path, p.reason) for p in one_batch.problems) == sorted((p.path, p.reason) for p in report.problems)
