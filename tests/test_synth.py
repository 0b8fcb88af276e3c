"""SynthReID generator (SPEC 1.4): determinism, on-disk layouts read by the real parsers, tracker-noise
ground truth, multi-camera coverage, image decoding, camera-style difficulty, crash safety, CLI."""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import io
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dynamix_core.config import ConfigError, dump_yaml
from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers import parse_source
from dynamix_core.data.records import InputReport
from dynamix_core.data.synth import MANIFEST, SynthConfig, generate
from dynamix_core.data.synth import build as build_module
from dynamix_core.data.synth.identities import sample_identity
from dynamix_core.data.synth.market import multi_set, plan_identity, render_unit
from dynamix_core.data.synth.scene import render_shot, sample_shot
from dynamix_core.data.synth.seeding import rng_for
from dynamix_core.data.synth.videos import video_plans
from pipelines.cli import main as cli_main

SMALL = SynthConfig(
    height=96, width=48, num_multi_sets=2, min_cameras=3, max_cameras=4, multi_train_ids=6, multi_test_ids=5,
    max_cameras_per_id=3, distractors_per_set=3, junk_per_set=2, num_videos=6, max_people_per_video=4,
    video_frames=30, min_track_frames=8, max_track_frames=12, fragment_rate=0.4, switch_rate=0.3,
    target_ids=6, target_cameras=3,
)
#: SMALL with fewer identities and videos: every image it has, SMALL has too (per-item seeding).
TINY = dataclasses.replace(SMALL, num_multi_sets=1, multi_train_ids=6, multi_test_ids=2, num_videos=2, target_ids=3)
#: Market-1501 naming rule (SPEC 1.2), written independently of the parser.
MARKET_NAME = re.compile(r"(-1|\d{4})_c([1-6])s[1-6]_\d{6}_\d{2}\.jpg")
NL_KEY = re.compile(r"(\d{5})_(\d{6})_(\d{7})_(\d{2})")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lmdb_items(store: Path) -> dict[str, bytes]:
    # the project's cached handle: LMDB refuses a second handle on one store in a process
    with open_lmdb(str(store / "lmdb")).begin() as txn:
        return {k.decode(): bytes(v) for k, v in txn.cursor()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "small"
    return out, generate(SMALL, out, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(TINY, out, progress=False)
    return out


def market_files(set_dir: Path) -> dict[str, list[str]]:
    return {folder.name: sorted(p.name for p in folder.iterdir()) for folder in sorted(set_dir.iterdir())}


# --- determinism


def test_same_config_gives_byte_identical_files(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    generate(SMALL, again, progress=False)
    first, second = digest(out), digest(again)
    assert len(first) > 150 and "single/synth_video/lmdb/data.mdb" in first
    assert first == second


def test_different_seed_shares_no_image(tiny, tmp_path):
    other = tmp_path / "seed1"
    generate(dataclasses.replace(TINY, seed=1), other, progress=False)
    jpegs = [{h for name, h in digest(root).items() if name.endswith(".jpg")} for root in (tiny, other)]
    assert jpegs[0] and jpegs[0].isdisjoint(jpegs[1])
    assert set(lmdb_items(tiny / "single/synth_video").values()).isdisjoint(
        lmdb_items(other / "single/synth_video").values())


def test_scaling_up_keeps_the_earlier_images(small, tiny):
    """TINY is SMALL with fewer ids/videos: its train images and videos are byte-identical in SMALL."""
    out, _ = small
    train = tiny / "multi/synth_m0/bounding_box_train"
    for path in train.iterdir():
        assert (out / "multi/synth_m0/bounding_box_train" / path.name).read_bytes() == path.read_bytes()
    big, little = lmdb_items(out / "single/synth_video"), lmdb_items(tiny / "single/synth_video")
    assert little and all(big[k] == v for k, v in little.items())


def test_scaled_config_multiplies_counts_only():
    cfg = SMALL.scaled(3)
    assert (cfg.multi_train_ids, cfg.num_videos, cfg.target_ids) == (18, 18, 18)
    assert (cfg.height, cfg.max_cameras, cfg.fragment_rate) == (SMALL.height, SMALL.max_cameras, SMALL.fragment_rate)
    assert multi_set(cfg, 1).cameras == multi_set(SMALL, 1).cameras


@pytest.mark.slow
def test_workers_give_the_same_bytes(tiny, tmp_path):
    out = tmp_path / "w2"
    generate(TINY, out, progress=False, workers=2)
    assert digest(out) == digest(tiny)


# --- layouts, names, parsers


def test_market_sets_follow_market_naming_and_parse(small):
    out, summary = small
    for info in summary["sets"]:
        if info["format"] != "market1501":
            continue
        files = market_files(out / info["path"])
        expected_folders = ["bounding_box_test", "query"] + (["bounding_box_train"] if info["kind"] == "multi" else [])
        assert sorted(files) == sorted(expected_folders)
        for names in files.values():
            assert all(MARKET_NAME.fullmatch(n) for n in names), [n for n in names if not MARKET_NAME.fullmatch(n)]
        gallery = files["bounding_box_test"]
        assert sum(n.startswith("-1_") for n in gallery) == SMALL.junk_per_set
        assert sum(n.startswith("0000_") for n in gallery) == SMALL.distractors_per_set
        assert not any(n.startswith(("-1_", "0000_")) for f in ("query", "bounding_box_train") for n in files.get(f, []))

        report = InputReport(strict=False)
        samples = parse_source("market1501", out / info["path"], report, dataset=info["name"])
        counts = {split: sum(s.split == split for s in samples) for split in ("train", "query", "gallery")}
        assert counts["train"] == len(files.get("bounding_box_train", []))
        assert counts["query"] == len(files["query"])
        assert counts["gallery"] == len(gallery) - SMALL.junk_per_set  # junk dropped at load, distractors kept
        assert report.counts() == {"junk": SMALL.junk_per_set}
        assert {s.dataset for s in samples} == {info["name"]}


def test_multi_camera_identities_and_disjoint_splits(small):
    out, summary = small
    for info in summary["sets"]:
        if info["format"] != "market1501":
            continue
        cams: dict[tuple[str, str], set[int]] = defaultdict(set)
        for folder, names in market_files(out / info["path"]).items():
            for name in names:
                pid, cam = MARKET_NAME.fullmatch(name).groups()
                if pid not in ("-1", "0000"):
                    cams[(folder, pid)].add(int(cam))
        train = {pid for folder, pid in cams if folder == "bounding_box_train"}
        test = {pid for folder, pid in cams if folder != "bounding_box_train"}
        assert len(train) == info["identities"]["train"] and len(test) == info["identities"]["test"]
        assert not train & test
        for pid in train:
            assert len(cams[("bounding_box_train", pid)]) >= 2
        for pid in test:
            assert len(cams[("query", pid)] | cams[("bounding_box_test", pid)]) >= 2
            # every query camera leaves a positive in another camera of the gallery
            for qcam in cams[("query", pid)]:
                assert cams[("bounding_box_test", pid)] - {qcam}, (info["name"], pid)


def test_video_store_parses_and_matches_ground_truth(small):
    out, summary = small
    store = out / "single/synth_video"
    keys_pkl = pickle.loads((store / "keys.pkl").read_bytes())
    keys, pids = keys_pkl["keys"], keys_pkl["pids"]
    gt = pq.read_table(store / "ground_truth.parquet")
    assert gt.column_names == ["key", "true_pid", "video", "tracklet", "frame"]
    rows = gt.to_pylist()
    assert [r["key"] for r in rows] == keys and set(lmdb_items(store)) == set(keys)
    tracker_pid = {}
    for row, pid in zip(rows, pids):
        video, tracklet, frame, _ = map(int, NL_KEY.fullmatch(row["key"]).groups())
        assert (video, tracklet, frame) == (row["video"], row["tracklet"], row["frame"])
        assert tracker_pid.setdefault((video, tracklet), pid) == pid  # one tracker pid per tracklet
    assert len(set(tracker_pid.values())) == len(tracker_pid)

    report = InputReport(strict=True)
    samples = parse_source("luperson_nl", store, report, dataset="synth_video")
    assert len(samples) == len(keys) and len(report) == 0
    assert {s.source_pid for s in samples} == {f"{v:05d}_{t:06d}" for v, t in tracker_pid}


def test_ground_truth_noise_and_video_locality(small):
    out, summary = small
    rows = pq.read_table(out / "single/synth_video/ground_truth.parquet").to_pylist()
    videos_of, tracklets_of, people_of = defaultdict(set), defaultdict(set), defaultdict(set)
    seen = set()
    for r in rows:
        videos_of[r["true_pid"]].add(r["video"])
        tracklets_of[r["true_pid"]].add(r["tracklet"])
        people_of[(r["video"], r["tracklet"])].add(r["true_pid"])
        seen.add((r["true_pid"], r["frame"]))
    assert len(seen) == len(rows)  # a person is never twice in one frame
    assert all(len(v) == 1 for v in videos_of.values())  # nobody appears in two videos
    fragmented = sum(len(t) >= 2 for t in tracklets_of.values())
    switched = sum(len(p) == 2 for p in people_of.values())
    assert max(len(p) for p in people_of.values()) <= 2
    info = next(s for s in summary["sets"] if s["kind"] == "single")
    assert (fragmented, switched, len(people_of), len(videos_of)) == (
        info["fragmented_people"], info["switched_tracklets"], info["tracklets"], info["people"])
    assert fragmented > 0 and switched > 0


@pytest.mark.parametrize("fragment_rate, switch_rate", [(0.2, 0.1), (0.5, 0.3), (0.0, 0.0)])
def test_tracker_noise_rates(fragment_rate, switch_rate):
    """Rates measured on the planned boxes of 300 videos, within 4 binomial standard deviations."""
    cfg = dataclasses.replace(SynthConfig(), num_videos=300, fragment_rate=fragment_rate, switch_rate=switch_rate)
    tracklets_of, people_of = defaultdict(set), defaultdict(set)
    for plan in video_plans(cfg):
        for box in plan.boxes:
            tracklets_of[(plan.video, box.person)].add(box.tracklet)
            people_of[(plan.video, box.tracklet)].add(box.person)
    for rate, hits, n in ((fragment_rate, sum(len(t) >= 2 for t in tracklets_of.values()), len(tracklets_of)),
                          (switch_rate, sum(len(p) == 2 for p in people_of.values()), len(people_of))):
        assert abs(hits / n - rate) <= 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9, (rate, hits, n)


# --- images


def test_images_decode_at_the_configured_size(small):
    out, _ = small
    paths = sorted(out.rglob("*.jpg"))[::7]
    blobs = [p.read_bytes() for p in paths] + list(lmdb_items(out / "single/synth_video").values())[::7]
    assert len(blobs) > 40
    for blob in blobs:
        img = Image.open(io.BytesIO(blob))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SMALL.width, SMALL.height))


def _person_mean_rgb(ident, style, shot, rng_key) -> np.ndarray:
    """Mean colour of the person's pixels: where the crop differs from the same crop without the person."""
    style = dataclasses.replace(style, occlusion_rate=0.0, noise=0.0)
    with_person = np.asarray(render_shot(ident, style, shot, rng_for(*rng_key), 128, 64), dtype=float)
    without = np.asarray(render_shot(None, style, shot, rng_for(*rng_key), 128, 64), dtype=float)
    mask = np.abs(with_person - without).sum(-1) > 30
    return with_person[mask].mean(0)


def test_camera_style_shifts_person_colours_more_than_reimaging():
    """The same person in the same pose: across two cameras of a set the person's mean colour moves
    several times more than between two shots of one camera (flicker, blur jitter)."""
    cameras = multi_set(SynthConfig(), 0).cameras
    across, within = [], []
    for i in range(12):
        ident = sample_identity(rng_for(7, "ident", i), SMALL.held_out_hue)
        shot = sample_shot(cameras[0], rng_for(7, "shot", i))
        a = _person_mean_rgb(ident, cameras[0], shot, (7, "a", i))
        within.append(np.abs(a - _person_mean_rgb(ident, cameras[0], shot, (7, "b", i))).mean())
        across.append(np.abs(a - _person_mean_rgb(ident, cameras[1 + i % (len(cameras) - 1)], shot, (7, "a", i))).mean())
    assert np.mean(across) > 15.0
    assert np.mean(across) > 3.0 * np.mean(within)


def test_target_identities_wear_a_held_out_combination():
    """The held-out hue band is a top in the target and never a top in the source, while source
    bottoms do wear it: the target shows seen colours in an unseen combination."""
    lo, hi = SMALL.held_out_hue

    def in_band(rgb) -> bool:
        h, s, _ = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
        return s > 0.1 and lo <= h <= hi

    source_bottoms_in_band = 0
    for i in range(200):
        source = sample_identity(rng_for(3, "s", i), SMALL.held_out_hue)
        target = sample_identity(rng_for(3, "t", i), SMALL.held_out_hue, target=True)
        assert not in_band(source.top)
        assert in_band(target.top)
        source_bottoms_in_band += in_band(source.bottom)
    assert 10 <= source_bottoms_in_band <= 80, source_bottoms_in_band


def test_distractor_and_person_renders_are_deterministic_per_image():
    mset = multi_set(SMALL, 0)
    unit = plan_identity(SMALL, mset, 3)
    first = [np.asarray(im) for im in render_unit(SMALL, mset, unit)]
    second = [np.asarray(im) for im in render_unit(SMALL, mset, unit[::-1])][::-1]  # order does not matter
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# --- crash safety, re-runs, CLI


def test_interrupted_run_resumes_to_the_same_bytes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "crash"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_write_videos", crash)
    with pytest.raises(KeyboardInterrupt):
        generate(TINY, out, progress=False)
    assert (out / "multi/synth_m0/query").is_dir()  # finished sets were renamed into place
    assert not (out / MANIFEST).exists() and not (out / "single/synth_video").exists()
    assert not list(out.glob("single/.*tmp*"))  # the half-written set was removed
    with pytest.raises(ConfigError, match="unfinished"):
        generate(dataclasses.replace(TINY, seed=5), out, progress=False)
    monkeypatch.undo()
    assert generate(TINY, out, progress=False)["skipped"] is False
    assert digest(out) == digest(tiny)


def test_rerun_on_finished_folder_is_a_noop(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    summary = generate(TINY, tiny, progress=False)
    assert summary["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    with pytest.raises(ConfigError, match="other settings"):
        generate(dataclasses.replace(TINY, seed=9), tiny, progress=False)


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a SynthReID folder"):
        generate(TINY, tmp_path, progress=False)


def test_manifest_lists_sets_with_formats(small):
    out, _ = small
    manifest = json.loads((out / MANIFEST).read_text())
    assert [(s["name"], s["format"], s["path"]) for s in manifest["sets"]] == [
        ("synth_m0", "market1501", "multi/synth_m0"), ("synth_m1", "market1501", "multi/synth_m1"),
        ("synth_video", "luperson_nl", "single/synth_video"), ("synth_target", "market1501", "target/synth_target"),
    ]
    assert manifest["seed"] == SMALL.seed and manifest["image_size"] == [SMALL.height, SMALL.width]
    for s in manifest["sets"]:
        files = [p for p in (out / s["path"]).rglob("*.jpg")]
        if s["format"] == "market1501":
            assert len(files) == s["num_images"]


def test_cli_reports_a_finished_folder_and_rejects_bad_settings(tiny, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(TINY))
    assert cli_main(["synth", "--out", str(tiny), "--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "already complete" in printed and "synth_video" in printed and "tracklets" in printed
    assert cli_main(["synth", "--out", str(tmp_path / "x"), "--set", "max_cameras=7"]) == 2
    assert "max_cameras" in capsys.readouterr().err
    assert cli_main(["synth", "--out", str(tmp_path / "x"), "--set", "no_such_key=1"]) == 2
