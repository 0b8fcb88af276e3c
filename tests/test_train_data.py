"""The training worker's data layer: the run's index (built shard by shard), the seekable
single-camera stream (``VideoFeed`` over a local or a Ray Data stream) and the background
``BatchProducer``, on a real tiny SynthReID ingested into real shards.

References: for the index, the manifest read whole and numbered in the test; for the images, the
shard tar read with :mod:`tarfile` (not the manifest's offsets the feed uses); for resume, the
batches of an uninterrupted producer; for the Ray Data stream, the in-process one."""

from __future__ import annotations

import itertools
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_tiny_reid
from dynamix_core.config import load_config
from dynamix_core.data.run_index import videos_path
from dynamix_core.data.run_index_writer import write_single_camera_index
from dynamix_core.data.train_sets import MultiCameraSet, RankVideos, VideoFeed
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.sampling import MixedBatchSampler, SamplerConfig
from pipelines.train.data import BatchProducer, ray_video_stream

TOTAL_STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_reid(tmp_path_factory.mktemp("tinydata"), num_videos=8)
    shards = root / "shards"
    index_path = root / "index.parquet"
    write_single_camera_index([str(shards / "synth_video")], index_path)
    index = pq.read_table(index_path)
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


def _make(tiny, *, rank=0, world=1, labels=None, cache_videos=12, state=None, snapshot_at=lambda s: False,
          reads="videos", **cfg):
    """feed + sampler (+ restored state) + producer, built in the worker's order."""
    multi = tiny["multi"]
    feed = VideoFeed(RankVideos.load(tiny["index_path"], rank, world), by_row(tiny, tiny["labels"] if labels is None else labels),
                     multi.num_identities, cache_videos=cache_videos, reads=reads)
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


def test_index_rows_equal_a_reference_numbering_of_the_manifest(tiny):
    """Every single-camera image once, video/label numbered as the sorted (dataset, id) pairs, each
    video's rows contiguous in (frame, key) order, and the videos table pointing at them."""
    manifest = pq.read_table(tiny["root"] / "shards" / "synth_video" / "manifest.parquet").to_pylist()
    single = [r for r in manifest if r["domain"] == "single"]
    vid_of = {p: i for i, p in enumerate(sorted({(r["dataset"], str(r["video_id"])) for r in single}))}
    lab_of = {p: i for i, p in enumerate(sorted({(r["dataset"], r["source_pid"]) for r in single if r["source_pid"]}))}
    want = {r["key"]: (vid_of[(r["dataset"], str(r["video_id"]))],
                       lab_of.get((r["dataset"], r["source_pid"]), -1), r["frame"], r["offset"], r["size"])
            for r in single}
    index = pq.read_table(tiny["index_path"])
    got = {r["key"]: (r["video"], r["label"], r["frame"], r["offset"], r["size"]) for r in index.to_pylist()}
    assert index.num_rows == len(single) and got == want
    video = index["video"].to_numpy()
    videos = pq.read_table(videos_path(tiny["index_path"])).to_pylist()
    assert len(videos) == len(set(video.tolist()))  # contiguous: one run of rows per video
    for v in videos:
        rows = index.slice(v["row_start"], v["count"])
        assert set(rows["video"].to_pylist()) == {v["video"]} and set(rows["tar"].to_pylist()) == {v["tar"]}
        order = list(zip(rows["frame"].to_pylist(), rows["key"].to_pylist()))
        assert order == sorted(order)
    assert sum(v["count"] for v in videos) == index.num_rows


def test_index_of_a_manifest_with_a_split_shard_fails_clearly(tmp_path, tiny):
    import pyarrow as pa

    src = tiny["root"] / "shards" / "synth_video"
    manifest = pq.read_table(src / "manifest.parquet")
    bad = tmp_path / "bad"
    bad.mkdir()
    # rows of another shard in the middle of shard-000000's: not a manifest ingest writes
    shard = manifest["shard"].to_pylist()
    shard[3:6] = ["shard-000001.tar"] * 3
    pq.write_table(manifest.set_column(manifest.schema.get_field_index("shard"), "shard", pa.array(shard)),
                   bad / "manifest.parquet")
    with pytest.raises(ValueError, match="video 0 also has images in an earlier shard|not contiguous"):
        write_single_camera_index([str(bad)], tmp_path / "index.parquet")
    assert not (tmp_path / "index.parquet").exists() and not list(tmp_path.glob(".index*"))  # nothing half-written


def test_feed_is_seekable_and_cycles_over_the_ranks_videos(tiny):
    videos = pq.read_table(videos_path(tiny["index_path"]))["video"].to_numpy()
    mine = [int(v) for v in videos if v % 2 == 1]  # rank 1 of 2, in index order
    feed = VideoFeed(RankVideos.load(tiny["index_path"], 1, 2), by_row(tiny, tiny["labels"]), bank_offset=0)
    for position in (0, 3, 1000 * len(mine) + 2):  # far into a long run: opening costs nothing
        got = [v.video_id for v in itertools.islice(feed(position), 2 * len(mine))]
        assert got == [mine[(position + i) % len(mine)] for i in range(2 * len(mine))]
    assert feed.videos_read == 0  # the stream brought every image a batch could ask for
    # each image's row number is its position in the run's index (the address of its label)
    for v in mine:
        sample = next(s for s in feed(0) if s.video_id == v)
        assert [tiny["keys"][r] for r in feed.video_rows(v).tolist()] == list(sample.refs)
    assert feed.video_rows(int(videos[videos % 2 == 0][0])) is None  # another rank's video


def test_ray_data_stream_hands_out_what_the_local_stream_does(tiny, ray_local):
    """The worker's stream (Ray Data tasks reading ahead, in windows) against the in-process one:
    the same videos, keys and bytes, in position order, across window boundaries."""
    videos = RankVideos.load(tiny["index_path"], 0, 1)
    n = len(videos)
    local = list(itertools.islice(VideoFeed(videos, None, 0).stream(videos, 5), 3 * n))
    remote = list(itertools.islice(ray_video_stream(videos, 5, window=n + 1, videos_per_task=2), 3 * n))
    assert [p for p, _, _ in remote] == list(range(5, 5 + 3 * n))
    assert [(p, k, i) for p, k, i in remote] == [(p, k, i) for p, k, i in local]


def test_closing_the_ray_data_stream_stops_every_window_it_started(tiny, ray_local):
    """A stream closed right after a window ends has its next window already starting in its helper
    thread. Closing must stop that window too: an execution left running after ``close`` peeks
    task streams while the process shuts Ray down, and Ray's core worker aborts (seen in
    bench_stream_memory: "PeekObjectRefStream API can be used only when the stream has been created
    and not removed", and "The core worker has already been shutdown")."""
    import threading

    videos = RankVideos.load(tiny["index_path"], 0, 1)
    for _ in range(3):
        stream = ray_video_stream(videos, 0, window=3, videos_per_task=1)
        assert [p for p, _, _ in itertools.islice(stream, 3)] == [0, 1, 2]  # exactly one window
        stream.close()
        alive = [t.name for t in threading.enumerate()
                 if t.is_alive() and t.name.startswith(("StreamingExecutor-", "video-stream"))]
        assert not alive, f"still running after close(): {alive}"


def test_feed_images_equal_the_tar_members(tiny):
    videos = RankVideos.load(tiny["index_path"], 0, 1)
    feed = VideoFeed(videos, by_row(tiny, tiny["labels"]), bank_offset=0, cache_videos=1)
    video = int(videos.video[1])
    keys = [tiny["keys"][r] for r in videos.rows(1).tolist()]
    with tarfile.open(videos.tar[1]) as tar:
        members = {m.name.split(".", 1)[0]: m for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".jpeg"))}
        for key in keys[:3]:
            assert feed.image(video, key) == tar.extractfile(members[key]).read()  # read on its own: a miss
    assert feed.videos_read == 1
    # labels enter with the bank offset; unlabelled images stay -1
    samples = next(feed(1))
    want = [tiny["labels"][k] + 7 if tiny["labels"][k] >= 0 else -1 for k in keys]
    assert next(VideoFeed(videos, by_row(tiny, tiny["labels"]), bank_offset=7)(1)).pids.tolist() == want
    assert samples.video_id == video and list(samples.refs) == keys


def test_buffered_videos_survive_cache_eviction(tiny):
    """A cache smaller than the sampler's buffer (or a stream passing many unlabelled videos) once
    dropped buffered videos: the next batch drawing one died with KeyError."""
    labels = dict(tiny["labels"])
    videos = RankVideos.load(tiny["index_path"], 0, 1)
    for i in range(0, len(videos), 2):  # every other video unlabelled: the sampler skips them, the stream passes them
        labels.update({tiny["keys"][r]: -1 for r in videos.rows(i).tolist()})
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
    # nothing before the checkpoint was re-read: the stream opened at the checkpoint's position, and
    # only the videos the checkpoint's sampler buffer held were read on their own
    assert feed.first_position == state["single"]["position"]
    assert 0 < feed.videos_read <= len(state["single"]["buffer"])


def test_stream_without_enough_labelled_videos_fails_clearly(tiny):
    labels = {k: -1 for k in tiny["labels"]}
    first = RankVideos.load(tiny["index_path"], 0, 1).rows(0)
    labels.update({tiny["keys"][r]: tiny["labels"][tiny["keys"][r]] for r in first.tolist()})  # one labelled video; a batch needs 2
    _, _, producer = _make(tiny, labels=labels)
    with pytest.raises(RuntimeError, match="3 full passes over this rank's 8 videos \\(1 of them labelled\\)"):
        _take(producer, 1)


def test_a_feed_without_labels_hands_out_unlabelled_videos(tiny):
    """Pre-training streams the same videos with no labels at all (labels=None)."""
    videos = RankVideos.load(tiny["index_path"], 0, 1)
    first = next(VideoFeed(videos, None, bank_offset=0)(0))
    assert first.video_id == videos.video[0] and (first.pids == -1).all()
    assert list(first.refs) == [tiny["keys"][r] for r in videos.rows(0).tolist()]


def test_video_table_reads_a_chunk_as_the_whole_index_says(tiny, tmp_path):
    """The labeling coordinator holds only the per-video table and reads a chunk's rows from the index
    when it sends it: rows, videos, frames and the shard reads of any subset of videos equal those
    selected here from the whole index, and each read's members are that video's images in the tar."""
    from dynamix_core.data.run_index import VideoTable

    from pipelines.ingest import IngestConfig, run_ingest

    shards = tmp_path / "shards"  # the tiny videos again, a few videos per shard
    run_ingest(IngestConfig(root=tiny["root"] / "data" / "single" / "synth_video", out=shards, dataset="synth_video",
                            workers=0, shard_max_count=150), progress=False)
    index_path = tmp_path / "index.parquet"
    write_single_camera_index([str(shards)], index_path)
    table = VideoTable(index_path)
    whole = pq.read_table(index_path).to_pydict()
    assert len(set(whole["tar"])) >= 3
    assert table.video.tolist() == sorted(set(whole["video"]))
    rng = np.random.default_rng(0)
    for videos in (table.video[[3, 0, 5]], rng.permutation(table.video), table.video[:1]):
        chunk = table.read_chunk(videos)
        want = sorted((t, r) for r, (v, t) in enumerate(zip(whole["video"], whole["tar"])) if v in set(videos.tolist()))
        tars = [t for t, offs, _ in chunk["reads"] for _ in offs]
        got = list(zip(tars, chunk["rows"].tolist()))
        assert sorted(got) == want  # the videos' rows, each once, with its shard
        assert len(set(tars)) == len(chunk["reads"]) and got == sorted(got, key=lambda p: (tars.index(p[0]), p[1]))
        rows = chunk["rows"].tolist()  # shard by shard, index order inside a shard
        assert chunk["video"].tolist() == [whole["video"][r] for r in rows]
        assert chunk["frames"].tolist() == [whole["frame"][r] for r in rows]
        assert [(o, s) for _, offs, sizes in chunk["reads"] for o, s in zip(offs, sizes)] == \
            [(whole["offset"][r], whole["size"][r]) for r in rows]
    tar_path, offsets, sizes = table.read_chunk(table.video[2:3])["reads"][0]
    with tarfile.open(tar_path) as tar:
        by_offset = {m.offset_data: tar.extractfile(m).read() for m in tar.getmembers()}
    from dynamix_core.data.shards import read_members

    assert read_members(tar_path, offsets, sizes) == [by_offset[o] for o in offsets]
    with pytest.raises(KeyError, match="not in the run's index"):
        table.read_chunk(np.array([int(table.video.max()) + 1]))


class _CountingReads:
    """Bytes of the single-camera shards read through the storage layer (``read_ranges``: what a
    ranged GET would fetch, the tar headers included), wrapped around the real function."""

    def __init__(self, monkeypatch):
        from dynamix_core import storage

        self.bytes = 0
        real = storage.read_ranges

        def counting(uri, ranges, **kw):
            out = real(uri, ranges, **kw)
            if "synth_video" in str(uri):
                self.bytes += sum(len(b) for b in out)
            return out

        monkeypatch.setattr(storage, "read_ranges", counting)


def _image_sizes(tiny) -> dict[str, int]:
    """Size of every single-camera image in the tar, by key (read with :mod:`tarfile`)."""
    with tarfile.open(RankVideos.load(tiny["index_path"], 0, 1).tar[0]) as tar:
        return {m.name.rsplit(".", 1)[0]: m.size for m in tar.getmembers() if m.name.endswith(".jpg")}


def test_planned_reads_give_the_batches_of_whole_video_reads_and_read_only_what_they_use(tiny, monkeypatch):
    """``reads="planned"`` reads each batch's single-camera images, not their videos: the batches are
    those of whole-video reads, tensor for tensor, and the bytes read are exactly the planned images
    with their 512-byte tar headers, where whole videos read several times the images used."""
    from pipelines.train import data

    used: list[str] = []
    real = data.BatchProducer.materialise

    def noting(self, plan, step):
        used.extend(plan.single_refs)
        return real(self, plan, step)

    monkeypatch.setattr(data.BatchProducer, "materialise", noting)
    size = _image_sizes(tiny)
    counted = _CountingReads(monkeypatch)
    _, _, producer = _make(tiny, max_video_uses=1)
    whole = _take(producer, TOTAL_STEPS)
    whole_bytes, whole_used = counted.bytes, sum(size[k] for k in used)
    used.clear()
    counted.bytes = 0
    feed, _, producer = _make(tiny, max_video_uses=1, reads="planned")
    planned = _take(producer, TOTAL_STEPS)
    _assert_same_batches(planned, whole)
    assert sum(size[k] for k in used) == whole_used
    assert counted.bytes == sum(512 + size[k] for k in used)  # header + image of each planned image, nothing else
    assert whole_bytes >= 3 * whole_used, whole_bytes / whole_used  # the tiny videos: ~45 images, a few used
    assert all(isinstance(where, tuple) for v in feed.images.values() for where in v.values())  # no bytes held


def test_planned_reads_resume_with_the_batches_of_the_uninterrupted_run(tiny):
    """The checkpointed sampler buffer holds keys only; restored into a planned-reads feed, the
    buffered videos' addresses are read from the index and the batches continue as uninterrupted."""
    checkpoint = 5
    _, _, producer = _make(tiny, rank=1, world=2, snapshot_at=lambda s: s == checkpoint, reads="planned")
    full = _take(producer, TOTAL_STEPS)
    state = producer.state_at(checkpoint)
    feed, _, resumed = _make(tiny, rank=1, world=2, state=state, reads="planned")
    _assert_same_batches(_take(resumed, TOTAL_STEPS - checkpoint), full[checkpoint:])
    assert 0 < feed.videos_read <= len(state["single"]["buffer"])


def test_an_unknown_single_reads_value_is_named():
    with pytest.raises(ValueError, match="data.single_reads: 'some' is not one of"):
        VideoFeed(None, None, 0, reads="some")
