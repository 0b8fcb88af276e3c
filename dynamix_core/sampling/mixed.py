"""Mixed batch composer: one plan per step, multi-camera part + single-camera part (SPEC 2.3c).

At step ``t`` the schedule gives the shape (:func:`~dynamix_core.sampling.schedule.shape_at`):
``P_t x K_m`` multi-camera images then ``V_t x G_t x K_s`` single-camera images, always
``B = P_m*K_m + V*G*K_s`` in all (``videos: add``: always ``P_m x K_m`` plus ``V x G x K_s``; the
multi-camera part then draws the same images as a multi-camera-only run of the same seed). The plan lists sample refs; the loader turns them into images.

    sampler = MixedBatchSampler(cfg, refs=idx, pids=pid, camids=cam, datasets=ds,
                                video_stream=partition_stream(videos, rank, world), total_steps=n,
                                rank=rank, world_size=world)
    plan = sampler.next_batch()          # plan.refs, plan.pids, plan.is_single
    sampler.update_labels(video_id, pids)  # from the Relabeling Module, between batches
    ckpt["sampler"] = sampler.state_dict() # per rank; JSON-safe

Rank guarantee: within a step no sample ref is in two ranks' batches - the multi-camera identities
of a step are split between ranks (:mod:`.multicam`), and the single-camera videos are disjoint
as long as each rank gets its own shard of videos (:func:`.singlecam.partition_stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dynamix_core.sampling.config import SamplerConfig
from dynamix_core.sampling.multicam import MultiCameraSampler
from dynamix_core.sampling.schedule import BatchShape, shape_at
from dynamix_core.sampling.singlecam import SingleCameraSampler, VideoStream


@dataclass(frozen=True)
class BatchPlan:
    """The sample refs of one batch of one rank, multi-camera part first."""

    step: int
    shape: BatchShape
    multi_refs: list  # P_t * K_m refs, K_m consecutive per identity
    multi_pids: np.ndarray  # (P_t*K_m,) int64 global pids
    single_refs: list  # V_t * G_t * K_s refs, grouped by video then identity
    single_pids: np.ndarray  # (V_t*G_t*K_s,) int64 pseudo-labels at planning time
    single_video_ids: np.ndarray  # (V_t*G_t*K_s,) int64

    @property
    def refs(self) -> list:
        return self.multi_refs + self.single_refs

    @property
    def pids(self) -> np.ndarray:
        return np.concatenate([self.multi_pids, self.single_pids])

    @property
    def is_single(self) -> np.ndarray:
        """(B,) bool domain flag: True for single-camera samples."""
        return np.r_[np.zeros(len(self.multi_refs), bool), np.ones(len(self.single_refs), bool)]

    @property
    def video_ids(self) -> np.ndarray:
        """(B,) int64 video of each sample, -1 for multi-camera samples."""
        return np.concatenate([np.full(len(self.multi_refs), -1, dtype=np.int64), self.single_video_ids])


class MixedBatchSampler:
    """Plans every batch of one data-parallel rank from the config, a multi-camera set and a video stream."""

    def __init__(
        self,
        cfg: SamplerConfig,
        *,
        refs: Sequence,
        pids: Sequence[int],
        camids: Sequence[int],
        datasets: Sequence,
        video_stream: VideoStream,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        self.cfg = cfg
        self.total_steps = total_steps
        self.step = 0
        self.multi = MultiCameraSampler(
            refs, pids, camids, datasets,
            images_per_id=cfg.multi_images_per_id,
            cross_camera=cfg.cross_camera,
            balance_datasets=cfg.balance_datasets,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        )
        self.single = SingleCameraSampler(
            video_stream,
            images_per_id=cfg.single_images_per_id,
            buffer_size=cfg.video_buffer_size,
            max_video_uses=cfg.max_video_uses,
            seed=cfg.seed,
            rank=rank,
        )

    def next_batch(self) -> BatchPlan:
        """The plan of the current step; advances to the next step."""
        shape = shape_at(self.cfg, self.step, self.total_steps)
        multi_refs, multi_pids = self.multi.sample(shape.num_multi_ids)
        single_refs, single_pids, video_ids = self.single.sample(shape.num_videos, shape.ids_per_video)
        plan = BatchPlan(self.step, shape, multi_refs, multi_pids, single_refs, single_pids, video_ids)
        self.step += 1
        return plan

    def update_labels(self, video_id: int, new_pids: Sequence[int]) -> bool:
        """New pseudo-labels of a buffered video (see :meth:`SingleCameraSampler.update_labels`)."""
        return self.single.update_labels(video_id, new_pids)

    def buffered_video_ids(self) -> list[int]:
        """Videos the next batches draw from: the ones worth relabeling now."""
        return self.single.buffered_video_ids()

    def state_dict(self) -> dict:
        """JSON-safe state of this rank's sampler: resume with :meth:`load_state_dict` mid-epoch."""
        return {"step": self.step, "multi": self.multi.state_dict(), "single": self.single.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.multi.load_state_dict(state["multi"])
        self.single.load_state_dict(state["single"])
