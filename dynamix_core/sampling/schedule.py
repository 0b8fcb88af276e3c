"""Batch shape at a training step (SPEC 2.3c): the curriculum's point at that step
(:class:`~dynamix_core.sampling.config.SamplerConfig.schedule`: a target multi-camera fraction and
the identities per video), split into whole units by :func:`~dynamix_core.sampling.shape.split_batch`.

With ``videos: add`` there is no split: every step is ``P_m x K_m`` multi-camera images plus
``V x G x K_s`` video images (the config forbids a schedule then).
"""

from __future__ import annotations

from dynamix_core.sampling.config import SamplerConfig
from dynamix_core.sampling.shape import BatchShape, split_batch


def schedule_point(cfg: SamplerConfig, progress: float) -> tuple[float, int]:
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


def shape_at(cfg: SamplerConfig, step: int, total_steps: int) -> BatchShape:
    """Batch shape of training step ``step`` (0-based) out of ``total_steps``."""
    if cfg.adds_videos:
        return BatchShape(cfg.num_multi_ids, cfg.multi_images_per_id, cfg.num_videos, cfg.ids_per_video,
                          cfg.single_images_per_id)
    multi_fraction, ids_per_video = schedule_point(cfg, step / total_steps)
    return split_batch(cfg.batch_size, cfg.multi_images_per_id, cfg.single_images_per_id, multi_fraction, ids_per_video)
