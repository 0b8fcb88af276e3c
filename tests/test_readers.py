"""Readers: the in-process ShardReader (label join, whole videos, truncation, batches) and the Ray
Data reader (label join, whole videos per block, same views as in-process)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dynamix_core.data.images import decode_image
from dynamix_core.data.reader import ShardReader, read_dataset_manifest, read_label_table, to_batch
from dynamix_core.data.records import BadInputError, InputReport
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator
from test_ingest import ingest, make_luperson_nl, make_market

SMALL = TransformConfig(height=32, width=16, pad=2)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("videos")
    images = make_luperson_nl(tmp / "src", {1: 5, 2: 3, 4: 6, 7: 2})
    ingest(tmp / "src", tmp / "out", shard_max_count=8)
    return tmp / "out", images


def _label_table(path, rows: list[tuple[str, int, int]]) -> None:
    keys, pids, versions = zip(*rows)
    pq.write_table(pa.table({"key": list(keys), "pid": pa.array(pids, pa.int64()),
                             "version": pa.array(versions, pa.int64())}), path)


def test_label_table_keeps_the_highest_version(tmp_path):
    _label_table(tmp_path / "l.parquet", [("a", 5, 2), ("a", 7, 3), ("b", 1, 1), ("a", 9, 1), ("b", 4, 0)])
    assert read_label_table(tmp_path / "l.parquet") == {"a": 7, "b": 1}


def test_label_join_overrides_pid(video_set, tmp_path):
    out, _ = video_set
    keys = read_dataset_manifest(out).column("key").to_pylist()
    _label_table(tmp_path / "l.parquet", [(keys[0], 100, 1), (keys[0], 101, 2), (keys[3], 300, 1)])
    plain = {s.key: s.record.pid for s in ShardReader(out).iter_samples()}
    joined = {s.key: s.record.pid for s in ShardReader(out, labels=tmp_path / "l.parquet").iter_samples()}
    assert joined == {**plain, keys[0]: 101, keys[3]: 300}


def test_iter_videos_refuses_a_multi_camera_set(tmp_path):
    make_market(tmp_path / "src", per_folder=2)
    ingest(tmp_path / "src", tmp_path / "out")
    with pytest.raises(BadInputError, match="single-camera"):
        next(ShardReader(tmp_path / "out").iter_videos())


def test_tar_cut_at_a_member_boundary_is_reported(video_set, tmp_path):
    import shutil

    out, _ = video_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = read_dataset_manifest(copy).to_pylist()
    first_shard = [r for r in manifest if r["shard"] == manifest[0]["shard"]]
    tar = copy / first_shard[0]["shard"]
    # cut right after the second sample's json member: a well-formed but shorter tar
    end_of_json = first_shard[2]["offset"] - 512
    tar.write_bytes(tar.read_bytes()[:end_of_json])
    report = InputReport()
    got = list(ShardReader(copy, report=report).iter_samples([first_shard[0]["shard"]]))
    assert len(got) == 2
    assert [p.reason.split(":")[0] for p in report.problems] == ["truncated tar"]


def test_to_batch_shapes_and_seeded_views(video_set):
    out, _ = video_set
    samples = list(ShardReader(out).iter_samples())[:4]
    view = ViewTransform(SMALL, "standard")
    batch = to_batch(samples, view, seed=3)
    assert batch["image"].shape == (4, 3, 32, 16) and batch["image"].dtype == torch.float32
    assert batch["pid"].dtype == torch.int64 and batch["pid"].tolist() == [s.record.pid for s in samples]
    one = view(decode_image(samples[2].data, (32, 16)), sample_generator(3, samples[2].key, "standard"))
    torch.testing.assert_close(batch["image"][2], one, rtol=0, atol=0)  # independent of position in the batch


@pytest.mark.ray
def test_ray_reader_joins_labels_and_keeps_videos_whole(video_set, tmp_path, ray_local):
    from pipelines.readers import iter_torch_batches, read_shards

    out, images = video_set
    manifest = read_dataset_manifest(out).to_pylist()
    relabeled = {manifest[1]["key"]: 42, manifest[-1]["key"]: 43}
    _label_table(tmp_path / "l.parquet", [(k, p, 1) for k, p in relabeled.items()])
    ds = read_shards(out, labels=tmp_path / "l.parquet", views=("standard", "strong"), transform=SMALL, seed=5,
                     workers=1)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))

    rows = {}
    videos_per_block = []
    for block in blocks:
        videos_per_block.append(set(block["video_id"].tolist()))
        for i, key in enumerate(block["key"]):
            rows[key] = {name: block[name][i] for name in block}
    assert set(rows) == {r["key"] for r in manifest}
    seen = [v for vids in videos_per_block for v in vids]
    assert len(seen) == len(set(seen)) == 4  # each video in exactly one block: whole
    for r in manifest:
        assert rows[r["key"]]["pid"] == relabeled.get(r["key"], r["pid"])
    key = manifest[0]["key"]
    raw = images[key.removeprefix("luperson_nl_train_")]
    for view, column in (("standard", "image"), ("strong", "image_strong")):
        want = ViewTransform(SMALL, view)(decode_image(raw, (32, 16)), sample_generator(5, key, view))
        np.testing.assert_array_equal(rows[key][column], want.numpy())  # same view as in-process

    batch = next(iter(iter_torch_batches(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 16) and batch["pid"].dtype == torch.int64
