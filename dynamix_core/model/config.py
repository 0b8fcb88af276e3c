"""Configuration of the re-ID encoder and its momentum copy (SPEC 2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.config import ConfigError, field


@dataclass(kw_only=True)
class ModelConfig:
    """Backbone, neck, momentum encoder and where the initial weights come from."""

    backbone: str = field("vit_base_patch16_224", help="timm model name (ViTs get img_size; CNNs such as resnet50 do not)")
    img_size: tuple[int, int] = field((256, 128), help="input image size (height, width)")
    drop_path_rate: float = field(0.1, help="stochastic depth rate of the backbone")
    num_stripes: int = field(
        1, help="1: the backbone's own global pooling; K > 1: PCB-style part pooling, the feature map "
        "average-pooled in K horizontal stripes and concatenated (embedding K x channels)")
    ibn: bool = field(
        False, help="IBN-a (Pan et al., 2018): in each residual block of a ResNet's first three stages, half "
        "of the first BatchNorm's channels are instance-normalised; the field's domain-generalisation "
        "backbone (fast-reid's with_ibn). ResNet backbones only")
    ema_momentum: float = field(0.999, help="momentum m of the EMA encoder: f~ <- m f~ + (1 - m) f after each step")
    weights: str | None = field(None, help="local checkpoint (.safetensors or torch state dict) to start from; never downloaded")
    weights_scope: Literal["backbone", "encoder"] = field(
        "backbone",
        help="'backbone': the file holds backbone weights only (e.g. ImageNet/LUPerson pre-training; "
        "the classifier head is dropped, ViT position embeddings resampled to img_size); "
        "'encoder': the file is a full encoder (backbone + BNNeck) saved by this project",
    )
    strip_prefixes: tuple[str, ...] = field((), help="key prefixes removed from the file's keys before matching, e.g. ['module.', 'backbone.']")
    strict_weights: bool = field(True, help="fail unless the file's keys match the model's exactly")

    def __post_init__(self) -> None:
        if min(self.img_size) <= 0:
            raise ConfigError(f"model.img_size: expected positive (height, width), got {self.img_size}")
        if self.num_stripes < 1:
            raise ConfigError(f"model.num_stripes: expected >= 1, got {self.num_stripes}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"model.ema_momentum: expected 0 <= m < 1, got {self.ema_momentum}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: expected 0 <= rate < 1, got {self.drop_path_rate}")
