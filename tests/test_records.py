"""Records and identity maps (SPEC 1.1): dot-free keys, maps from sorted source ids."""

import pytest

from dynamix_core.data.records import BadInputError, IdentityMaps, ImageRef, InputReport, RawSample, make_key


def _s(ds, pid, cam, key, video=None, trk=None, split="train"):
    return RawSample(dataset=ds, split=split, source_pid=pid, source_camid=cam, image=ImageRef("x"), key=key,
                     source_video=video, source_tracklet=trk, domain="single" if video else "multi")


def test_make_key_has_no_dots():
    assert make_key("market1501", "train", "0002_c1s1_000451_03.jpg") == "market1501_train_0002_c1s1_000451_03-2ejpg"
    assert "." not in make_key("a.b", "c/d", 3)


def test_maps_are_sorted_and_order_independent():
    samples = [_s("msmt17", "train:7", "3", "k1"), _s("market1501", "0002", "1", "k2"),
               _s("market1501", "0001", "2", "k3"), _s("msmt17", "test:7", "3", "k4")]
    m1, m2 = IdentityMaps.build(samples), IdentityMaps.build(reversed(samples))
    expected = [("market1501", "0001"), ("market1501", "0002"), ("msmt17", "test:7"), ("msmt17", "train:7")]
    assert m1.pid.pairs == m2.pid.pairs == expected
    recs = {s.key: m1.record(s) for s in samples}
    assert [recs[k].pid for k in ("k3", "k2", "k4", "k1")] == [0, 1, 2, 3]
    assert recs["k1"].camid == recs["k4"].camid != recs["k2"].camid


def test_video_and_video_local_tracklet_ids():
    samples = [_s("lupnl", "v2_t9", "v2", "a", "v2", "t9"), _s("lupnl", "v2_t3", "v2", "b", "v2", "t3"),
               _s("lupnl", "v1_t5", "v1", "c", "v1", "t5")]
    maps = IdentityMaps.build(samples)
    r = {s.key: maps.record(s) for s in samples}
    assert (r["c"].video_id, r["a"].video_id, r["b"].video_id) == (0, 1, 1)
    assert (r["b"].tracklet_id, r["a"].tracklet_id, r["c"].tracklet_id) == (0, 1, 0)


def test_unlabeled_gets_minus_one():
    maps = IdentityMaps.build([_s("lup", None, "v1", "a", "v1")])
    assert maps.record(_s("lup", None, "v1", "a", "v1")).pid == -1


def test_report_counts_and_strict():
    rep = InputReport()
    rep.reject("/a/x.jpg", "malformed name: no camera field")
    rep.reject("/a/y.jpg", "malformed name: pid")
    rep.reject("/a/z.jpg", "missing file")
    assert rep.counts() == {"malformed name": 2, "missing file": 1}
    assert "/a/x.jpg" in rep.summary()
    with pytest.raises(BadInputError, match="/a/q.jpg: missing file"):
        InputReport(strict=True).reject("/a/q.jpg", "missing file")
