"""ReMix / DynaMix losses on L2-normalised features (SPEC 2.2). The Centroids loss lives with the
centroid bank (:mod:`dynamix_core.centroids`), which owns the centroids it is computed over."""

from dynamix_core.losses.augmentation import augmentation_loss
from dynamix_core.losses.camera_centroid import camera_centroid_loss
from dynamix_core.losses.common import anchor_temperatures
from dynamix_core.losses.config import TERMS, LossConfig
from dynamix_core.losses.instance import instance_loss
from dynamix_core.losses.total import total_loss

__all__ = [
    "TERMS", "LossConfig", "anchor_temperatures", "augmentation_loss", "camera_centroid_loss", "instance_loss",
    "total_loss",
]
