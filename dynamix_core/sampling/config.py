"""Configuration of the Data Sampling Module (SPEC 2.3c): batch shape, video buffer, curriculum.

    sampler:
      num_multi_ids: 16          # P_m
      multi_images_per_id: 4     # K_m
      num_videos: 8              # V
      ids_per_video: 2           # G
      single_images_per_id: 4    # K_s   -> batch of 16*4 + 8*2*4 = 128 images
      videos: replace            # replace: fixed batch, the schedule moves the split; add: P_m x K_m always,
                                 #          the V x G x K_s video images on top (no split schedule)
      schedule_mode: linear
      schedule:                  # easy -> hard: more multi-camera and G=1 first, then G=2
        - {step_fraction: 0.0, multi_fraction: 0.75, ids_per_video: 1}
        - {step_fraction: 0.3, multi_fraction: 0.5, ids_per_video: 2}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.config import ConfigError, field
from dynamix_core.sampling.schedule import split_batch


@dataclass(kw_only=True)
class ScheduleBreakpoint:
    """From ``step_fraction`` of training on, the batch targets ``multi_fraction`` and ``ids_per_video``."""

    step_fraction: float = field(help="fraction of the training steps at which this breakpoint starts (first: 0.0)")
    multi_fraction: float = field(help="target fraction of the batch's images from multi-camera data (rest: single)")
    ids_per_video: int = field(help="G from this breakpoint on: identities per video in the single-camera part")


@dataclass(kw_only=True)
class SamplerConfig:
    """Mixed-batch sampler. Counts are per data-parallel rank.

    ``videos: replace``: the batch size ``P_m*K_m + V*G*K_s`` stays fixed while the schedule moves
    the multi:single split (videos take the place of multi-camera images). ``videos: add``: every
    batch holds exactly ``P_m x K_m`` multi-camera images - the same ones a multi-camera-only run of
    the same seed draws - and ``V x G x K_s`` video images on top (ReMix's N_P^m x N_K^m + N_P^s x
    N_K^s); ``num_videos: 0`` is then the multi-camera-only batch. A fair comparison of mixing against
    multi-camera-only training uses ``add`` with the baseline's ``P_m``, ``K_m``."""

    num_multi_ids: int = field(16, help="P_m: multi-camera identities per batch")
    multi_images_per_id: int = field(4, help="K_m: images per multi-camera identity")
    cross_camera: bool = field(True, help="spread a multi-camera identity's K_m images round-robin over its cameras")
    balance_datasets: bool = field(
        True, help="draw multi-camera identities uniformly over source datasets first (false: over identities)"
    )
    videos: Literal["replace", "add"] = field(
        "replace", help="replace: fixed batch size, videos replace multi-camera images (schedulable split); "
        "add: always P_m x K_m multi-camera images, the V x G x K_s video images added on top")
    num_videos: int = field(8, help="V: videos per batch in the single-camera part (add: may be 0)")
    ids_per_video: int = field(2, help="G: identities per video (>= 2: same-video people as hard negatives)")
    single_images_per_id: int = field(4, help="K_s: images per single-camera identity")
    video_buffer_size: int = field(32, help="videos held for the single-camera part, refilled from the stream")
    max_video_uses: int = field(4, help="batches a buffered video serves before it is retired and replaced")
    schedule: list[ScheduleBreakpoint] = field(
        default_factory=list,
        help="curriculum breakpoints (step_fraction, multi_fraction, ids_per_video); empty: the base shape",
    )
    schedule_mode: Literal["piecewise", "linear"] = field(
        "piecewise", help="piecewise: hold each breakpoint's values; linear: interpolate multi_fraction too"
    )
    seed: int = field(0, help="seed of all sampler random streams (same seed -> same batches)")

    @property
    def batch_size(self) -> int:
        multi = self.num_multi_ids * self.multi_images_per_id
        return multi + self.num_videos * self.ids_per_video * self.single_images_per_id

    @property
    def adds_videos(self) -> bool:
        return self.videos == "add"

    @property
    def base_multi_fraction(self) -> float:
        return self.num_multi_ids * self.multi_images_per_id / self.batch_size

    def __post_init__(self) -> None:
        for name in ("num_multi_ids", "multi_images_per_id", "num_videos", "ids_per_video", "single_images_per_id",
                     "video_buffer_size", "max_video_uses"):
            if getattr(self, name) < (0 if name == "num_videos" and self.adds_videos else 1):
                raise ConfigError(f"sampler.{name}={getattr(self, name)} must be >= "
                                  f"{0 if name == 'num_videos' and self.adds_videos else 1}")
        if self.seed < 0:
            raise ConfigError(f"sampler.seed={self.seed} must be >= 0")
        if self.adds_videos:
            if self.schedule:
                raise ConfigError("sampler.schedule: videos=add keeps P_m x K_m multi-camera images and adds "
                                  "V x G x K_s video images in every batch; a schedule of the split needs videos=replace")
            if self.num_videos > self.video_buffer_size:
                raise ConfigError(f"sampler.video_buffer_size={self.video_buffer_size} is smaller than "
                                  f"num_videos={self.num_videos}; raise video_buffer_size")
            return
        self._check_unit("sampler.ids_per_video", self.ids_per_video)
        for i, point in enumerate(self.schedule):
            where = f"sampler.schedule[{i}]"
            if not 0.0 <= point.step_fraction <= 1.0:
                raise ConfigError(f"{where}.step_fraction={point.step_fraction} must lie in [0, 1]")
            if i == 0 and point.step_fraction != 0.0:
                raise ConfigError(f"{where}.step_fraction={point.step_fraction}: the first breakpoint must be 0.0")
            if i > 0 and point.step_fraction <= self.schedule[i - 1].step_fraction:
                raise ConfigError(f"{where}.step_fraction={point.step_fraction} must exceed the previous breakpoint's")
            if not 0.0 <= point.multi_fraction <= 1.0:
                raise ConfigError(f"{where}.multi_fraction={point.multi_fraction} must lie in [0, 1]")
            if point.ids_per_video < 1:
                raise ConfigError(f"{where}.ids_per_video={point.ids_per_video} must be >= 1")
            self._check_unit(f"{where}.ids_per_video", point.ids_per_video)
        needed, where = self._max_videos()
        if needed > self.video_buffer_size:
            raise ConfigError(
                f"sampler.video_buffer_size={self.video_buffer_size} is smaller than the {needed} videos per batch "
                f"that {where} asks for; raise video_buffer_size"
            )

    def _check_unit(self, where: str, ids_per_video: int) -> None:
        # the multi part fills what the whole videos leave, in units of K_m: exact only if K_m | G*K_s
        if ids_per_video * self.single_images_per_id % self.multi_images_per_id:
            raise ConfigError(
                f"{where}={ids_per_video}: G*K_s = {ids_per_video * self.single_images_per_id} must be a multiple of "
                f"multi_images_per_id={self.multi_images_per_id} so the batch size stays fixed; change G, K_s or K_m"
            )

    def _max_videos(self) -> tuple[int, str]:
        """Most videos one batch can ask for over the schedule, and the setting that asks for it."""
        candidates = [(self.base_multi_fraction, self.ids_per_video, "the base shape")]
        for i, p in enumerate(self.schedule):
            candidates.append((p.multi_fraction, p.ids_per_video, f"schedule[{i}]"))
            if self.schedule_mode == "linear" and i + 1 < len(self.schedule):
                # G stays p's until the next breakpoint while the fraction moves towards the next one's
                candidates.append((self.schedule[i + 1].multi_fraction, p.ids_per_video, f"schedule[{i}]->[{i + 1}]"))
        shapes = [
            (split_batch(self.batch_size, self.multi_images_per_id, self.single_images_per_id, r, g).num_videos, where)
            for r, g, where in candidates
        ]
        return max(shapes, key=lambda s: s[0])
