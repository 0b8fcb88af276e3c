"""Faults in the data path, injected: bad bytes in an image or a shard, colliding ingest keys, a
dangling symlink. Each test checks what the user sees (the one-line reason naming file and key)
and that the data comes back whole. Ingest runs in this process (``workers=0``): no Ray."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dynamix_core.data.images import decode_image, image_problem
from dynamix_core.data.reader import read_dataset_manifest
from dynamix_core.data.records import InputReport, make_key
from dynamix_core.data.shards import iter_tar_samples
from pipelines.ingest import IngestConfig, format_result, run_ingest


def jpeg(seed: int, size=(128, 64), **kw) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 64, (*size, 3)) + np.linspace(0, 180, size[1])[None, :, None], 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def garbled(data: bytes, fill: bytes) -> bytes:
    """``data`` with ``fill`` written over the middle of its scan data (same length)."""
    start = len(data) // 2
    return data[:start] + fill + data[start + len(fill):]


# ---------------------------------------------------------------------------------- image validation


@pytest.mark.parametrize("fill", [bytes(range(7, 71)), bytes(64), b"GARBAGE!" * 8], ids=["random", "zeros", "text"])
def test_garbage_in_the_middle_of_a_jpeg_is_caught(fill):
    bad = garbled(jpeg(1), fill)
    decode_image(bad)  # Pillow decodes it without complaint: that is why the check exists
    problem = image_problem(bad)
    assert problem is not None and problem.startswith("corrupt image:"), problem


@pytest.mark.parametrize("kw", [dict(quality=90), dict(quality=5), dict(quality=100, subsampling=0),
                                dict(subsampling=1), dict(optimize=True), dict(progressive=True)])
@pytest.mark.parametrize("size", [(128, 64), (1, 1), (17, 33), (300, 20)])
def test_intact_jpegs_pass_the_check(kw, size):
    assert image_problem(jpeg(2, size, **kw)) is None


def test_intact_jpeg_with_restart_markers_passes_and_a_broken_interval_is_caught():
    # a restart interval (DRI) every MCU row: Pillow writes one with ``restart_marker_rows``
    data = jpeg(3, (64, 48), restart_marker_rows=1)
    assert b"\xff\xdd" in data
    assert image_problem(data) is None
    assert image_problem(garbled(data, bytes(range(7, 71)))) is not None


def test_grayscale_jpeg_passes_and_garbage_in_it_is_caught():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 24), dtype=np.uint8)).save(buf, "JPEG")
    assert image_problem(buf.getvalue()) is None
    assert image_problem(garbled(buf.getvalue(), bytes(30))) is not None


# --------------------------------------------------------------------------------------- ingest keys


def test_make_key_keeps_dataset_names_readable_and_is_injective():
    assert make_key("market1501", "train", "0002_c1s1_000451_03") == "market1501_train_0002_c1s1_000451_03"
    assert make_key("ds", "train", "a/x_1") != make_key("ds", "train", "a_x/1")
    assert make_key("ds", "train", "a.b") != make_key("ds", "train", "a_b") != make_key("ds", "train", "a-b")
    assert "." not in make_key("a.b", "c/d", 3)


def manifest_source(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "list.csv").write_text("path,pid,camid\n" + "".join(f"{rel},{i},c{i}\n" for i, rel in enumerate(files)))
    return root / "list.csv"


def test_images_whose_keys_collide_after_sanitising_are_both_kept(tmp_path):
    files = {"a/x_1.jpg": jpeg(10, (32, 16)), "a_x/1.jpg": jpeg(11, (32, 16))}
    listing = manifest_source(tmp_path / "src", files)
    result = run_ingest(IngestConfig(root=str(listing), format="manifest", dataset="ds", out=str(tmp_path / "out"),
                                     workers=0), progress=False)
    assert len(result.report) == 0, result.report.problems
    manifest = read_dataset_manifest(tmp_path / "out")
    assert manifest.num_rows == 2 and len(set(manifest.column("key").to_pylist())) == 2
    stored = {}
    for shard in set(manifest.column("shard").to_pylist()):
        stored.update({r.key: d for r, d, _ in iter_tar_samples(tmp_path / "out" / shard, InputReport())})
    assert sorted(stored.values()) == sorted(files.values())


def market(root: Path, per_folder: int = 3) -> Path:
    """A Market-1501 folder of real JPEGs: train, gallery and query images of pids 1..3."""
    for f, folder in enumerate(("bounding_box_train", "bounding_box_test", "query")):
        (root / folder).mkdir(parents=True)
        for i in range(per_folder):
            (root / folder / f"{i + 1:04d}_c{i + 1}s1_{100 * f + i:06d}_01.jpg").write_bytes(jpeg(100 * f + i, (32, 16)))
    return root


def test_a_dangling_symlink_is_reported_as_one(tmp_path):
    root = market(tmp_path / "market")
    link = root / "bounding_box_train" / "0003_c1s1_000009_01.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    result = run_ingest(IngestConfig(root=str(root), format="market1501", out=str(tmp_path / "out"), workers=0),
                        progress=False)
    reasons = {p.path: p.reason for p in result.report.problems}
    assert reasons == {str(link): f"dangling symlink: points to {tmp_path / 'gone.jpg'}, which does not exist; "
                                  f"restore the target or remove the link"}


# ------------------------------------------------------------------------------------ damaged shards


def damage_first_image(out: Path) -> tuple[str, str]:
    """Write garbage over the first image's JPEG header in a shard of ``out`` (its size unchanged);
    returns (shard, key)."""
    row = read_dataset_manifest(out).sort_by("shard").slice(0, 1).to_pylist()[0]
    with open(out / row["shard"], "r+b") as fh:
        fh.seek(row["offset"])
        fh.write(b"\x00garbage garbage\x00")
    return row["shard"], row["key"]


def test_reingest_rewrites_a_shard_whose_bytes_were_damaged(tmp_path):
    root, out = market(tmp_path / "market"), tmp_path / "out"
    cfg = IngestConfig(root=str(root), format="market1501", out=str(out), workers=0)
    run_ingest(cfg, progress=False)
    shard, key = damage_first_image(out)
    result = run_ingest(cfg, progress=False)
    assert result.shards_written == 1, format_result(result)
    report = InputReport()
    images = {r.key: d for r, d, _ in iter_tar_samples(out / shard, report)}
    assert len(report) == 0 and image_problem(images[key]) is None
    assert run_ingest(cfg, progress=False).shards_written == 0  # repaired: up to date again


class _OnePlan:
    """A sampler that plans the same batch of multi-camera images at every step."""

    def __init__(self, refs: list[str]):
        self.refs, self.step = refs, 0

    def next_batch(self):
        from dynamix_core.sampling import BatchPlan

        self.step += 1
        return BatchPlan(self.step - 1, None, list(self.refs), np.zeros(len(self.refs), np.int64), [],
                         np.zeros(0, np.int64), np.zeros(0, np.int64))

    def state_dict(self) -> dict:
        return {}


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_bad_image_at_training_time_is_named_by_shard_and_key(policy, capsys):
    from dynamix_core.data.transforms import TransformConfig
    from pipelines.train.data import BadImageError, BatchProducer, MultiCameraSet

    keys = ["ds_train_a", "ds_train_b", "ds_train_c"]
    data = [jpeg(20, (32, 16)), b"\xff\xd8\xff\xe0garbage over the header", jpeg(21, (32, 16))]
    multi = MultiCameraSet(keys=keys, data=data, pid=np.zeros(3, np.int64), camid=np.zeros(3, np.int64),
                           dataset=np.array(["ds"] * 3), num_identities=1,
                           shards=["sets/ds/train/shard-000000.tar"] * 3)
    producer = BatchProducer(_OnePlan(keys), multi, None, TransformConfig(height=32, width=16), seed=0,
                             prefetch=1, threads=1, bad_images=policy)
    try:
        if policy == "stop":
            with pytest.raises(BadImageError) as err:
                producer.get()
            text = str(err.value)
            assert "\n" not in text and text.startswith("sets/ds/train/shard-000000.tar: image ds_train_b does not decode")
            assert "data.bad_images: skip" in text
        else:
            batch, _ = producer.get()
            assert batch.standard_BCHW.shape[0] == 2 and batch.pid_B.shape[0] == 2
            assert producer.bad_images_skipped >= 1
            assert "[data] skipped: sets/ds/train/shard-000000.tar: image ds_train_b does not decode" in capsys.readouterr().out
    finally:
        producer.close()


def test_inspect_verify_names_a_damaged_shard_a_bad_image_and_a_truncated_tar(tmp_path):
    from pipelines.commands.inspect import verify_shard_set

    root, out = market(tmp_path / "market"), tmp_path / "out"
    run_ingest(IngestConfig(root=str(root), format="market1501", out=str(out), workers=0), progress=False)
    assert verify_shard_set(out) == []
    shard, key = damage_first_image(out)
    problems = verify_shard_set(out)
    assert f"{out / shard}: damaged: its bytes changed since it was written (SHA-256 differs from its manifest's); " \
           f"re-run `dynamix ingest` on the set's source to rewrite it" in problems
    assert any(p.startswith(f"{out / shard}: image {key}: unreadable image") for p in problems), problems
    other = sorted(set(read_dataset_manifest(out).column("shard").to_pylist()) - {shard})[0]
    size = os.path.getsize(out / other)
    os.truncate(out / other, size - 1500)
    problems = verify_shard_set(out)
    assert f"{out / other}: damaged: {size - 1500} bytes, its manifest records {size}; re-run `dynamix ingest` " \
           f"on the set's source to rewrite it" in problems
    assert any(p.startswith(f"{out / other}: truncated tar") for p in problems), problems
