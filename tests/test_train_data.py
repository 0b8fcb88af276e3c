"""The training worker's data layer without Ray: the seekable single-camera stream (``VideoFeed``) and
the background ``BatchProducer``, on a real tiny SynthReID ingested into real shards.

Reference for the images: the shard tar read with :mod:`tarfile` (not the manifest's offsets the
feed uses); for resume: the batches of an uninterrupted producer."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_tiny_reid
from dynamix_core.config import load_config
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.sampling import MixedBatchSampler, SamplerConfig
from pipelines.train.data import BatchProducer, MultiCameraSet, VideoFeed, rank_video_rows, single_camera_index

TOTAL_STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_reid(tmp_path_factory.mktemp("tinydata"), num_videos=8)
    shards = root / "shards"
    index = single_camera_index([str(shards / "synth_video")])
    index_path = root / "index.parquet"
    pq.write_table(index, index_path)
    multi = MultiCameraSet.load([str(shards / "synth_m0"), str(shards / "synth_m1")])
    labels = dict(zip(index["key"].to_pylist(), index["label"].to_pylist()))
    return {"root": root, "index_path": index_path, "multi": multi, "labels": labels, "keys": index["key"].to_pylist()}


def by_row(tiny, labels: dict[str, int]) -> np.ndarray:
    """The feed's label array (one int32 per row of the run's index) from key -> label."""
    return np.array([labels[k] for k in tiny["keys"]], dtype=np.int32)


def _sampler_cfg(**extra) -> SamplerConfig:
    base = {"num_multi_ids": 4, "multi_images_per_id": 2, "num_videos": 2, "ids_per_video": 2,
            "single_images_per_id": 2, "video_buffer_size": 3, "max_video_uses": 2}
    return load_config(SamplerConfig, None, [f"{k}={v}" for k, v in {**base, **extra}.items()])


def _make(tiny, *, rank=0, world=1, labels=None, cache_videos=12, state=None, snapshot_at=lambda s: False, **cfg):
    """feed + sampler (+ restored state) + producer, built in the worker's order."""
    multi = tiny["multi"]
    feed = VideoFeed(rank_video_rows(tiny["index_path"], rank, world), by_row(tiny, tiny["labels"] if labels is None else labels),
                     multi.num_identities, cache_videos=cache_videos)
    sampler = MixedBatchSampler(_sampler_cfg(**cfg), refs=multi.keys, pids=multi.pid, camids=multi.camid,
                                datasets=multi.dataset, video_stream=feed, total_steps=TOTAL_STEPS,
                                rank=rank, world_size=world)
    if state is not None:
        sampler.load_state_dict(state)
    producer = BatchProducer(sampler, multi, feed, TransformConfig(height=32, width=16), seed=5, prefetch=2,
                             threads=1, snapshot_at=snapshot_at)
    return feed, sampler, producer


def _take(producer: BatchProducer, n: int) -> list:
    try:
        return [producer.get()[0] for _ in range(n)]
    finally:
        producer.close()


def _assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        for name in ("standard_BCHW", "strong_BCHW", "pid_B", "camid_B", "is_single_B", "video_B"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"batch {step}: {name} differs"


def test_feed_is_seekable_and_cycles_over_the_ranks_videos(tiny):
    video = pq.read_table(tiny["index_path"], columns=["video"])["video"].to_numpy()
    mine = sorted(set(video[video % 2 == 1].tolist()))  # rank 1 of 2
    feed = VideoFeed(rank_video_rows(tiny["index_path"], 1, 2), by_row(tiny, tiny["labels"]), bank_offset=0)
    for position in (0, 3, 1000 * len(mine) + 2):  # far into a long run: opening costs nothing
        got = [v.video_id for v in itertools.islice(feed(position), 2 * len(mine))]
        assert got == [mine[(position + i) % len(mine)] for i in range(2 * len(mine))]
    assert feed.videos_read == 0  # handing out videos reads no image; batches do
    # each image's row number is its position in the run's index (the address of its label)
    for row in feed.rows:
        assert [tiny["keys"][r] for r in row["rows"].tolist()] == list(row["keys"])
        assert feed.video_rows(row["video"]) is row["rows"]


def test_feed_images_equal_the_tar_members(tiny):
    rows = rank_video_rows(tiny["index_path"], 0, 1)
    feed = VideoFeed(rows, by_row(tiny, tiny["labels"]), bank_offset=0, cache_videos=1)
    row = rows[1]
    with tarfile.open(row["tars"][0]) as tar:
        members = {m.name.split(".", 1)[0]: m for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".jpeg"))}
        for key in row["keys"][:3]:
            assert feed.image(row["video"], key) == tar.extractfile(members[key]).read()
    # labels enter with the bank offset; unlabelled images stay -1
    samples = next(feed(1))
    want = [tiny["labels"][k] + 7 if tiny["labels"][k] >= 0 else -1 for k in row["keys"]]
    assert next(VideoFeed(rows, by_row(tiny, tiny["labels"]), bank_offset=7)(1)).pids.tolist() == want
    assert samples.video_id == row["video"]


def test_buffered_videos_survive_cache_eviction(tiny):
    """A cache smaller than the sampler's buffer (or a stream passing many unlabelled videos) once
    dropped buffered videos: the next batch drawing one died with KeyError."""
    labels = dict(tiny["labels"])
    rows = rank_video_rows(tiny["index_path"], 0, 1)
    for row in rows[::2]:  # every other video unlabelled: the sampler skips them, the stream passes them
        labels.update({k: -1 for k in row["keys"]})
    feed, _, producer = _make(tiny, labels=labels, cache_videos=1)
    batches = _take(producer, 8)
    assert all(b.pid_B.shape[0] == 16 for b in batches)
    assert feed.videos_read > len(feed.images)  # evicted videos were read again, not lost


def test_resume_gives_the_batches_of_the_uninterrupted_run(tiny):
    """Checkpoint at step 6 (several passes over rank 0's 4 videos), restore into a fresh feed +
    sampler + producer: the batches from step 6 on are those the uninterrupted run drew."""
    checkpoint = 6
    _, _, producer = _make(tiny, rank=0, world=2, snapshot_at=lambda s: s == checkpoint)
    full = _take(producer, TOTAL_STEPS)
    state = producer.state_at(checkpoint)
    assert state["single"]["position"] > 4  # the stream is past its first pass
    feed, _, resumed = _make(tiny, rank=0, world=2, state=state)
    after = _take(resumed, TOTAL_STEPS - checkpoint)
    _assert_same_batches(after, full[checkpoint:])
    # only videos the resumed batches drew were read: nothing before the checkpoint was re-read
    drawn = {int(v) for b in after for v in b.video_B.tolist() if v >= 0}
    assert feed.videos_read == len(drawn)


def test_stream_without_enough_labelled_videos_fails_clearly(tiny):
    labels = {k: -1 for k in tiny["labels"]}
    first = rank_video_rows(tiny["index_path"], 0, 1)[0]
    labels.update({k: tiny["labels"][k] for k in first["keys"]})  # one labelled video; a batch needs 2
    _, _, producer = _make(tiny, labels=labels)
    with pytest.raises(RuntimeError, match="3 full passes over this rank's 8 videos \\(1 of them labelled\\)"):
        _take(producer, 1)


def test_a_feed_without_labels_hands_out_unlabelled_videos(tiny):
    """Pre-training streams the same videos with no labels at all (labels=None)."""
    rows = rank_video_rows(tiny["index_path"], 0, 1)
    first = next(VideoFeed(rows, None, bank_offset=0)(0))
    assert first.video_id == rows[0]["video"] and (first.pids == -1).all()
    assert list(first.refs) == list(rows[0]["keys"])
