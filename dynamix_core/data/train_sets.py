"""Training data on one worker: the multi-camera set in memory, this rank's videos of the run's index
and the seekable single-camera feed of whole videos the sampler draws from. Ray-free: the training,
clustering and pre-training workers share it (the Ray Data reader of the stream and the thread that
turns sampler plans into tensors are in :mod:`pipelines.train.data`).

Identity space (rows of the centroid bank): multi-camera identities ``0 .. M-1`` (sorted
``(dataset, source_pid)`` of every multi-camera train set), then single-camera identities
``M + label`` where ``label`` is the pid of the current label table (tracker ids at version 0 for
DynaMix, DBSCAN pseudo-labels for ReMix).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamix_core.data.reader import read_dataset_manifest
from dynamix_core.data.records import IdentityMap
from dynamix_core.data.run_index import read_video, read_video_addresses, videos_path
from dynamix_core.data.shards import read_members  # validates each tar header before reading
from dynamix_core.errors import StopRun
from dynamix_core.sampling import VideoSamples


@dataclass
class MultiCameraSet:
    """Every multi-camera train image in memory (encoded bytes) with global bank ids and cameras."""

    keys: list[str]
    data: list[bytes]
    pid: np.ndarray  # bank id 0..M-1
    camid: np.ndarray  # global camera id
    dataset: np.ndarray  # dataset name per image
    num_identities: int
    shards: list[str] | None = None  # the tar each image was read from (named when one does not decode)

    @classmethod
    def load(cls, roots: list[str]) -> "MultiCameraSet":
        from dynamix_core import storage

        tables = []
        for root in roots:
            t = read_dataset_manifest(root).filter(pc.equal(pc.field("split"), "train"))
            if t.num_rows == 0:
                raise FileNotFoundError(f"{root}: no train-split images in this shard set (data.multi needs a train split)")
            tables.append(t.append_column("root", pa.array([str(root)] * t.num_rows)))
        table = pa.concat_tables(tables)
        names: dict[str, str] = {}
        for root, t in zip(roots, tables):
            for ds in set(t["dataset"].to_pylist()):
                if names.setdefault(ds, root) != root:
                    raise ValueError(
                        f"data.multi: {names[ds]} and {root} both hold dataset {ds!r}; identities would be merged. "
                        "Ingest each set under its own name (dynamix ingest --dataset NAME)")
        rows = table.select(["key", "dataset", "source_pid", "source_camid", "shard", "offset", "size", "root"]).to_pylist()
        pid_map = IdentityMap((r["dataset"], r["source_pid"]) for r in rows)
        cam_map = IdentityMap((r["dataset"], r["source_camid"]) for r in rows)
        data: list[bytes] = []
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(rows):  # a root may be a URI (s3://...): its shards are read by ranged GETs
            by_shard.setdefault(storage.join(r["root"], r["shard"]), []).append(i)
        data = [b""] * len(rows)
        for tar, idx in by_shard.items():
            for i, blob in zip(idx, read_members(tar, [rows[i]["offset"] for i in idx], [rows[i]["size"] for i in idx])):
                data[i] = blob
        return cls(
            keys=[r["key"] for r in rows], data=data,
            pid=np.array([pid_map[(r["dataset"], r["source_pid"])] for r in rows], dtype=np.int64),
            camid=np.array([cam_map[(r["dataset"], r["source_camid"])] for r in rows], dtype=np.int64),
            dataset=np.array([r["dataset"] for r in rows]),
            num_identities=len(pid_map),
            shards=[storage.join(r["root"], r["shard"]) for r in rows],
        )


class RankVideos:
    """This rank's videos (``video % world_size == rank``) in index order: one entry per video (its
    index rows ``row_start .. row_start + count - 1`` and its shard), nothing per image. The keys,
    offsets and sizes of a video's images are read from the index when the video is streamed."""

    def __init__(self, index_path: str | Path, video: np.ndarray, row_start: np.ndarray, count: np.ndarray,
                 tar: list[str]):
        self.index_path = str(index_path)
        self.video = np.asarray(video, dtype=np.int64)
        self.row_start = np.asarray(row_start, dtype=np.int64)
        self.count = np.asarray(count, dtype=np.int64)
        self.tar = tar
        self._ordinal = {int(v): i for i, v in enumerate(self.video)}

    @classmethod
    def load(cls, index_path: str | Path, rank: int, world_size: int) -> "RankVideos":
        from dynamix_core import storage

        t = storage.read_table(videos_path(index_path))
        mine = t.filter(pa.array(t["video"].to_numpy() % world_size == rank))
        return cls(index_path, mine["video"].to_numpy(), mine["row_start"].to_numpy(), mine["count"].to_numpy(),
                   mine["tar"].to_pylist())

    def __len__(self) -> int:
        return len(self.video)

    def ordinal(self, video: int) -> int | None:
        return self._ordinal.get(int(video))

    def rows(self, i: int) -> np.ndarray:
        """Index rows (label addresses) of the ``i``-th video."""
        return np.arange(self.row_start[i], self.row_start[i] + self.count[i], dtype=np.int64)

    def item(self, i: int) -> dict:
        return {"video": int(self.video[i]), "row_start": int(self.row_start[i]), "count": int(self.count[i]),
                "tar": self.tar[i]}


def local_video_stream(videos: RankVideos, position: int) -> Iterator[tuple[int, list[str], list[bytes]]]:
    """``(position, keys, images)`` from ``position`` on, read in this process one video at a time."""
    n = len(videos)
    for pos in itertools.count(position):
        yield (pos, *read_video(videos.index_path, videos.item(pos % n)))


def local_video_addresses(videos: RankVideos, position: int) -> Iterator[tuple[int, list[str], tuple]]:
    """``(position, keys, (offsets, sizes))`` from ``position`` on: where each video's images lie in
    its shard, read from the run's index only (the stream of a feed with ``reads="planned"``)."""
    n = len(videos)
    for pos in itertools.count(position):
        keys, offsets, sizes = read_video_addresses(videos.index_path, videos.item(pos % n))
        yield pos, keys, (offsets, sizes)


#: bytes between two planned images of one shard up to which they are fetched by one GET
PLANNED_GAP = 0


class VideoFeed:
    """This rank's single-camera stream (the sampler's ``VideoStream``), seekable.

    Position ``p`` is the video ``videos[p % n]`` of pass ``p // n``: opening the stream at a
    checkpoint's position reads nothing that came before it. ``stream`` reads the videos from a
    position on (:func:`pipelines.train.data.ray_video_stream` in a training worker: Ray Data tasks read ahead;
    :func:`local_video_stream` by default). Labels come from ``labels`` (int32, the single identity of
    every row of the run's index, -1 = none; None = no labels at all: pre-training) when a video
    enters the stream. A streamed video's images go into an LRU cache of ``cache_videos`` videos;
    a buffered video that left the cache (or was restored from a checkpoint into the sampler's
    buffer) is read again on its own, so no eviction can lose a buffered video. What this feed
    holds grows with its videos and the cache, not with the images of the pass.

    ``reads`` says what is read of a video: ``"videos"``, its whole images as the stream hands them
    out; ``"planned"``, only where they lie (the stream is :func:`local_video_addresses`, the index's
    rows), and then only the images the sampler planned into a batch (:meth:`read_images`: one ranged
    read per image of a shard, ``read_threads`` at once). A tracker's video holds hundreds of images
    and a batch uses a few dozen of each: reading whole videos reads each used image's bytes many
    times over (``benchmarks/bench_stream_reads.py``)."""

    #: videos handed out in a row without a batch being planned, in passes over this rank's videos,
    #: before the feed gives up: labels cannot change meanwhile (they are applied between steps,
    #: and the step is waiting for this batch)
    max_idle_passes = 3

    def __init__(self, videos: RankVideos | None, labels: np.ndarray | None, bank_offset: int, cache_videos: int = 256,
                 stream: Callable[[RankVideos, int], Iterator[tuple]] | None = None, reads: str = "videos",
                 read_threads: int = 8, read_gap: int = PLANNED_GAP):
        if reads not in ("videos", "planned"):
            raise ValueError(f"data.single_reads: {reads!r} is not one of ['videos', 'planned']")
        self.reads, self.read_threads, self.read_gap = reads, read_threads, read_gap
        stream = stream or (local_video_addresses if reads == "planned" else local_video_stream)
        self.videos = videos if videos is not None else RankVideos("", [], [], [], [])
        self.labels = labels
        self.bank_offset = bank_offset
        self.cache_videos = cache_videos
        self.stream = stream
        self.images: OrderedDict[int, dict[str, bytes]] = OrderedDict()
        self.lock = threading.Lock()
        self.videos_read = 0  # videos read on their own (cache misses), not by the stream
        self.first_position = None  # the first position the stream read (a resume must not re-read the past)
        self.progress = 0  # batches planned so far (see max_idle_passes)
        self._open: "weakref.WeakSet" = weakref.WeakSet()  # streams handed out (closed by close())

    def close(self) -> None:
        """End the streams handed out (a Ray Data stream stops its reads while Ray is still up;
        left to the garbage collector it would try after Ray is gone). Call once the consumer
        thread has stopped."""
        for gen in list(self._open):
            try:
                gen.close()
            except ValueError:  # still running in a thread that did not stop: it ends with the process
                pass

    def note_progress(self) -> None:
        """Called when a batch was planned: the stream is not stuck."""
        self.progress += 1

    def __call__(self, position: int) -> Iterator[VideoSamples]:
        gen = self._samples(position)
        self._open.add(gen)
        return gen

    def _samples(self, position: int) -> Iterator[VideoSamples]:
        num_videos = len(self.videos)
        if num_videos == 0:
            return
        idle, seen_progress = 0, self.progress
        for pos, keys, images in self.stream(self.videos, position):
            if self.first_position is None:
                self.first_position = pos
            if self.progress != seen_progress:
                idle, seen_progress = 0, self.progress
            elif idle >= self.max_idle_passes * num_videos:
                labeled = sum(bool((self._labels_of(i) >= 0).any()) for i in range(num_videos))
                raise StopRun(  # no restart can fill it: Ray Train does not retry it (pipelines.train.failures)
                    f"single-camera stream: {self.max_idle_passes} full passes over this rank's {num_videos} videos "
                    f"({labeled} of them labelled) did not fill a batch; the sampler needs more labelled videos "
                    "per rank than exist: lower sampler.num_videos / sampler.ids_per_video, or use fewer workers")
            idle += 1
            i = pos % num_videos
            video = int(self.videos.video[i])
            if self.reads == "planned":  # where the images lie, not their bytes
                offsets, sizes = images
                self._cache(video, {k: (int(o), int(z)) for k, o, z in zip(keys, offsets, sizes)})
            else:
                self._cache(video, dict(zip(keys, images)))
            labels = self._labels_of(i)
            pids = np.where(labels >= 0, labels + self.bank_offset, -1)
            yield VideoSamples(video_id=video, refs=np.array(keys), pids=pids)

    def _labels_of(self, i: int) -> np.ndarray:
        """Labels of the ``i``-th video's images (all -1 without labels: pre-training)."""
        if self.labels is None:
            return np.full(int(self.videos.count[i]), -1, dtype=np.int64)
        s = self.videos.row_start[i]
        return self.labels[s:s + self.videos.count[i]].astype(np.int64)

    def video_rows(self, video: int) -> np.ndarray | None:
        """Index rows (label addresses) of one of this rank's videos in stream order (None for a
        video of another rank)."""
        i = self.videos.ordinal(video)
        return None if i is None else self.videos.rows(i)

    def _cache(self, video: int, images: dict[str, bytes]) -> None:
        with self.lock:
            self.images[video] = images
            self.images.move_to_end(video)
            while len(self.images) > self.cache_videos:
                self.images.popitem(last=False)

    def shard_of(self, video: int) -> str:
        """The tar that holds ``video`` (one of this rank's videos)."""
        i = self.videos.ordinal(video)
        return self.videos.tar[i] if i is not None else "?"

    def read_images(self, wanted: list[tuple[int, str]]) -> list[bytes]:
        """Encoded bytes of each ``(video, key)``; with ``reads="planned"`` these images alone are read,
        shard by shard, one ranged read each."""
        if self.reads == "videos":
            return [self.image(video, key) for video, key in wanted]
        by_tar: dict[str, list[tuple[int, int, int]]] = {}
        for n, (video, key) in enumerate(wanted):
            offset, size = self._address(int(video), key)
            by_tar.setdefault(self.shard_of(int(video)), []).append((n, offset, size))
        out: list[bytes] = [b""] * len(wanted)

        def read(tar: str) -> None:
            items = by_tar[tar]
            data = read_members(tar, [o for _, o, _ in items], [z for _, _, z in items], gap=self.read_gap,
                                threads=self.read_threads)
            for (n, _, _), blob in zip(items, data):
                out[n] = blob

        if len(by_tar) > 1 and self.read_threads > 1:  # the shards' reads at once, too
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(len(by_tar), self.read_threads)) as pool:
                list(pool.map(read, by_tar))
        else:
            for tar in by_tar:
                read(tar)
        return out

    def _address(self, video: int, key: str) -> tuple[int, int]:
        """Offset and size of image ``key`` of ``video`` in its shard (``reads="planned"``)."""
        return self._video_entry(video)[key]

    def image(self, video: int, key: str) -> bytes:
        """Encoded bytes of image ``key`` of ``video`` (read with its whole video on a cache miss)."""
        if self.reads == "planned":
            return self.read_images([(video, key)])[0]
        return self._video_entry(video)[key]

    def _video_entry(self, video: int) -> dict:
        """The cached ``key -> bytes`` (``reads="videos"``) or ``key -> (offset, size)`` (``"planned"``)
        of one of this rank's videos; on a miss the whole video, or its index rows, read again."""
        with self.lock:
            entry = self.images.get(video)
            if entry is not None:
                self.images.move_to_end(video)
                return entry
        i = self.videos.ordinal(video)
        if i is None:
            raise KeyError(f"video {video} is not one of this rank's videos")
        if self.reads == "planned":
            keys, offsets, sizes = read_video_addresses(self.videos.index_path, self.videos.item(i))
            entry = {k: (int(o), int(z)) for k, o, z in zip(keys, offsets, sizes)}
        else:
            keys, data = read_video(self.videos.index_path, self.videos.item(i))
            entry = dict(zip(keys, data))
        self.videos_read += 1
        self._cache(video, entry)
        return entry
        i = self.videos.ordinal(video)
        if i is None:
            raise KeyError(f"video {video} is not one of this rank's videos")
        keys, data = read_video(self.videos.index_path, self.videos.item(i))
        self.videos_read += 1
        images = dict(zip(keys, data))
        self._cache(video, images)
        return images[key]
