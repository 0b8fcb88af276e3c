"""Configuration of the Efficient Centroids Module (SPEC 2.3b; the Centroids loss of SPEC 2.2 step 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dynamix_core.config import ConfigError, field

LossMode = Literal["all", "sampled", "sharded"]
NegativeSampling = Literal["random", "hard", "mixed"]
StorageDtype = Literal["float16", "bfloat16", "float32"]


@dataclass(kw_only=True)
class CentroidBankConfig:
    """Centroid memory: momentum update, per-domain temperatures and how the softmax is formed."""

    momentum: float = field(0.2, help="mu in c <- mu*c + (1-mu)*mean(z~ of the identity in the batch)")
    temp_multi: float = field(0.05, help="tau_cen^m: Centroids-loss temperature of multi-camera anchors")
    temp_single: float = field(0.1, help="tau_cen^s: Centroids-loss temperature of single-camera anchors")
    loss_mode: LossMode = field(
        "all",
        help="all: softmax over every centroid; sampled: batch identities + num_negatives negatives; "
        "sharded: every centroid, rows split across data-parallel ranks",
    )
    num_negatives: int = field(4096, help="K_neg: negative centroids added to the batch identities (sampled mode)")
    negative_sampling: NegativeSampling = field(
        "random", help="sampled mode: random negatives, the hardest ones for the batch, or a mix of both"
    )
    mixed_hard_fraction: float = field(
        0.5, help="share of the num_negatives that are hard when negative_sampling=mixed"
    )
    mask_same_video: bool = field(
        True, help="drop centroids of the anchor's own video (other than its own identity) from the denominator"
    )
    stale_after_steps: int = field(10000, help="a centroid not updated for more steps than this counts as stale")
    storage_dtype: StorageDtype = field("float16", help="dtype the centroids are stored in (loss math is fp32)")
    chunk_rows: int = field(65536, help="centroid rows converted to fp32 at a time by the loss (bounds memory)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"centroids.momentum: {self.momentum} must be in [0, 1)")
        for name in ("temp_multi", "temp_single"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"centroids.{name}: {getattr(self, name)} must be > 0")
        if self.num_negatives < 0:
            raise ConfigError(f"centroids.num_negatives: {self.num_negatives} must be >= 0")
        if not 0.0 <= self.mixed_hard_fraction <= 1.0:
            raise ConfigError(f"centroids.mixed_hard_fraction: {self.mixed_hard_fraction} must be in [0, 1]")
        if self.stale_after_steps < 1:
            raise ConfigError(f"centroids.stale_after_steps: {self.stale_after_steps} must be >= 1")
        if self.chunk_rows < 1:
            raise ConfigError(f"centroids.chunk_rows: {self.chunk_rows} must be >= 1")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.storage_dtype)

    @property
    def num_hard_negatives(self) -> int:
        """How many of the ``num_negatives`` are mined as hard (the rest are drawn at random)."""
        fraction = {"random": 0.0, "hard": 1.0, "mixed": self.mixed_hard_fraction}[self.negative_sampling]
        return round(self.num_negatives * fraction)
