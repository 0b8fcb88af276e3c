"""Pre-training in one process, without Ray: the single-camera videos of ingested shard sets held in
memory, the same sampler, views and step as ``dynamix pretrain``. For tests, benchmarks and the GPU
machine (whose Python has no Ray); production runs go through ``pipelines.pretrain``.

    videos = LocalVideos.from_shards(["data/shards/synth_video"])
    step = pretrain_local(backbone, videos, LocalPretrainConfig(steps=300), device=torch.device("cpu"))
    backbone = step.backbone()
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from dynamix_core.data.reader import ShardReader
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.engine import Engine, StepResult
from dynamix_core.pretrain.config import MocoConfig
from dynamix_core.pretrain.moco import OnlineNetwork
from dynamix_core.pretrain.step import PretrainOutput, PretrainStep
from dynamix_core.pretrain.views import TwoViews
from dynamix_core.sampling import UnlabeledImageSampler, VideoSamples
from dynamix_core.training.optim import OptimConfig


@dataclass
class LocalVideos:
    """Whole videos (keys in frame order) and every image's encoded bytes, in memory."""

    videos: list[VideoSamples]
    images: dict[str, bytes]

    @classmethod
    def from_shards(cls, roots: list[str | Path]) -> LocalVideos:
        videos, images = [], {}
        for root in roots:
            for video in ShardReader(root).iter_videos():
                keys = [s.key for s in video]
                videos.append(VideoSamples(len(videos), keys, [-1] * len(keys)))
                images.update((s.key, s.data) for s in video)
        if not videos:
            raise FileNotFoundError(f"{roots}: no single-camera videos")
        return cls(videos, images)

    def stream(self, position: int) -> Iterator[VideoSamples]:
        """The videos in order, cycling forever (a sampler's ``VideoStream``)."""
        for i in itertools.count(position):
            yield self.videos[i % len(self.videos)]


@dataclass(kw_only=True)
class LocalPretrainConfig:
    steps: int = 300
    batch_size: int = 32
    buffer_videos: int = 16
    max_images_per_video: int = 2
    seed: int = 0
    objective: MocoConfig = field(default_factory=lambda: MocoConfig(dim=128, mlp_dim=512, projector_layers=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_fraction=0.1))
    view1: TransformConfig = field(default_factory=TransformConfig)
    view2: TransformConfig = field(default_factory=TransformConfig)
    view_threads: int = 1  # threads decoding and augmenting a batch (PIL releases the GIL); same views for any count


def pretrain_local(backbone: nn.Module, videos: LocalVideos, cfg: LocalPretrainConfig, *, device: torch.device,
                   on_step: Callable[[int, PretrainOutput], None] | None = None) -> PretrainStep:
    """Pre-train ``backbone`` (in place) for ``cfg.steps`` steps on the training engine; returns the
    step (teacher, optimizer)."""
    online = OnlineNetwork(backbone, cfg.objective.dim, cfg.objective.mlp_dim, cfg.objective.projector_layers,
                           cfg.objective.predictor_layers).to(device)
    step_fn = PretrainStep(online, cfg.objective, cfg.optim, total_steps=cfg.steps, device=device)
    sampler = UnlabeledImageSampler(videos.stream, batch_size=cfg.batch_size,
                                    buffer_size=min(cfg.buffer_videos, len(videos.videos)),
                                    max_images_per_video=cfg.max_images_per_video, seed=cfg.seed)
    two_views = TwoViews(cfg.view1, cfg.view2)
    pool = ThreadPoolExecutor(cfg.view_threads) if cfg.view_threads > 1 else None

    def step(step: int) -> StepResult:
        t0 = time.perf_counter()
        refs, _ = sampler.next_batch()
        seed = cfg.seed * 1000003 + 7919 * step

        def make(key: str) -> tuple[torch.Tensor, torch.Tensor]:
            return two_views(videos.images[key], key, seed)

        views = list(pool.map(make, refs)) if pool is not None else [make(key) for key in refs]
        x1, x2 = torch.stack([v[0] for v in views]).to(device), torch.stack([v[1] for v in views]).to(device)
        waited = time.perf_counter() - t0
        out = step_fn(x1, x2, step)
        if on_step is not None:
            on_step(step, out)
        return out.result(len(refs), waited)

    try:
        Engine(step, max_steps=cfg.steps, log_every=cfg.steps, checkpoint_every=cfg.steps).run(0)
    finally:
        if pool is not None:
            pool.shutdown()
    return step_fn
