"""Dataset parsers (SPEC 1.2) on fabricated trees that follow the real naming rules.

Every expected value below is written out by hand from the file names in the fixture."""

from __future__ import annotations

import csv
import os
import pickle
import random
import re
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynamix_core.data.parsers import FORMATS, detect_format, detect_format_why, format_options, parse_source
from dynamix_core.data.records import BadInputError, IdentityMaps, InputReport
from fabricate import FAKE_JPEG, lmdb_store, market_tree, msmt17_tree, touch


def rows(samples, root):
    """(key, split, source_pid, source_camid, image path relative to root) per sample."""
    return [(s.key, s.split, s.source_pid, s.source_camid, os.path.relpath(s.image.container, root)) for s in samples]


def problems(report, root):
    return sorted((os.path.relpath(p.path, root), p.reason.split(":", 1)[0]) for p in report.problems)


# ---------------------------------------------------------------- Market-1501 / DukeMTMC / CUHK03-NP

@pytest.fixture()
def market_root(tmp_path):
    root = market_tree(
        tmp_path / "market",
        train=["0007_c2s1_000100_01.jpg", "0002_c3s1_000551_01.jpg", "0002_c1s1_000451_03.jpg",
               "0003_c7s1_000001_01.jpg"],  # camera 7 of 6
        gallery=["0000_c1s1_000001_01.jpg", "-1_c2s1_000002_01.jpg", "0002_c5s2_001000_02.jpg",
                 "foo.jpg", "0003_c1s1_000001_01.png", "Thumbs.db"],
        query=["0002_c6s1_000300_01.jpg", "0000_c1s1_000002_01.jpg"],  # a distractor outside the gallery
    )
    (root / "query" / "nested").mkdir()
    return root


def test_market1501_keeps_distractors_in_gallery_and_counts_junk(market_root):
    report = InputReport()
    samples = parse_source("market1501", market_root, report)
    assert rows(samples, market_root) == [
        ("market1501_gallery_0000_c1s1_000001_01", "gallery", "0000", "c1", "bounding_box_test/0000_c1s1_000001_01.jpg"),
        ("market1501_gallery_0002_c5s2_001000_02", "gallery", "0002", "c5", "bounding_box_test/0002_c5s2_001000_02.jpg"),
        ("market1501_query_0002_c6s1_000300_01", "query", "0002", "c6", "query/0002_c6s1_000300_01.jpg"),
        ("market1501_train_0002_c1s1_000451_03", "train", "0002", "c1", "bounding_box_train/0002_c1s1_000451_03.jpg"),
        ("market1501_train_0002_c3s1_000551_01", "train", "0002", "c3", "bounding_box_train/0002_c3s1_000551_01.jpg"),
        ("market1501_train_0007_c2s1_000100_01", "train", "0007", "c2", "bounding_box_train/0007_c2s1_000100_01.jpg"),
    ]
    assert all(s.domain == "multi" and s.frame == -1 and s.image.ext == "jpg" and s.dataset == "market1501"
               for s in samples)
    assert problems(report, market_root) == [
        ("bounding_box_test/-1_c2s1_000002_01.jpg", "junk"),
        ("bounding_box_test/0003_c1s1_000001_01.png", "malformed name"),
        ("bounding_box_test/foo.jpg", "malformed name"),
        ("bounding_box_train/0003_c7s1_000001_01.jpg", "bad camera"),
        ("query/0000_c1s1_000002_01.jpg", "misplaced distractor"),
        ("query/nested", "unexpected entry"),
    ]
    assert report.counts()["junk"] == 1


def test_market1501_strict_mode_accepts_junk_but_raises_on_bad_names(tmp_path, market_root):
    clean = market_tree(tmp_path / "clean", gallery=["-1_c2s1_000002_01.jpg", "0001_c1s1_000001_01.jpg"])
    report = InputReport(strict=True)
    assert [s.key for s in parse_source("market1501", clean, report)] == ["market1501_gallery_0001_c1s1_000001_01"]
    assert report.counts() == {"junk": 1}
    with pytest.raises(BadInputError, match="malformed name|bad camera|unexpected entry|misplaced distractor"):
        parse_source("market1501", market_root, InputReport(strict=True))


def test_dataset_option_renames_market_layout_sets(market_root):
    samples = parse_source("market1501", market_root, InputReport(), dataset="synth_m1")
    assert {s.dataset for s in samples} == {"synth_m1"}
    assert samples[0].key == "synth_m1_gallery_0000_c1s1_000001_01"


def test_dukemtmc_names_cameras_and_frames(tmp_path):
    root = market_tree(tmp_path / "duke", train=["0001_c2_f0046182.jpg", "0005_c9_f0000002.jpg"],
                       gallery=["0005_c8_f0000001.jpg", "0002_c1s1_000451_03.jpg"], query=["0001_c1_f0000100.jpg"])
    report = InputReport()
    samples = parse_source("dukemtmc", root, report)
    assert [(r, s.frame) for r, s in zip(rows(samples, root), samples)] == [
        (("dukemtmc_gallery_0005_c8_f0000001", "gallery", "0005", "c8", "bounding_box_test/0005_c8_f0000001.jpg"), 1),
        (("dukemtmc_query_0001_c1_f0000100", "query", "0001", "c1", "query/0001_c1_f0000100.jpg"), 100),
        (("dukemtmc_train_0001_c2_f0046182", "train", "0001", "c2", "bounding_box_train/0001_c2_f0046182.jpg"), 46182),
    ]
    assert problems(report, root) == [("bounding_box_test/0002_c1s1_000451_03.jpg", "malformed name"),
                                      ("bounding_box_train/0005_c9_f0000002.jpg", "bad camera")]


@pytest.fixture()
def cuhk03_root(tmp_path):
    root = tmp_path / "cuhk03-np"
    market_tree(root / "labeled", train=["0001_c1_1.png", "0001_c2_6.png", "0003_c3_1.png"], query=["0002_c2_3.png"])
    market_tree(root / "detected", gallery=["0002_c1_2.png", "0002_c1_2.jpg"])
    return root


@pytest.mark.parametrize("variant, expected, rejected", [
    ("labeled", [("cuhk03np_query_0002_c2_3", "query", "0002", "c2", "labeled/query/0002_c2_3.png"),
                 ("cuhk03np_train_0001_c1_1", "train", "0001", "c1", "labeled/bounding_box_train/0001_c1_1.png"),
                 ("cuhk03np_train_0001_c2_6", "train", "0001", "c2", "labeled/bounding_box_train/0001_c2_6.png")],
     [("labeled/bounding_box_train/0003_c3_1.png", "bad camera")]),
    ("detected", [("cuhk03np_gallery_0002_c1_2", "gallery", "0002", "c1", "detected/bounding_box_test/0002_c1_2.png")],
     [("detected/bounding_box_test/0002_c1_2.jpg", "malformed name")]),
])
def test_cuhk03np_both_variants(cuhk03_root, variant, expected, rejected):
    report = InputReport()
    samples = parse_source("cuhk03np", cuhk03_root, report, variant=variant)
    assert rows(samples, cuhk03_root) == expected
    assert {s.image.ext for s in samples} == {"png"}
    assert problems(report, cuhk03_root) == rejected


def test_cuhk03np_variant_errors(tmp_path):
    root = market_tree(tmp_path / "c" / "labeled", train=["0001_c1_1.png"]).parent
    with pytest.raises(BadInputError, match=r"no detected/ folder \(found \['labeled'\]\)"):
        parse_source("cuhk03np", root, InputReport(), variant="detected")
    with pytest.raises(ValueError, match="variant 'both'"):
        parse_source("cuhk03np", root, InputReport(), variant="both")


# ---------------------------------------------------------------- MSMT17

MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0001/0001_003_07_0303noon_0100_1.jpg 1"],
    "list_val.txt": ["0001/0001_004_15_0303afternoon_0200_0.jpg 1"],
    "list_query.txt": ["0000/0000_000_02_0303morning_0015_0.jpg 0", ""],
    "list_gallery.txt": [
        "0000/0000_001_03_0303morning_0016_0.jpg 0",
        "0005/0005_000_16_0303morning_0001_0.jpg 5",  # camera 16 of 15
        "0006/0006_000_04_0303morning_0001_0.jpg 6",  # not on disk
        "garbage line here",
        "0007/bad_name.jpg 7",
        "../0008/0008_000_04_0303morning_0001_0.jpg 8",  # escapes the image folder
    ],
}


@pytest.mark.parametrize("version, train_dir, test_dir", [("v1", "train", "test"), ("v2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_namespaces_merges_val_and_reports(tmp_path, version, train_dir, test_dir):
    root = msmt17_tree(tmp_path / "msmt", version, MSMT_LISTS, absent={"0006/0006_000_04_0303morning_0001_0.jpg"})
    report = InputReport()
    samples = parse_source("msmt17", root, report)  # version auto-detected from the folders
    assert rows(samples, root) == [
        ("msmt17_gallery_0000_001_03_0303morning_0016_0", "gallery", "test:0", "c3",
         f"{test_dir}/0000/0000_001_03_0303morning_0016_0.jpg"),
        ("msmt17_query_0000_000_02_0303morning_0015_0", "query", "test:0", "c2",
         f"{test_dir}/0000/0000_000_02_0303morning_0015_0.jpg"),
        ("msmt17_train_0000_000_01_0303morning_0015_0", "train", "train:0", "c1",
         f"{train_dir}/0000/0000_000_01_0303morning_0015_0.jpg"),
        ("msmt17_train_0001_003_07_0303noon_0100_1", "train", "train:1", "c7",
         f"{train_dir}/0001/0001_003_07_0303noon_0100_1.jpg"),
        ("msmt17_train_0001_004_15_0303afternoon_0200_0", "train", "train:1", "c15",
         f"{train_dir}/0001/0001_004_15_0303afternoon_0200_0.jpg"),
    ]
    gallery_list = str(root / "list_gallery.txt")
    assert sorted((p.path, p.reason.split(":", 1)[0]) for p in report.problems) == [
        (f"{gallery_list}:2", "bad camera"),
        (f"{gallery_list}:4", "malformed list line"),
        (f"{gallery_list}:5", "malformed name"),
        (f"{gallery_list}:6", "malformed name"),
        (str(root / test_dir / "0006/0006_000_04_0303morning_0001_0.jpg"), "missing file"),
    ]
    # train and test labels both start at 0 but are different people: distinct global ids
    maps = IdentityMaps.build(samples)
    assert len(maps.pid) == 3
    assert maps.pid[("msmt17", "train:0")] != maps.pid[("msmt17", "test:0")]


# Name forms of the official V1/V2 lists: plain, with the "_ex" suffix, and each time of day.
# torchreid and fast-reid take the camera from the third "_" field and the label from the list.
MSMT_REAL_NAMES = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0008_0.jpg 0", "0000/0000_018_04_0303morning_0022_0_ex.jpg 0",
                       "0001/0001_011_14_0303noon_0613_1_ex.jpg 1"],
    "list_val.txt": ["0002/0002_004_11_0302afternoon_0911_0_ex.jpg 2"],
    "list_query.txt": ["0000/0000_009_05_0303morning_0029_1_ex.jpg 0"],
    "list_gallery.txt": ["0000/0000_013_05_0303morning_0041_0.jpg 0", "0003/0003_002_15_0113noon_0200_2_ex.jpg 3"],
}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_msmt17_accepts_every_official_name_form(tmp_path, version):
    root = msmt17_tree(tmp_path / "msmt", version, MSMT_REAL_NAMES)
    samples = parse_source("msmt17", root, InputReport(strict=True))  # strict: the first rejection raises
    assert sorted((s.split, s.source_pid, s.source_camid, s.key) for s in samples) == [
        ("gallery", "test:0", "c5", "msmt17_gallery_0000_013_05_0303morning_0041_0"),
        ("gallery", "test:3", "c15", "msmt17_gallery_0003_002_15_0113noon_0200_2_ex"),
        ("query", "test:0", "c5", "msmt17_query_0000_009_05_0303morning_0029_1_ex"),
        ("train", "train:0", "c1", "msmt17_train_0000_000_01_0303morning_0008_0"),
        ("train", "train:0", "c4", "msmt17_train_0000_018_04_0303morning_0022_0_ex"),
        ("train", "train:1", "c14", "msmt17_train_0001_011_14_0303noon_0613_1_ex"),
        ("train", "train:2", "c11", "msmt17_train_0002_004_11_0302afternoon_0911_0_ex"),
    ]


def test_msmt17_version_errors(tmp_path):
    root = msmt17_tree(tmp_path / "both", "v1", {"list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0"]})
    (root / "mask_train_v2").mkdir()
    with pytest.raises(BadInputError, match="cannot tell the MSMT17 version"):
        parse_source("msmt17", root, InputReport())
    samples = parse_source("msmt17", root, InputReport(), version="v1")
    assert [s.key for s in samples] == ["msmt17_train_0000_000_01_0303morning_0015_0"]
    with pytest.raises(ValueError, match="version 'v3'"):
        parse_source("msmt17", root, InputReport(), version="v3")
    no_lists = tmp_path / "nolists"
    (no_lists / "train").mkdir(parents=True)
    with pytest.raises(BadInputError, match="none of .*list_train.txt"):
        parse_source("msmt17", no_lists, InputReport())


def test_msmt17_list_without_its_image_folder(tmp_path):
    root = msmt17_tree(tmp_path / "m", "v1", {"list_query.txt": ["0000/0000_000_02_0303morning_0015_0.jpg 0"]})
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    with pytest.raises(BadInputError, match=re.escape(str(root / "test")) + ": does not exist"):
        parse_source("msmt17", root, InputReport())


# ---------------------------------------------------------------- LUPerson / LUPerson-NL

LUP_KEYS = ["us_la_0042_00000007", "ca_ny_0001_00000002", "ca_ny_0001_00000001", "bad.key", 17, "ca_ny_0009_00000001"]


@pytest.mark.parametrize("as_dict", [False, True])
def test_luperson_keys_videos_and_missing_entries(tmp_path, as_dict):
    values = {k: f"jpeg-{k}".encode() for k in ("us_la_0042_00000007", "ca_ny_0001_00000002", "ca_ny_0001_00000001")}
    root = lmdb_store(tmp_path / "lup", {"keys": LUP_KEYS, "pids": [0] * 6} if as_dict else LUP_KEYS, values)
    report = InputReport()
    samples = parse_source("luperson", root, report)
    assert [(s.key, s.source_video, s.source_camid, s.source_pid, s.image.member) for s in samples] == [
        ("luperson_train_ca_ny_0001_00000001", "ca_ny_0001", "ca_ny_0001", None, "ca_ny_0001_00000001"),
        ("luperson_train_ca_ny_0001_00000002", "ca_ny_0001", "ca_ny_0001", None, "ca_ny_0001_00000002"),
        ("luperson_train_us_la_0042_00000007", "us_la_0042", "us_la_0042", None, "us_la_0042_00000007"),
    ]
    assert {(s.domain, s.split, s.image.container, s.source_tracklet) for s in samples} == {
        ("single", "train", str(root / "lmdb"), None)}
    assert samples[2].image.read_bytes() == b"jpeg-us_la_0042_00000007"
    keys_pkl = str(root / "keys.pkl")
    assert [(p.path, p.reason.split(":", 1)[0]) for p in report.problems] == [
        (f"{keys_pkl}[3]", "malformed key"),
        (f"{keys_pkl}[4]", "malformed key"),
        (f"{root / 'lmdb'}[ca_ny_0009_00000001]", "missing file"),
    ]


def test_luperson_nl_tracklets_frames_and_pid_checks(tmp_path):
    keys = ["00002_000003_0000005_00", "00001_000004_0000010_01", "00001_000003_0000011_00",
            "00001_000003_0000010_00", "00001_000003_0000012_00", "00002_000003_0000006_00"]
    pids = [9, 8, 7, 7, 8, "x"]  # the 5th contradicts its tracklet's pid 7; the 6th is no int
    root = lmdb_store(tmp_path / "nl", {"keys": keys, "pids": pids}, {k: b"j" for k in keys})
    report = InputReport()
    samples = parse_source("luperson_nl", root, report)
    assert [(s.key, s.source_video, s.source_tracklet, s.source_pid, s.source_camid, s.frame) for s in samples] == [
        ("luperson_nl_train_00001_000003_0000010_00", "00001", "000003", "00001_000003", "00001", 10),
        ("luperson_nl_train_00001_000003_0000011_00", "00001", "000003", "00001_000003", "00001", 11),
        ("luperson_nl_train_00001_000004_0000010_01", "00001", "000004", "00001_000004", "00001", 10),
        ("luperson_nl_train_00002_000003_0000005_00", "00002", "000003", "00002_000003", "00002", 5),
    ]
    assert {s.domain for s in samples} == {"single"}
    lmdb_dir = root / "lmdb"
    assert sorted((p.path, p.reason) for p in report.problems) == [
        (f"{lmdb_dir}[00001_000003_0000012_00]", "label mismatch: pid 8, but tracklet 00001_000003 has pid 7"),
        (f"{lmdb_dir}[00002_000003_0000006_00]", "bad pid: 'x' in keys.pkl, expected an int"),
    ]
    # identities are video-local: tracklet 000003 of two videos = two people
    maps = IdentityMaps.build(samples)
    assert len(maps.pid) == 3 and len(maps.video) == 2 and len(maps.camid) == 2
    assert [maps.record(s).tracklet_id for s in samples] == [0, 0, 1, 0]


def test_lmdb_store_structural_errors(tmp_path):
    good = {"keys": ["00001_000001_0000001_00"], "pids": [1]}
    short = lmdb_store(tmp_path / "short", {"keys": good["keys"], "pids": []}, {})
    with pytest.raises(BadInputError, match="'keys' and 'pids' must be lists of equal length"):
        parse_source("luperson_nl", short, InputReport())
    unlabeled = lmdb_store(tmp_path / "unlabeled", good["keys"], {})
    with pytest.raises(BadInputError, match="expected a dict with 'keys' and 'pids'"):
        parse_source("luperson_nl", unlabeled, InputReport())
    no_lmdb = tmp_path / "nolmdb"
    no_lmdb.mkdir()
    (no_lmdb / "keys.pkl").write_bytes(pickle.dumps(good))
    with pytest.raises(BadInputError, match=re.escape(str(no_lmdb / "lmdb" / "data.mdb"))):
        parse_source("luperson_nl", no_lmdb, InputReport())


class _Evil:
    """A pickle payload that creates a folder when unpickled by an unrestricted Unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("payload", ["ordered_dict", "code"])
def test_keys_pickle_refuses_anything_but_builtins(tmp_path, payload):
    marker = tmp_path / "pwned"
    content = OrderedDict(keys=["ca_ny_0001_00000001"]) if payload == "ordered_dict" else _Evil(str(marker))
    root = lmdb_store(tmp_path / "lup", content, {"ca_ny_0001_00000001": b"j"})
    with pytest.raises(BadInputError, match="cannot unpickle .*refusing to load"):
        parse_source("luperson", root, InputReport())
    assert not marker.exists()


# ---------------------------------------------------------------- RandPerson

def test_randperson_scene_camera_namespace(tmp_path):
    root = tmp_path / "randperson"
    touch(root, ["00000001_s03_c02_f000200.jpg", "00000002_s01_c01_f000005.jpg", "00000001_s01_c02_f000100.jpg",
                 "junk.jpg"])
    report = InputReport()
    samples = parse_source("randperson", root, report)
    assert [(r, s.frame) for r, s in zip(rows(samples, root), samples)] == [
        (("randperson_train_00000001_s01_c02_f000100", "train", "00000001", "s01_c02", "00000001_s01_c02_f000100.jpg"), 100),
        (("randperson_train_00000001_s03_c02_f000200", "train", "00000001", "s03_c02", "00000001_s03_c02_f000200.jpg"), 200),
        (("randperson_train_00000002_s01_c01_f000005", "train", "00000002", "s01_c01", "00000002_s01_c01_f000005.jpg"), 5),
    ]
    assert {s.domain for s in samples} == {"synthetic"}
    assert problems(report, root) == [("junk.jpg", "malformed name")]


# ---------------------------------------------------------------- generic manifest

MANIFEST_COLUMNS = ["path", "pid", "camid", "video_id", "frame", "split"]


def manifest_rows(abs_image):
    """Rows as (path, pid, camid, video_id, frame, split); None = empty cell."""
    return [
        ("imgs/a.jpg", 3, "1", None, None, None),
        ("imgs/b.png", -1, "2", "v1", 5, None),
        ("imgs/c.jpg", None, "1", None, None, "query"),
        (str(abs_image), 4, "2", "v9", 7, "gallery"),
        ("imgs/missing.jpg", 1, "1", None, None, None),
        ("imgs/e.jpg", -2, "1", None, None, None),
        ("imgs/f.jpg", 1, None, None, None, None),
        ("imgs/g.gif", 1, "1", None, None, None),
        ("imgs/h.jpg", 1, "1", None, None, "val"),
        ("imgs/a.png", 5, "1", None, None, None),  # same key as imgs/a.jpg, which sorts first
    ]


def write_manifest(path, rows_, kind):
    if kind == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(["" if v is None else v for v in row] for row in rows_)
    else:
        columns = list(zip(*rows_))
        types = [pa.string(), pa.int64(), pa.string(), pa.string(), pa.int64(), pa.string()]
        pq.write_table(pa.table({n: pa.array(c, t) for n, c, t in zip(MANIFEST_COLUMNS, columns, types)}), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_rows_paths_and_rejections(tmp_path, kind):
    base = tmp_path / "ds"
    touch(base / "imgs", ["a.jpg", "b.png", "c.jpg", "e.jpg", "f.jpg", "g.gif", "h.jpg", "a.png"])
    abs_image = touch(tmp_path / "elsewhere", ["d.jpg"])[0]
    manifest = write_manifest(base / f"list.{kind}", manifest_rows(abs_image), kind)
    report = InputReport()
    samples = parse_source("manifest", manifest, report)
    abs_key = "manifest_gallery_" + "".join(c if re.fullmatch(r"[A-Za-z0-9_]", c) else f"-{ord(c):02x}"
                                            for c in str(abs_image)[: -len(".jpg")])
    expected = [
        # key, split, pid, camid, video, tracklet, frame, image, ext
        (abs_key, "gallery", "4", "2", "v9", "4", 7, str(abs_image), "jpg"),
        ("manifest_query_imgs-2fc", "query", None, "1", None, None, -1, str(base / "imgs/c.jpg"), "jpg"),
        ("manifest_train_imgs-2fa", "train", "3", "1", None, None, -1, str(base / "imgs/a.jpg"), "jpg"),
        ("manifest_train_imgs-2fb", "train", None, "2", "v1", None, 5, str(base / "imgs/b.png"), "png"),
    ]
    assert sorted(expected) == expected  # the parser's order is the key order
    assert [(s.key, s.split, s.source_pid, s.source_camid, s.source_video, s.source_tracklet, s.frame,
             s.image.container, s.image.ext) for s in samples] == expected
    line = (lambda i: f"{manifest}:{i + 2}") if kind == "csv" else (lambda i: f"{manifest}[row {i}]")
    assert sorted((p.path, p.reason.split(":", 1)[0]) for p in report.problems) == sorted([
        (str(base / "imgs/missing.jpg"), "missing file"),
        (line(5), "bad pid"),
        (line(6), "bad camera"),
        (str(base / "imgs/g.gif"), "bad extension"),
        (line(8), "bad split"),
        (str(base / "imgs/a.png"), "duplicate key"),
    ])


def test_manifest_float_ids_from_nan_columns(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    table = pa.table({"path": ["imgs/a.jpg", "imgs/b.jpg"], "pid": [3.0, float("nan")], "camid": [2.0, 1.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    samples = parse_source("manifest", tmp_path / "m.parquet", InputReport(), domain="single")
    assert [(s.source_pid, s.source_camid, s.domain) for s in samples] == [("3", "2", "single"), (None, "1", "single")]


def test_manifest_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,pid\nimgs/a.jpg,1\n")
    with pytest.raises(BadInputError, match=re.escape(f"{path}: missing required column(s) ['camid']")):
        parse_source("manifest", path, InputReport())
    text_file = tmp_path / "m.txt"
    text_file.write_text("path,pid,camid\n")
    with pytest.raises(BadInputError, match=re.escape(f"{text_file}: unknown manifest type '.txt'")):
        parse_source("manifest", text_file, InputReport())


# ---------------------------------------------------------------- common behaviour

@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_root_names_path_and_expected_layout(tmp_path, fmt):
    missing = tmp_path / "nowhere"
    with pytest.raises(BadInputError, match=re.escape(str(missing)) + ".*expected"):
        parse_source(fmt, missing, InputReport())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_empty_root_raises(tmp_path, fmt):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match=re.escape(str(empty))):
        parse_source(fmt, empty, InputReport())


def test_nothing_usable_left_raises_with_summary(tmp_path):
    root = market_tree(tmp_path / "m", train=["a.jpg", "b.jpg"])
    with pytest.raises(BadInputError, match=r"no usable image found as market1501\nskipped: 2"):
        parse_source("market1501", root, InputReport())


def test_unknown_format_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'market'"):
        parse_source("market", tmp_path, InputReport())
    with pytest.raises(ValueError, match=r"no option\(s\) \['variant'\]; its options are \[\]"):
        parse_source("market1501", tmp_path, InputReport(), variant="labeled")
    assert format_options("cuhk03np") == ["variant"] and format_options("msmt17") == ["version"]


def _bad_market(tmp_path):
    return "market1501", market_tree(tmp_path / "m", train=["0001_c1s1_000001_01.jpg", "0001_c1.jpg"]), {}


def _bad_msmt_missing(tmp_path):
    lists = {"list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_000_01_0303morning_0016_0.jpg 0"]}
    return "msmt17", msmt17_tree(tmp_path / "s", "v1", lists, absent={"0000/0000_000_01_0303morning_0016_0.jpg"}), {}


def _bad_lmdb_missing(tmp_path):
    return "luperson", lmdb_store(tmp_path / "l", ["ca_ny_0001_00000001", "ca_ny_0001_00000002"],
                                  {"ca_ny_0001_00000001": FAKE_JPEG}), {}


def _bad_manifest_duplicate(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "m.csv").write_text("path,pid,camid\nimgs/a.jpg,1,1\nimgs/a.jpg,1,1\n")
    return "manifest", tmp_path / "m.csv", {}


def _bad_cuhk_camera(tmp_path):
    return "cuhk03np", market_tree(tmp_path / "c" / "detected", query=["0001_c1_1.png", "0001_c5_1.png"]).parent, \
        {"variant": "detected"}


@pytest.mark.parametrize("build, reason", [
    (_bad_market, "malformed name"), (_bad_msmt_missing, "missing file"), (_bad_lmdb_missing, "missing file"),
    (_bad_manifest_duplicate, "duplicate key"), (_bad_cuhk_camera, "bad camera"),
])
def test_strict_mode_raises_where_lenient_mode_reports(tmp_path, build, reason):
    fmt, root, options = build(tmp_path)
    report = InputReport()
    assert len(parse_source(fmt, root, report, **options)) == 1
    assert report.counts() == {reason: 1}
    with pytest.raises(BadInputError, match=re.escape(report.problems[0].path) + ": " + reason + ".*strict mode"):
        parse_source(fmt, root, InputReport(strict=True), **options)


def test_output_order_does_not_depend_on_creation_or_row_order(tmp_path):
    names = [f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg" for pid in range(1, 6) for cam in (1, 2) for frame in (3, 1)]
    keys = []
    for i in range(2):
        shuffled = names[:]
        random.Random(i).shuffle(shuffled)
        root = market_tree(tmp_path / f"m{i}", train=shuffled)
        keys.append([s.key for s in parse_source("market1501", root, InputReport())])
    assert keys[0] == keys[1] == sorted("market1501_train_" + n[:-4] for n in names)

    touch(tmp_path / "imgs", ["a.jpg", "a.png", "b.jpg"])
    lines = ["imgs/a.png,1,1", "imgs/b.jpg,2,1", "imgs/a.jpg,1,1"]
    outcomes = []
    for i, order in enumerate((lines, lines[::-1])):
        (tmp_path / f"m{i}.csv").write_text("path,pid,camid\n" + "\n".join(order) + "\n")
        report = InputReport()
        samples = parse_source("manifest", tmp_path / f"m{i}.csv", report)
        outcomes.append(([(s.key, s.image.container) for s in samples], [p.path for p in report.problems]))
    assert outcomes[0] == outcomes[1] == (
        [("manifest_train_imgs-2fa", str(tmp_path / "imgs/a.jpg")), ("manifest_train_imgs-2fb", str(tmp_path / "imgs/b.jpg"))],
        [str(tmp_path / "imgs/a.png")],
    )


# ---------------------------------------------------------------- format detection

def test_detect_format_recognises_every_layout(tmp_path, market_root, cuhk03_root):
    duke = market_tree(tmp_path / "duke", query=["0001_c2_f0046182.jpg"])
    msmt = msmt17_tree(tmp_path / "msmt", "v2", {"list_query.txt": ["0000/0000_000_02_0303morning_0015_0.jpg 0"]})
    lup = lmdb_store(tmp_path / "lup", {"keys": ["ca_ny_0001_00000001"], "pids": [0]}, {})
    nl = lmdb_store(tmp_path / "nl", {"keys": ["00001_000001_0000001_00"], "pids": [0]}, {})
    rand = tmp_path / "rand"
    touch(rand, ["00000001_s01_c02_f000100.jpg"])
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,pid,camid\n")
    found = {name: detect_format(root) for name, root in [
        ("market1501", market_root), ("dukemtmc", duke), ("msmt17", msmt), ("cuhk03np", cuhk03_root),
        ("luperson", lup), ("luperson_nl", nl), ("randperson", rand), ("manifest", csv_path)]}
    assert found == {name: name for name in found}
    assert set(found) == set(FORMATS)


def test_detect_lmdb_store_by_key_form_not_by_pids(tmp_path):
    # The LUPerson release saves keys.pkl as {"keys", "pids"} too; all-digit country/city codes then
    # fit the loose LUPerson-NL parser pattern, so only the exact key forms decide.
    lup_keys = ["01_02_0003_00000004", "01_02_0003_00000005", "bad.key"]
    lup = lmdb_store(tmp_path / "lup", {"keys": lup_keys, "pids": [0, 0, 0]}, {})
    fmt, why = detect_format_why(lup)
    assert fmt == "luperson" and "CC_TT_VVVV_IIIIIIII" in why
    nl = lmdb_store(tmp_path / "nl", {"keys": ["00001_000002_0000003_00"], "pids": [5]}, {})
    assert detect_format_why(nl)[0] == "luperson_nl"
    mixed = lmdb_store(tmp_path / "mixed", {"keys": ["01_02_0003_00000004", "00001_000002_0000003_00"],
                                            "pids": [0, 5]}, {})
    neither = lmdb_store(tmp_path / "neither", {"keys": ["1_2_3_4"], "pids": [0]}, {})
    for root in (mixed, neither):
        with pytest.raises(BadInputError, match="cannot tell LUPerson from LUPerson-NL.*pass --format luperson or"):
            detect_format(root)
    nl_unlabeled = lmdb_store(tmp_path / "nl_unlabeled", ["00001_000002_0000003_00"], {})
    with pytest.raises(BadInputError, match="no 'pids' list; pass --format luperson"):
        detect_format(nl_unlabeled)


def test_detect_format_errors(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        detect_format(tmp_path / "nowhere")
    touch(tmp_path / "misc", ["readme.txt"])
    with pytest.raises(BadInputError, match="unrecognised layout; expected one of"):
        detect_format(tmp_path / "misc")
    odd = market_tree(tmp_path / "odd", query=["x.jpg"])
    with pytest.raises(BadInputError, match="follow neither Market-1501"):
        detect_format(odd)
