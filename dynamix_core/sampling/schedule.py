"""Batch shape at a training step: how the fixed batch splits between the two data parts (SPEC 2.3c).

The batch size ``B = P_m*K_m + V*G*K_s`` of the base config never changes. At each step the
curriculum (:class:`~dynamix_core.sampling.config.SamplerConfig.schedule`) gives a target fraction
``r`` of multi-camera images and the identities per video ``G``; the single-camera part then takes
``V_t = round((1 - r) * B / (G*K_s))`` whole videos (a video is the unit of that part) and the
multi-camera part fills the rest with ``P_t = (B - V_t*G*K_s) / K_m`` identities. The config
guarantees ``G*K_s`` is a multiple of ``K_m``, so the split is always exact and the realised
fraction is the nearest one the unit sizes allow.

With ``videos: add`` there is no split: every step is ``P_m x K_m`` multi-camera images plus
``V x G x K_s`` video images (the config forbids a schedule then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynamix_core.sampling.config import SamplerConfig


@dataclass(frozen=True, slots=True)
class BatchShape:
    """Counts of one batch (of one data-parallel rank)."""

    num_multi_ids: int  # P_t
    multi_images_per_id: int  # K_m
    num_videos: int  # V_t
    ids_per_video: int  # G_t
    single_images_per_id: int  # K_s

    @property
    def num_multi_images(self) -> int:
        return self.num_multi_ids * self.multi_images_per_id

    @property
    def num_single_images(self) -> int:
        return self.num_videos * self.ids_per_video * self.single_images_per_id

    @property
    def batch_size(self) -> int:
        return self.num_multi_images + self.num_single_images


def split_batch(
    batch_size: int, multi_images_per_id: int, single_images_per_id: int, multi_fraction: float, ids_per_video: int
) -> BatchShape:
    """The shape whose multi-camera share of ``batch_size`` images is nearest ``multi_fraction``."""
    video_unit = ids_per_video * single_images_per_id
    # floor(x + 0.5), not round(): Python's round() goes to even and would make ties depend on parity
    num_videos = min(math.floor((1.0 - multi_fraction) * batch_size / video_unit + 0.5), batch_size // video_unit)
    num_multi_images = batch_size - num_videos * video_unit
    assert num_multi_images % multi_images_per_id == 0, "SamplerConfig guarantees K_m divides G*K_s and B"
    return BatchShape(
        num_multi_ids=num_multi_images // multi_images_per_id,
        multi_images_per_id=multi_images_per_id,
        num_videos=num_videos,
        ids_per_video=ids_per_video,
        single_images_per_id=single_images_per_id,
    )


def schedule_point(cfg: "SamplerConfig", progress: float) -> tuple[float, int]:
    """``(multi_fraction, ids_per_video)`` at ``progress`` (fraction of training done, 0..1).

    Before/without breakpoints: the base config's own ratio and ``G``. ``G`` is piecewise constant
    (an integer cannot be interpolated); in ``linear`` mode the fraction moves linearly from one
    breakpoint to the next and stays at the last breakpoint's value after it."""
    if not cfg.schedule:
        return cfg.base_multi_fraction, cfg.ids_per_video
    points = cfg.schedule
    # the first breakpoint is at 0.0 (validated), so one always applies
    i = max(j for j, p in enumerate(points) if p.step_fraction <= progress)
    point = points[i]
    if cfg.schedule_mode == "piecewise" or i + 1 == len(points):
        return point.multi_fraction, point.ids_per_video
    nxt = points[i + 1]
    t = (progress - point.step_fraction) / (nxt.step_fraction - point.step_fraction)
    return point.multi_fraction + t * (nxt.multi_fraction - point.multi_fraction), point.ids_per_video


def shape_at(cfg: "SamplerConfig", step: int, total_steps: int) -> BatchShape:
    """Batch shape of training step ``step`` (0-based) out of ``total_steps``."""
    if cfg.adds_videos:
        return BatchShape(cfg.num_multi_ids, cfg.multi_images_per_id, cfg.num_videos, cfg.ids_per_video,
                          cfg.single_images_per_id)
    multi_fraction, ids_per_video = schedule_point(cfg, step / total_steps)
    return split_batch(cfg.batch_size, cfg.multi_images_per_id, cfg.single_images_per_id, multi_fraction, ids_per_video)
