"""Pre-training batches on one worker: the images of the videos the sampler holds, and a background
thread that turns sampler plans into two augmented views per image.

The single-camera stream is the training's seekable :class:`dynamix_core.data.train_sets.VideoFeed` over
this rank's videos of the run index (labels unused): a resumed worker opens it at the checkpoint's
position, and the videos a restored :class:`~dynamix_core.sampling.UnlabeledImageSampler` buffers
are read again from their shards when a batch needs them.

Shape legend: B images per batch, C channels, H/W image size.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from dynamix_core.data.transforms import TransformConfig
from dynamix_core.pretrain.views import TwoViews
from dynamix_core.sampling import UnlabeledImageSampler
from dynamix_core.data.train_sets import VideoFeed


@dataclass
class PairBatch:
    view1_BCHW: torch.Tensor
    view2_BCHW: torch.Tensor


class PairProducer:
    """A background thread: sampler plan -> two views of every image (views seeded by (seed, step,
    key), so a resumed run sees the same batches); ``get()`` returns a batch and the time it blocked.
    Sampler states from just before checkpoint steps are kept for :meth:`state_at`."""

    def __init__(self, sampler: UnlabeledImageSampler, feed: VideoFeed, view1: TransformConfig,
                 view2: TransformConfig, *, seed: int, prefetch: int = 2, threads: int = 2,
                 snapshot_at: Callable[[int], bool] = lambda step: False):
        self.sampler, self.feed, self.seed = sampler, feed, seed
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
                self.feed.note_progress()
                data = [self.feed.image(int(v), r) for v, r in zip(video_ids, refs)]
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
