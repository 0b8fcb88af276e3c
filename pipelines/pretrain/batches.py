"""Pre-training batches on one worker: the images of the videos the sampler holds, and a background
thread that turns sampler plans into two augmented views per image.

The single-camera stream is the training's (:class:`pipelines.train.data.VideoFeed` over this rank's
Ray Data shard of whole videos, labels unused); :class:`BufferedImages` keeps the encoded images of
exactly the videos the :class:`~dynamix_core.sampling.UnlabeledImageSampler` buffers, and brings
them back from the shards after a restore.

Shape legend: B images per batch, C channels, H/W image size.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow.parquet as pq
import torch

from dynamix_core.data.transforms import TransformConfig
from dynamix_core.pretrain.views import TwoViews
from dynamix_core.sampling import UnlabeledImageSampler, VideoSamples
from pipelines.train.data import VideoFeed, load_video_images, video_rows


class BufferedImages:
    """Encoded images by video, for the videos handed out by ``feed`` that the sampler still holds."""

    def __init__(self, feed: VideoFeed):
        self.feed = feed
        self.images: dict[int, dict[str, bytes]] = {}

    def stream(self, position: int) -> Iterator[VideoSamples]:
        """The sampler's video stream: the feed's videos, their images kept here."""
        for video in self.feed(position):
            self.images[int(video.video_id)] = self.feed.images[int(video.video_id)]
            yield video

    def keep_only(self, video_ids) -> None:
        for vid in set(self.images) - set(video_ids):
            del self.images[vid]

    def restore(self, index_path: str, video_ids: list[int]) -> None:
        """Read the images of ``video_ids`` from their shards (by the run's single-camera index):
        a restored sampler holds videos whose images the restarted stream will not hand out again."""
        if not video_ids:
            return
        index = pq.read_table(index_path, filters=[("video", "in", list(video_ids))])
        index = index.sort_by([("video", "ascending"), ("frame", "ascending"), ("key", "ascending")])
        for row in video_rows(index):
            loaded = load_video_images(row)
            self.images[int(row["video"])] = dict(zip(loaded["keys"], loaded["images"]))
        missing = set(video_ids) - set(self.images)
        if missing:
            raise FileNotFoundError(f"{index_path}: no rows for buffered videos {sorted(missing)[:5]}")

    def __getitem__(self, video_and_key: tuple[int, str]) -> bytes:
        video, key = video_and_key
        return self.images[video][key]


@dataclass
class PairBatch:
    view1_BCHW: torch.Tensor
    view2_BCHW: torch.Tensor


class PairProducer:
    """A background thread: sampler plan -> two views of every image (views seeded by (seed, step,
    key), so a resumed run sees the same batches); ``get()`` returns a batch and the time it blocked.
    Sampler states from just before checkpoint steps are kept for :meth:`state_at`."""

    def __init__(self, sampler: UnlabeledImageSampler, images: BufferedImages, view1: TransformConfig,
                 view2: TransformConfig, *, seed: int, prefetch: int = 2, threads: int = 2,
                 snapshot_at: Callable[[int], bool] = lambda step: False):
        self.sampler, self.images, self.seed = sampler, images, seed
        self.views = TwoViews(view1, view2)
        self.snapshot_at = snapshot_at
        self.snapshots: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pretrain-batches", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    step = self.sampler.step
                    if self.snapshot_at(step):
                        self.snapshots[step] = self.sampler.state_dict()
                    refs, video_ids = self.sampler.next_batch()
                    data = [self.images[int(v), r] for v, r in zip(video_ids, refs)]
                    self.images.keep_only(self.sampler.buffered_video_ids())
                self.images.feed.note_progress()
                step_seed = self.seed + 7919 * step
                views = list(self.pool.map(lambda item: self.views(*item, step_seed), zip(data, refs)))
                batch = PairBatch(torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views]))
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

    def get(self) -> tuple[PairBatch, float]:
        t0 = time.perf_counter()
        batch = self.queue.get()
        if batch is None:
            raise RuntimeError(f"pre-training batch producer failed: {self.error!r}") from self.error
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
