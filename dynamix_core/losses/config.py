"""Weights and temperatures of the ReMix / DynaMix losses (SPEC 2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.config import ConfigError, field

#: Loss term names, as used in :func:`dynamix_core.losses.total_loss` and in logged metrics.
TERMS = ("instance", "augmentation", "centroid", "camera_centroid")


@dataclass(kw_only=True)
class LossConfig:
    """Per-term weights and per-data-type temperatures. Single-camera temperatures are higher than
    multi-camera ones because single-camera positives (same video, same background) are easier.

    The Centroids loss temperatures (tau_cen^m, tau_cen^s) belong to the centroid bank that computes
    that loss: :class:`dynamix_core.centroids.CentroidBankConfig` ``temp_multi`` / ``temp_single``."""

    weight_instance: float = field(1.0, help="weight of the Instance loss")
    weight_augmentation: float = field(1.0, help="weight of the Augmentation loss")
    weight_centroid: float = field(1.0, help="weight of the Centroids loss")
    weight_camera_centroid: float = field(1.0, help="weight of the Camera-centroids loss")
    tau_ins_multi: float = field(0.05, help="Instance loss temperature for multi-camera anchors (tau_ins^m)")
    tau_ins_single: float = field(0.1, help="Instance loss temperature for single-camera anchors (tau_ins^s)")
    tau_aug: float = field(0.1, help="Augmentation loss temperature (tau_aug)")
    tau_camera: float = field(0.05, help="Camera-centroids loss temperature (multi-camera anchors only; tau_cen^m)")
    anchor_mean: Literal["batch", "per_domain"] = field(
        "batch", help="how the Instance, Augmentation and Centroids terms average their anchors: batch (mean "
        "over all; the videos dilute the multi-camera anchors' share) or per_domain (mean over the multi-camera "
        "anchors + mean over the single-camera anchors: the multi-camera part weighs as without videos)")

    def __post_init__(self) -> None:
        for name in ("tau_ins_multi", "tau_ins_single", "tau_aug", "tau_camera"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"loss.{name}: a temperature must be > 0, got {getattr(self, name)}")
        for term in TERMS:
            if getattr(self, f"weight_{term}") < 0:
                raise ConfigError(f"loss.weight_{term}: a loss weight must be >= 0, got {getattr(self, f'weight_{term}')}")

    def weight(self, term: str) -> float:
        """The weight of loss term ``term`` (one of :data:`TERMS`)."""
        if term not in TERMS:
            raise ValueError(f"unknown loss term {term!r}; known terms are {list(TERMS)}")
        return getattr(self, f"weight_{term}")
