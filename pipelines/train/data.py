"""Training data on one worker: the multi-camera set in memory, the single-camera stream of whole
videos, the identity space of the centroid bank, and a background thread that turns sampler plans
into augmented tensors.

Identity space (rows of the centroid bank): multi-camera identities ``0 .. M-1`` (sorted
``(dataset, source_pid)`` of every multi-camera train set), then single-camera identities
``M + label`` where ``label`` is the pid of the current label table (tracker ids at version 0 for
DynaMix, DBSCAN pseudo-labels for ReMix).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dynamix_core.data.images import decode_image
from dynamix_core.errors import StopRun
from dynamix_core.data.reader import read_dataset_manifest
from dynamix_core.data.records import IdentityMap
from dynamix_core.data.shards import read_members  # validates each tar header before reading
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator
from dynamix_core.sampling import BatchPlan, VideoSamples
from dynamix_core.training import StepBatch
from pipelines.train.stream import read_video, read_video_batch


#: what a training worker does with an image that does not decode (``data.bad_images``)
BAD_IMAGE_POLICIES = ("stop", "skip")


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
        from pipelines.train.index import videos_path

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


def ray_video_stream(videos: RankVideos, position: int, window: int = 64, concurrency: int = 2,
                     videos_per_task: int = 8) -> Iterator[tuple[int, list[str], list[bytes]]]:
    """``(position, keys, images)`` from ``position`` on, read by Ray Data tasks ahead of the consumer.

    Positions go out in windows of ``window`` videos, each one Ray Data dataset (``from_items`` of
    per-video items carrying only the row range and shard, then ``map_batches`` read tasks); while
    one window is consumed the next one is already running, so the trainer holds and the tasks
    read at most two windows ahead, whatever the consumer's pace (a bound in videos, not bytes:
    a read-ahead of thousands of videos would take the CPUs the training needs). Rows are handed
    out in position order whatever order the tasks finish in (Ray Data's own ``preserve_order``
    made the stream 2.7x slower on this 2-core box). The tasks ask for no CPU (the trainers hold
    the cluster's CPUs; reading is I/O), and at most ``concurrency`` run at once per window."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    n = len(videos)

    def start(first: int):
        """Start the window from position ``first``: its iterator and first row (the execution
        runs on in Ray Data's own thread once the first row is asked for)."""
        pos = np.arange(first, first + window, dtype=np.int64)
        i = pos % n
        ds = ray.data.from_items([{"pos": int(p), "video": int(videos.video[k]), "row_start": int(videos.row_start[k]),
                                   "count": int(videos.count[k]), "tar": videos.tar[k]} for p, k in zip(pos, i)],
                                 override_num_blocks=max(1, window // videos_per_task))
        ds = ds.map_batches(read_video_batch, fn_kwargs={"index_path": videos.index_path}, batch_size=videos_per_task,
                            batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=concurrency))
        rows = iter(ds.iter_rows())
        return rows, next(rows, None)

    helper = ThreadPoolExecutor(1, thread_name_prefix="video-stream")
    rows = None
    upcoming = None
    try:
        first = position
        upcoming = helper.submit(start, first)
        while True:
            rows, row = upcoming.result()
            upcoming = helper.submit(start, first + window)  # the next window reads while this one is used
            pending: dict[int, bytes] = {}
            expect = first
            while row is not None:
                pending[int(row["pos"])] = row["data"]
                while expect in pending:
                    keys, images = pickle.loads(pending.pop(expect))
                    yield expect, keys, images
                    expect += 1
                row = next(rows, None)
            if expect != first + window:
                raise RuntimeError(f"single-camera stream: Ray Data returned {expect - first} of {window} videos")
            first += window
    finally:
        # stop both windows' executions now (left to the garbage collector, an execution waiting
        # for its consumer can keep the process from exiting, and one still running when Ray shuts
        # down makes Ray's core worker abort). The next window may be starting in the helper thread
        # right now: wait for it (its first row: seconds at most), then close it too.
        helper.shutdown(wait=True, cancel_futures=True)
        windows = [rows]
        if upcoming is not None and upcoming.done() and not upcoming.cancelled() and upcoming.exception() is None:
            windows.append(upcoming.result()[0])
        for it in windows:
            if hasattr(it, "close"):
                it.close()


class VideoFeed:
    """This rank's single-camera stream (the sampler's ``VideoStream``), seekable.

    Position ``p`` is the video ``videos[p % n]`` of pass ``p // n``: opening the stream at a
    checkpoint's position reads nothing that came before it. ``stream`` reads the videos from a
    position on (:func:`ray_video_stream` in a training worker: Ray Data tasks read ahead;
    :func:`local_video_stream` by default). Labels come from ``labels`` (int32, the single identity of
    every row of the run's index, -1 = none; None = no labels at all: pre-training) when a video
    enters the stream. A streamed video's images go into an LRU cache of ``cache_videos`` videos;
    a buffered video that left the cache (or was restored from a checkpoint into the sampler's
    buffer) is read again on its own, so no eviction can lose a buffered video. What this feed
    holds grows with its videos and the cache, not with the images of the pass."""

    #: videos handed out in a row without a batch being planned, in passes over this rank's videos,
    #: before the feed gives up: labels cannot change meanwhile (they are applied between steps,
    #: and the step is waiting for this batch)
    max_idle_passes = 3

    def __init__(self, videos: RankVideos | None, labels: np.ndarray | None, bank_offset: int, cache_videos: int = 256,
                 stream: Callable[[RankVideos, int], Iterator[tuple]] = local_video_stream):
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

    def image(self, video: int, key: str) -> bytes:
        """Encoded bytes of image ``key`` of ``video`` (read with its whole video on a cache miss)."""
        with self.lock:
            images = self.images.get(video)
            if images is not None:
                self.images.move_to_end(video)
                return images[key]
        i = self.videos.ordinal(video)
        if i is None:
            raise KeyError(f"video {video} is not one of this rank's videos")
        keys, data = read_video(self.videos.index_path, self.videos.item(i))
        self.videos_read += 1
        images = dict(zip(keys, data))
        self._cache(video, images)
        return images[key]


class BadImageError(ValueError):
    """An image of a shard that does not decode; the message names the shard and the key."""


class BatchProducer:
    """A background thread that asks the sampler for the next plan and decodes + augments it, so
    the training step does not wait for JPEG decoding; ``get()`` reports the time it blocked.

    An image that does not decode stops the run with a :class:`BadImageError` naming its shard and
    key (``bad_images="stop"``), or is left out of its batch, printed in one line and counted in
    ``bad_images_skipped`` (``"skip"``)."""

    def __init__(self, sampler, multi: MultiCameraSet, feed: VideoFeed | None, transform: TransformConfig,
                 seed: int, prefetch: int = 2, threads: int = 2, snapshot_at: Callable[[int], bool] = lambda s: False,
                 bad_images: str = "stop"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images: {bad_images!r} is not one of {list(BAD_IMAGE_POLICIES)}")
        self.bad_images = bad_images
        self.bad_images_skipped = 0
        self.sampler = sampler  # a MixedBatchSampler (or anything with next_batch/state_dict/step)
        self.snapshot_at = snapshot_at
        self.snapshots: dict[int, dict] = {}
        self.multi = multi
        self.multi_index = {k: i for i, k in enumerate(multi.keys)}
        self.feed = feed
        self.standard = ViewTransform(transform, "standard")
        self.strong = ViewTransform(transform, "strong")
        self.size = (transform.height, transform.width)
        self.seed = seed
        self.lock = threading.Lock()  # guards the sampler (label updates arrive from the main thread)
        self.pool = ThreadPoolExecutor(threads)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-producer", daemon=True)
        self.thread.start()

    def _decode_one(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        data, key, step_seed, shard = item
        try:
            img = decode_image(data, self.size)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's unidentified/truncated/corrupt-stream errors
            text = f"{shard}: image {key} does not decode ({exc})"
            if self.bad_images == "stop":
                raise BadImageError(f"{text}; re-run `dynamix ingest` on its source to rewrite the shard, "
                                    f"check the set with `dynamix inspect --verify`, or set data.bad_images: skip") from None
            with self.lock:
                self.bad_images_skipped += 1
            print(f"[data] skipped: {text} ({self.bad_images_skipped} skipped so far)", flush=True)
            return None
        return (self.standard(img, sample_generator(step_seed, key, "standard")),
                self.strong(img, sample_generator(step_seed, key, "strong")))

    def _materialise(self, plan: BatchPlan, step: int) -> StepBatch:
        """Decode + augment; views are seeded by (seed, step, key), so a resumed run sees the same."""
        items, camid = [], []
        step_seed = self.seed + 7919 * step
        for ref in plan.multi_refs:
            i = self.multi_index[ref]
            items.append((self.multi.data[i], ref, step_seed, self.multi.shards[i] if self.multi.shards else "?"))
            camid.append(int(self.multi.camid[i]))
        for ref, vid in zip(plan.single_refs, plan.single_video_ids):
            items.append((self.feed.image(int(vid), ref), ref, step_seed, self.feed.shard_of(int(vid))))
            camid.append(-1 - int(vid))  # single-camera images: one camera per video, never a multi camera
        views = list(self.pool.map(self._decode_one, items))
        num_multi = len(plan.multi_refs)
        video = np.concatenate([np.full(num_multi, -1), np.asarray(plan.single_video_ids, dtype=np.int64)])
        pid = np.concatenate([plan.multi_pids, plan.single_pids]).astype(np.int64)
        kept = np.array([v is not None for v in views], dtype=bool)  # all but skipped bad images
        views = [v for v in views if v is not None]
        return StepBatch(
            standard_BCHW=torch.stack([v[0] for v in views]),
            strong_BCHW=torch.stack([v[1] for v in views]),
            pid_B=torch.as_tensor(pid[kept]),
            camid_B=torch.as_tensor(np.asarray(camid, dtype=np.int64)[kept]),
            is_single_B=torch.as_tensor(video[kept] >= 0),
            video_B=torch.as_tensor(video[kept]),
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    if self.snapshot_at(self.sampler.step):
                        # prefetching runs ahead of training: keep the sampler state as it was before
                        # planning this step, so a checkpoint at this step resumes exactly here
                        self.snapshots[self.sampler.step] = self.sampler.state_dict()
                    plan = self.sampler.next_batch()
                if self.feed is not None:
                    self.feed.note_progress()
                batch = self._materialise(plan, plan.step)
                while not self._stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the training loop by get()
            self.error = exc
            self.queue.put(None)

    def state_at(self, step: int) -> dict:
        """Sampler state from just before ``step``'s batch was planned (a checkpoint step)."""
        state = self.snapshots.pop(step)
        for old in [s for s in self.snapshots if s < step]:
            del self.snapshots[old]
        return state

    def get(self) -> tuple[StepBatch, float]:
        t0 = time.perf_counter()
        batch = self.queue.get()
        if batch is None:
            if isinstance(self.error, BadImageError):
                raise BadImageError(str(self.error))
            raise RuntimeError(f"batch producer failed: {self.error!r}") from self.error
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
