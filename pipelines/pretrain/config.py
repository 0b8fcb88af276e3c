"""The configuration tree of a pre-training run (``dynamix pretrain --config RECIPE --set key=value``).

Shares the run-independent sections with training (optimizer, scaling, tracking, evaluation); its
own sections say which single-camera shards feed it, how batches and the two views are made, the
backbone, and the MoCo v3 objective (:class:`dynamix_core.pretrain.MocoConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamix_core.config import ConfigError, field
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.evaluation import EvalConfig
from dynamix_core.pretrain import MocoConfig
from dynamix_core.training.optim import OptimConfig
from pipelines.train.config import ScalingSection, TrackingSection


def _view(blur_prob: float) -> TransformConfig:
    # MoCo v3's two views (BYOL's recipe): random resized crop 0.2-1, colour jitter (0.4, 0.4, 0.2, 0.1)
    # with p 0.8, grayscale 0.2, flip; blur always in the first view, rarely in the second
    return TransformConfig(crop_scale=(0.2, 1.0), pad=0, erase_prob=0.0, saturation=0.2, blur_prob=blur_prob)


@dataclass(kw_only=True)
class PretrainRunSection:
    name: str = field("pretrain", help="run name: re-running with the same name and storage resumes it")
    storage: str = field("runs", help="root folder of runs (checkpoints and the exported backbone under STORAGE/NAME)")
    seed: int = field(0, min=0, help="global seed (each rank adds its rank)")
    max_steps: int = field(2000, min=1, help="optimizer steps of the whole run")
    log_every: int = field(10, min=1, help="steps between metric reports (loss, accuracy, lr, momentum, images/s)")
    checkpoint_every: int = field(200, min=1, help="steps between checkpoints (a multiple of log_every)")
    keep_checkpoints: int = field(2, min=1, help="checkpoints kept (the newest ones)")
    monitor_every: int = field(0, min=0, help="steps between kNN-monitor evaluations of the bare backbone on data.monitor "
                                       "(a multiple of log_every; 0: before the first and after the last step only)")


@dataclass(kw_only=True)
class PretrainDataSection:
    single: list[str] = field(default_factory=list, help="ingested single-camera shard sets (streamed as whole videos; labels unused)")
    monitor: list[str] = field(default_factory=list, help="ingested shard sets with query/gallery splits ranked by the kNN monitor (target or in-domain test sets)")
    batch_size: int = field(64, min=1, help="images per step on each worker (each seen in two views); the other images of the global batch are the negatives")
    buffer_videos: int = field(32, min=1, help="videos buffered per worker; a batch draws from all of them")
    max_images_per_video: int = field(4, min=1, help="images of one video in one batch at most (fewer frames of one person = fewer false negatives)")
    view1: TransformConfig = field(default_factory=lambda: _view(1.0), help="augmentation of the first view (the 'strong' view pipeline)")
    view2: TransformConfig = field(default_factory=lambda: _view(0.1), help="augmentation of the second view (the 'strong' view pipeline)")
    prefetch_batches: int = field(2, min=1, help="batches decoded ahead of the step in a background thread")
    decode_threads: int = field(2, min=1, help="threads decoding and augmenting images of the next batch")


@dataclass(kw_only=True)
class PretrainModelSection:
    backbone: str = field("vit_base_patch16_224", help="timm model name; train runs load the output with the same model.backbone")
    img_size: tuple[int, int] = field((256, 128), help="input image size (height, width)")
    drop_path_rate: float = field(0.0, help="stochastic depth rate of the backbone (the teacher runs in train mode: keep it small)")
    ibn: bool = field(False, help="IBN-a ResNet (as model.ibn of training: a train run loading the output needs the same)")
    weights: str | None = field(None, help="local backbone weights to start from (e.g. an earlier pre-training's backbone.safetensors)")
    strip_prefixes: tuple[str, ...] = field((), help="key prefixes removed from the weights file's keys before matching")
    strict_weights: bool = field(True, help="fail unless the file's keys match the backbone's exactly")

    def __post_init__(self) -> None:
        if min(self.img_size) <= 0:
            raise ConfigError(f"model.img_size: expected positive (height, width), got {self.img_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: expected 0 <= rate < 1, got {self.drop_path_rate}")


@dataclass(kw_only=True)
class PretrainConfig:
    run: PretrainRunSection = field(default_factory=PretrainRunSection, help="run identity, length and cadences")
    data: PretrainDataSection = field(default_factory=PretrainDataSection, help="single-camera shards, batches and views")
    model: PretrainModelSection = field(default_factory=PretrainModelSection, help="the backbone being pre-trained")
    objective: MocoConfig = field(default_factory=MocoConfig, help="MoCo v3 heads, temperature and teacher momentum")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-4, weight_decay=0.1, warmup_fraction=0.1),
                               help="optimizer and learning-rate schedule (MoCo v3 ViT: AdamW, lr 1.5e-4 per 256 images, wd 0.1)")
    scaling: ScalingSection = field(default_factory=ScalingSection, help="Ray Train workers and precision")
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="dynamix-pretrain"), help="MLflow tracking")
    eval: EvalConfig = field(default_factory=EvalConfig, help="how the kNN monitor ranks (the project's exact evaluation)")

    def __post_init__(self) -> None:
        if not self.data.single:
            raise ConfigError("data.single: at least one single-camera shard set is required")
        for name in ("view1", "view2"):
            view = getattr(self.data, name)
            if (view.height, view.width) != tuple(self.model.img_size):
                raise ConfigError(f"data.{name} size ({view.height}, {view.width}) must equal model.img_size "
                                  f"{tuple(self.model.img_size)}; change data.{name}.height/width")
        if min(self.data.batch_size, self.data.buffer_videos, self.data.max_images_per_video) < 1:
            raise ConfigError("data.batch_size, data.buffer_videos and data.max_images_per_video must all be >= 1")
        if self.data.buffer_videos * self.data.max_images_per_video < self.data.batch_size:
            raise ConfigError(f"data.batch_size={self.data.batch_size} needs data.buffer_videos * data.max_images_per_video "
                              f">= it (got {self.data.buffer_videos} x {self.data.max_images_per_video})")
        if self.data.batch_size < 2:
            raise ConfigError("data.batch_size must be >= 2: the other images of the batch are the negatives")
        if self.run.checkpoint_every % self.run.log_every:
            raise ConfigError(f"run.checkpoint_every={self.run.checkpoint_every} must be a multiple of "
                              f"run.log_every={self.run.log_every} (checkpoints ride on metric reports)")
        if self.run.monitor_every % self.run.log_every:
            raise ConfigError(f"run.monitor_every={self.run.monitor_every} must be a multiple of run.log_every={self.run.log_every}")
        if self.scaling.precision == "bf16" and not self.scaling.use_gpu:
            raise ConfigError("scaling.precision=bf16 needs scaling.use_gpu=true (CPU runs in fp32)")
