"""Pre-training batches on one worker: the images of the videos the sampler holds, and a background
thread that turns sampler plans into two augmented views per image.

The single-camera stream is the training's seekable :class:`dynamix_core.data.train_sets.VideoFeed` over
this rank's videos of the run index (labels unused): a resumed worker opens it at the checkpoint's
position, and the videos a restored :class:`~dynamix_core.sampling.UnlabeledImageSampler` buffers
are read again from their shards when a batch needs them.

Shape legend: B images per batch, C channels, H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dynamix_core.data.transforms import TransformConfig
from dynamix_core.engine import Prefetcher
from dynamix_core.pretrain.views import TwoViews
from dynamix_core.sampling import UnlabeledImageSampler
from dynamix_core.data.train_sets import VideoFeed


@dataclass
class PairBatch:
    view1_BCHW: torch.Tensor
    view2_BCHW: torch.Tensor


class PairProducer(Prefetcher):
    """Pre-training's prefetcher (:class:`~dynamix_core.engine.Prefetcher`): a sampler plan -> two
    views of every image, seeded by (seed, step, key), so a resumed run sees the same batches."""

    name = "pre-training batch producer"

    def __init__(self, sampler: UnlabeledImageSampler, feed: VideoFeed, view1: TransformConfig,
                 view2: TransformConfig, *, seed: int, prefetch: int = 2, threads: int = 2,
                 snapshot_at: Callable[[int], bool] = lambda step: False):
        super().__init__(sampler, feed=feed, prefetch=prefetch, threads=threads, snapshot_at=snapshot_at)
        self.seed = seed
        self.views = TwoViews(view1, view2)
        self.start()

    def materialise(self, plan, step: int) -> PairBatch:
        refs, video_ids = plan
        data = [self.feed.image(int(v), r) for v, r in zip(video_ids, refs)]
        step_seed = self.seed + 7919 * step
        views = list(self.pool.map(lambda item: self.views(*item, step_seed), zip(data, refs)))
        return PairBatch(torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views]))
