"""Ingest: round trip, whole videos, resume after a crash or a kill, idempotence, bad input, strict
mode, the Ray Data path and the CLI. Inputs are tiny real JPEGs written by Pillow."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from dynamix_core.data.lmdb_io import close_lmdb_handles
from dynamix_core.data.reader import ShardReader, read_dataset_manifest
from dynamix_core.data.records import BadInputError, InputReport
from dynamix_core.data.shards import iter_tar_samples, read_shard_metadata
from pipelines.ingest import IngestConfig, run_ingest

MARKET_FOLDERS = {"bounding_box_train": "train", "bounding_box_test": "gallery", "query": "query"}


# ------------------------------------------------------------------------------------ fabricated inputs


def image_bytes(seed: int, fmt: str = "JPEG", size=(32, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def make_market(root: Path, per_folder: int = 12) -> dict[Path, bytes]:
    """A Market-1501 folder: pids 1..5, cameras 1..6; returns every file's bytes."""
    files = {}
    for f, folder in enumerate(MARKET_FOLDERS):
        (root / folder).mkdir(parents=True)
        for i in range(per_folder):
            path = root / folder / f"{i % 5 + 1:04d}_c{i % 6 + 1}s1_{100 * f + i:06d}_01.jpg"
            files[path] = image_bytes(100 * f + i)
            path.write_bytes(files[path])
    return files


def make_luperson_nl(root: Path, frames_per_video: dict[int, int]) -> dict[str, bytes]:
    """An LUPerson-NL store: video v holds ``n`` frames over 2 tracklets; returns key -> bytes."""
    images, pids = {}, []
    for video, n in frames_per_video.items():
        for frame in range(n):
            tracklet = frame % 2
            key = f"{video:05d}_{tracklet:06d}_{frame:07d}_00"
            images[key] = image_bytes(1000 * video + frame)
            pids.append(10 * video + tracklet)
    (root / "lmdb").mkdir(parents=True)
    with lmdb.open(str(root / "lmdb"), map_size=2**26) as env, env.begin(write=True) as txn:
        for key, data in images.items():
            txn.put(key.encode(), data)
    (root / "keys.pkl").write_bytes(pickle.dumps({"keys": list(images), "pids": pids}))
    return images


def ingest(root: Path, out: Path, **kw):
    cfg = IngestConfig(root=root, out=out, workers=kw.pop("workers", 0), **kw)
    return run_ingest(cfg, progress=False)


def files_of(folder: Path) -> list[str]:
    """Every file under ``folder``, as a path relative to it (``train/shard-000000.tar``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def is_shard(name: str) -> bool:
    """A tar or per-shard manifest (``train/shard-000000.tar``, ``manifests/train/shard-000000.parquet``)."""
    return Path(name).name.startswith("shard-")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in files_of(folder)}


def same_output(a: Path, b: Path) -> None:
    """Two ingests produced the same files, byte for byte (ingest.json may name different roots)."""
    names = files_of(a)
    assert names == files_of(b)
    for name in names:
        if name != "ingest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------- tests


def test_market_round_trip(tmp_path):
    files = make_market(tmp_path / "src")
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=5)
    assert len(result.report) == 0

    # independent expectations from the file names: sorted (dataset, source id) -> rank
    stems = {p.stem: (MARKET_FOLDERS[p.parent.name], p) for p in files}
    pid_names = sorted({s.split("_")[0] for s in stems})
    cam_names = sorted({"c" + s.split("_")[1][1] for s in stems})
    expected = {}
    for stem, (split, path) in stems.items():
        expected[f"market1501_{split}_{stem}"] = dict(
            split=split, pid=pid_names.index(stem.split("_")[0]), camid=cam_names.index("c" + stem.split("_")[1][1]),
            data=files[path],
        )

    reader = ShardReader(tmp_path / "out")
    seen = {}
    for sample in reader.iter_samples():
        assert sample.key not in seen
        seen[sample.key] = sample
    assert set(seen) == set(expected) and len(reader.report) == 0
    for key, want in expected.items():
        rec = seen[key].record
        assert seen[key].data == want["data"] and seen[key].ext == "jpg"
        assert (rec.dataset, rec.split, rec.pid, rec.camid, rec.video_id, rec.domain) == (
            "market1501", want["split"], want["pid"], want["camid"], -1, "multi")

    manifest = read_dataset_manifest(tmp_path / "out").to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(expected)
    for row in manifest:  # the manifest alone locates every image's bytes
        with open(tmp_path / "out" / row["shard"], "rb") as fh:
            fh.seek(row["offset"])
            assert fh.read(row["size"]) == expected[row["key"]]["data"]
        assert (row["pid"], row["camid"]) == (expected[row["key"]]["pid"], expected[row["key"]]["camid"])
    shard_counts = {}
    for row in manifest:
        shard_counts[row["shard"]] = shard_counts.get(row["shard"], 0) + 1
    # 12 images per split / 5 per shard: 3 shards per split, each split in its own folder, one series
    assert sorted(shard_counts) == sorted(f"{split}/shard-{3 * s + i:06d}.tar"
                                          for s, split in enumerate(("train", "query", "gallery")) for i in range(3))
    assert max(shard_counts.values()) == 5
    assert all(row["shard"].split("/")[0] == row["split"] for row in manifest)
    summary = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert (summary["images"], summary["identities"], summary["cameras"], summary["shards"]) == (36, 5, 6, 9)


def test_single_camera_videos_are_whole_and_contiguous(tmp_path):
    frames = {3: 7, 1: 4, 8: 2, 5: 9, 2: 3}
    images = make_luperson_nl(tmp_path / "src", frames)
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=10)
    assert len(result.report) == 0
    manifest = read_dataset_manifest(tmp_path / "out").to_pylist()
    shards_of_video = {}
    for row in manifest:
        shards_of_video.setdefault(row["video_id"], set()).add(row["shard"])
    assert all(len(s) == 1 for s in shards_of_video.values())  # never split across shards

    videos = sorted(frames)  # video ids are ranks of the sorted video names
    reader = ShardReader(tmp_path / "out")
    got = list(reader.iter_videos())  # consecutive runs: a split video would come out twice
    assert len(got) == len(frames)
    for video in got:
        (vid,) = {s.record.video_id for s in video}
        source = videos[vid]
        assert sorted(s.key for s in video) == sorted(f"luperson_nl_train_{k}" for k in images if int(k[:5]) == source)
        for s in video:
            raw_key = s.key.removeprefix("luperson_nl_train_")
            assert s.data == images[raw_key]
            assert s.record.tracklet_id == int(raw_key.split("_")[1]) and s.record.frame == int(raw_key.split("_")[2])
            assert s.record.domain == "single" and s.record.camid == vid
    assert sum(len(v) for v in got) == len(images)


def test_rerun_of_a_finished_ingest_changes_nothing(tmp_path):
    make_market(tmp_path / "src", per_folder=4)
    ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    before = snapshot(tmp_path / "out")
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    assert result.shards_written == 0 and result.shards_skipped == 6  # 4 images a split, 3 a shard: 2 a split
    assert snapshot(tmp_path / "out") == before  # bytes and modification times


def test_rerun_of_a_finished_ingest_does_not_start_ray(tmp_path, monkeypatch):
    """A re-run (``dynamix demo`` re-ingests every set) over an unchanged source has nothing to
    write: it answers from the shard manifests without starting Ray (which costs ~25 s a set on
    2 cores), and a source with one more image still goes through Ray for the changed shard."""
    import pipelines.ingest as ingest_mod

    images = make_market(tmp_path / "src", per_folder=4)
    ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    started = []
    monkeypatch.setattr(ingest_mod, "_run_ray", lambda plans, out_dir, cfg: started.append(len(plans)) or
                        ingest_mod._run_local(plans, out_dir))
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3, workers=2)
    assert started == [] and result.shards_written == 0 and result.shards_skipped == 6
    extra = tmp_path / "src" / "bounding_box_test" / "0099_c1s1_000001_00.jpg"
    extra.write_bytes(image_bytes(99))
    assert extra.name not in {p.name for p in images}
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3, workers=2)
    assert started == [7] and result.shards_written >= 1  # the new gallery image: a 7th shard


def _assert_no_partial_shard(out: Path) -> None:
    assert not (out / "manifest.parquet").exists()
    for split in ("train", "query", "gallery"):  # what a WebDataset reader is pointed at: finished tars only
        if (out / split).exists():
            assert all(p.name.startswith("shard-") and p.suffix == ".tar" for p in (out / split).iterdir())
    for tar_path in out.glob("*/shard-*.tar"):  # every tar under a final name is complete
        report = InputReport()
        assert len(list(iter_tar_samples(tar_path, report))) > 0 and len(report) == 0
    for manifest in out.glob("manifests/*/shard-*.parquet"):
        split = manifest.parent.name
        assert read_shard_metadata(out / split / manifest.with_suffix(".tar").name, manifest) is not None


def test_resume_after_a_crash_in_a_writer(tmp_path, monkeypatch):
    import pipelines.ingest as ingest_mod

    make_market(tmp_path / "src", per_folder=6)
    ingest(tmp_path / "src", tmp_path / "clean", shard_max_count=4)
    calls = {"n": 0}
    real = ingest_mod.image_problem

    def failing(data):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the third shard
            raise RuntimeError("injected writer crash")
        return real(data)

    monkeypatch.setattr(ingest_mod, "image_problem", failing)
    with pytest.raises(RuntimeError, match="injected"):
        ingest(tmp_path / "src", tmp_path / "out", shard_max_count=4)
    _assert_no_partial_shard(tmp_path / "out")
    assert files_of(tmp_path / "out") == [  # the plan is written before any shard
        "manifests/train/shard-000000.parquet", "manifests/train/shard-000001.parquet", "plan.parquet",
        "train/shard-000000.tar", "train/shard-000001.tar"]

    monkeypatch.setattr(ingest_mod, "image_problem", real)
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=4)
    assert (result.shards_skipped, result.shards_written) == (2, 4)
    same_output(tmp_path / "out", tmp_path / "clean")


_KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pipelines.ingest as ingest_mod
    real = ingest_mod.image_problem
    def slow(data):  # slow enough for the test to kill it mid-shard
        time.sleep(0.1)
        return real(data)
    ingest_mod.image_problem = slow
    ingest_mod.run_ingest(ingest_mod.IngestConfig(root=Path(sys.argv[1]), out=Path(sys.argv[2]), workers=0,
                                                  shard_max_count=3), progress=False)
""")


def test_resume_after_sigkill(tmp_path):
    make_market(tmp_path / "src", per_folder=6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(tmp_path / "src"), str(out)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + 120
    while len(list(out.glob("manifests/*/shard-*.parquet"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_no_partial_shard(out)
    assert 2 <= len(list(out.glob("*/shard-*.tar"))) < 6

    ingest(tmp_path / "src", tmp_path / "clean", shard_max_count=3)
    result = ingest(tmp_path / "src", out, shard_max_count=3)
    assert result.shards_skipped >= 2
    same_output(out, tmp_path / "clean")  # the killed writer's temporary file is gone too


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    files = make_market(tmp_path / "src", per_folder=6)
    paths = sorted(files)
    truncated, garbage, png_named_jpg = paths[1], paths[4], paths[7]
    truncated.write_bytes(files[truncated][: len(files[truncated]) // 2])
    garbage.write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    png = image_bytes(7, "PNG")
    png_named_jpg.write_bytes(png)  # a valid image: kept, stored as the PNG it is
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=4)

    problems = {p.path: p.reason for p in result.report.problems}
    assert set(problems) == {str(truncated), str(garbage)}
    assert problems[str(truncated)].startswith("truncated image")
    assert problems[str(garbage)].startswith(("unreadable image", "truncated image"))
    summary = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert summary["skipped"] == 2 and summary["images"] == len(files) - 2
    kept = {s.key: s for s in ShardReader(tmp_path / "out").iter_samples()}
    assert len(kept) == len(files) - 2  # nothing valid lost
    png_sample = kept[f"market1501_{MARKET_FOLDERS[png_named_jpg.parent.name]}_{png_named_jpg.stem}"]
    assert (png_sample.ext, png_sample.data) == ("png", png)

    # fixing the inputs and re-running rewrites only the shards whose inputs were rejected or changed
    for path in (truncated, garbage, png_named_jpg):
        path.write_bytes(files[path])
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=4)
    assert len(result.report) == 0
    ingest(tmp_path / "src", tmp_path / "clean", shard_max_count=4)
    shard_of = {r["key"]: r["shard"] for r in read_dataset_manifest(tmp_path / "clean").to_pylist()}
    fixed_keys = {f"market1501_{MARKET_FOLDERS[p.parent.name]}_{p.stem}" for p in (truncated, garbage, png_named_jpg)}
    assert result.shards_written == len({shard_of[k] for k in fixed_keys})
    same_output(tmp_path / "out", tmp_path / "clean")


def test_duplicate_keys_and_missing_list_entries(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.jpg").write_bytes(image_bytes(i))
    manifest = src / "list.csv"
    manifest.write_text("path,pid,camid\nimg0.jpg,1,1\nimg1.jpg,2,1\nimg1.jpg,2,2\nimg2.jpg,3,2\nnope.jpg,4,1\n")
    result = ingest(manifest, tmp_path / "out", format="manifest")
    reasons = sorted(p.reason.split(":")[0] for p in result.report.problems)
    assert reasons == ["duplicate key", "missing file"]
    assert any("nope.jpg" in p.path for p in result.report.problems)
    assert result.summary["images"] == 3


def test_strict_mode_fails_on_the_first_bad_input(tmp_path):
    files = make_market(tmp_path / "src", per_folder=3)
    bad = sorted(files)[2]
    bad.write_bytes(files[bad][:40])
    with pytest.raises(BadInputError, match=bad.name):
        ingest(tmp_path / "src", tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@pytest.mark.ray
def test_ray_data_ingest_equals_the_in_process_one(tmp_path, ray_local, monkeypatch):
    """Also across windows: one shard per writer per Ray Data dataset, 5 shards, 3 datasets."""
    import pipelines.ingest

    monkeypatch.setattr(pipelines.ingest, "SHARDS_PER_WORKER", 1)
    make_luperson_nl(tmp_path / "src", {1: 5, 2: 3, 4: 6, 5: 4, 6: 4})
    ingest(tmp_path / "src", tmp_path / "local", shard_max_count=6)
    result = ingest(tmp_path / "src", tmp_path / "ray", shard_max_count=6, workers=2)
    assert result.shards_written == 5
    same_output(tmp_path / "ray", tmp_path / "local")


def test_cli_ingest_and_inspect(tmp_path, capsys):
    from pipelines.cli import main

    make_market(tmp_path / "src", per_folder=3)
    out = tmp_path / "out"
    assert main(["ingest", "--root", str(tmp_path / "src"), "--out", str(out), "--workers", "0",
                 "--shard-max-count", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ingested 9 images" in printed
    assert "format: market1501 (auto-detected: Market-style folders" in printed  # says which format was chosen
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["images"], info["shards"]["count"], info["skipped"]) == (9, 3, 0)
    assert {(g["split"], g["images"]) for g in info["groups"]} == {("train", 3), ("gallery", 3), ("query", 3)}
    assert main(["inspect", str(tmp_path / "src")]) == 2  # not an ingest output: a clear error


def test_ray_ingest_console_is_our_own_output(tmp_path):
    """A fresh `dynamix ingest` on its own local Ray instance: the console holds the project's summary,
    not Ray's worker logs or Ray Data's narration and deprecation warnings (they stay in Ray's files)."""
    import shutil
    import tempfile

    make_market(tmp_path / "src", per_folder=3)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("DYNAMIX_RAY_LOGS_TO_CONSOLE", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--root", str(tmp_path / "src"),
                           "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines[0].startswith("ingested 9 images") and len(lines) <= 8, "\n".join(lines)
    assert not any(("deprecated" in ln.lower() or "concurrency" in ln) for ln in lines), "\n".join(lines)


def _contents(out: Path) -> dict[str, tuple]:
    """Every image of an ingest folder as the trainer sees it: key -> (source ids, bytes)."""
    return {s.key: (s.record.dataset, s.record.source_pid, s.record.source_camid, s.record.split, s.record.frame,
                    s.data) for s in ShardReader(out).iter_samples()}


def test_a_growing_source_rewrites_only_what_changed(tmp_path):
    """Scheduled retraining re-ingests a source that grew. A new video whose name sorts between the
    old ones (new identities, new camera) must not renumber the old ids inside the old shards, so
    the old shards stay as they are (bytes and modification times) and only new shards are written;
    the grown folder holds the same images with the same source ids as a fresh ingest of the grown
    source, and the old keys keep their ids."""
    import shutil

    frames = {1: 4, 3: 5, 5: 3, 7: 4}
    make_luperson_nl(tmp_path / "src", frames)
    ingest(tmp_path / "src", tmp_path / "out", shard_max_count=6)
    before = snapshot(tmp_path / "out")
    old_ids = {r["key"]: (r["pid"], r["camid"], r["video_id"]) for r in read_dataset_manifest(tmp_path / "out").to_pylist()}
    old_shards = {name for name in before if is_shard(name)}
    assert len(old_shards) == 2 * len(frames)  # one tar + one parquet per video

    grown = {**frames, 4: 3}  # video 4 sorts between 3 and 5: its pids 40, 41 between 31 and 50
    close_lmdb_handles()
    shutil.rmtree(tmp_path / "src")  # the source grows in place: same folder, one video more
    make_luperson_nl(tmp_path / "src", grown)
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=6)
    after = snapshot(tmp_path / "out")
    assert {name: after[name] for name in old_shards} == {name: before[name] for name in old_shards}
    assert result.shards_written == 1 and result.shards_skipped == len(frames)
    rows = read_dataset_manifest(tmp_path / "out").to_pylist()
    assert {r["key"]: (r["pid"], r["camid"], r["video_id"]) for r in rows if r["key"] in old_ids} == old_ids

    ingest(tmp_path / "src", tmp_path / "fresh", shard_max_count=6)
    assert _contents(tmp_path / "out") == _contents(tmp_path / "fresh")
    new_rows = [r for r in rows if r["key"] not in old_ids]
    assert len(new_rows) == 3 and len({r["shard"] for r in new_rows}) == 1
    for column in ("pid", "camid", "video_id"):  # the new ids are new: no old identity, camera or video reused
        assert not {r[column] for r in new_rows} & {ids[("pid", "camid", "video_id").index(column)]
                                                    for ids in old_ids.values()}

    again = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=6)  # and the grown folder is stable
    assert again.shards_written == 0 and snapshot(tmp_path / "out") == after


def test_new_images_of_a_multi_camera_source_go_to_new_shards(tmp_path):
    """The same for a multi-camera set: a new identity whose id sorts first (0000, a distractor in
    Market-1501's gallery) and a new image of an old identity leave the old shards untouched."""
    make_market(tmp_path / "src", per_folder=4)
    ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    before = snapshot(tmp_path / "out")
    (tmp_path / "src" / "bounding_box_test" / "0000_c6s1_000777_01.jpg").write_bytes(image_bytes(777))
    (tmp_path / "src" / "query" / "0002_c1s1_000778_01.jpg").write_bytes(image_bytes(778))
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    after = snapshot(tmp_path / "out")
    assert result.shards_written == 2 and result.shards_skipped == 6  # a new gallery and a new query shard
    assert all(after[name] == before[name] for name in before if is_shard(name))
    ingest(tmp_path / "src", tmp_path / "fresh", shard_max_count=3)
    assert _contents(tmp_path / "out") == _contents(tmp_path / "fresh")


def test_an_unreadable_plan_file_means_a_fresh_plan(tmp_path):
    """A damaged plan.parquet is not a traceback: the folder is planned afresh, and shards that
    match the fresh plan (same samples, same ids) are kept."""
    make_market(tmp_path / "src", per_folder=4)
    ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    (tmp_path / "out" / "plan.parquet").write_bytes(b"not parquet")
    result = ingest(tmp_path / "src", tmp_path / "out", shard_max_count=3)
    assert result.shards_written == 0 and result.shards_skipped == 6
    assert (tmp_path / "out" / "plan.parquet").read_bytes()[:4] == b"PAR1"


def test_shard_plans_travel_as_compact_arrow_and_keep_their_digest():
    """A plan goes to its writer task as an Arrow IPC stream (not JSON rows), round-trips exactly
    (None members, PNGs, several datasets, global ids), and its digest, stored in its shard, is the
    sha1 of the sorted-key JSON rows."""
    import hashlib
    import json as _json

    import pyarrow as _pa

    from dynamix_core.data.records import ImageRef, Record
    from pipelines.ingest import ShardPlan

    rows = []
    for i in range(50):
        single = i % 3 == 0
        rows.append({"key": f"{'lup' if single else 'mkt'}_{i:04d}", "dataset": "luperson_nl" if single else "market1501",
                     "split": "train", "pid": -1 if i % 7 == 0 else i // 2, "camid": i % 6,
                     "video_id": i // 10 if single else -1, "tracklet_id": i % 4 if single else -1,
                     "frame": i if single else -1, "domain": "single" if single else "multi",
                     "source_pid": "" if i % 7 == 0 else str(i // 2), "source_camid": f"c{i % 6}",
                     "container": "/data/lup/lmdb" if single else f"/data/market/{i:04d}.png",
                     "member": f"{i:08d}" if single else None, "ext": "jpg" if single else "png", "bytes": 1000 + i,
                     "cls": -1 if i % 7 == 0 else 10**15 + i // 2})
    fields = ("key", "dataset", "split", "pid", "camid", "video_id", "tracklet_id", "frame", "domain",
              "source_pid", "source_camid")
    plan = ShardPlan.from_samples(7, [(Record(**{k: r[k] for k in fields}), ImageRef(r["container"], r["member"], r["ext"]), r["bytes"])
                         for r in rows], [r["cls"] for r in rows])
    item = plan.to_item()
    assert item["index"] == 7 and isinstance(item["plan"], bytes)
    assert _pa.ipc.open_stream(item["plan"]).read_all().num_rows == len(rows)
    assert len(item["plan"]) < len(_json.dumps(rows).encode())
    back = ShardPlan.from_item(item)
    assert back.index == 7 and list(back.samples()) == list(plan.samples())
    assert back.classes() == plan.classes() == [r["cls"] for r in rows]
    assert back.digest == plan.digest == hashlib.sha1(_json.dumps(rows, sort_keys=True).encode()).hexdigest()
