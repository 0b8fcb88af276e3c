"""Self-supervised pre-training of a backbone on unlabeled person crops (SPEC 2.5b), plain PyTorch.

MoCo v3 (:mod:`.moco`): an online backbone + projector + predictor against a momentum teacher
(backbone + projector, EMA of the online weights, keys with batch statistics), InfoNCE over the
teacher keys of the whole (all-gathered) batch. :class:`.step.PretrainStep` is one optimisation
step; ``pipelines.pretrain`` runs it under Ray Train over the single-camera shards.
"""

from dynamix_core.pretrain.config import MocoConfig
from dynamix_core.pretrain.moco import (
    KeyEncoder,
    OnlineNetwork,
    build_mlp,
    contrastive_loss,
    ema_parameters,
    momentum_at,
)
from dynamix_core.pretrain.step import PretrainOutput, PretrainStep

__all__ = ["KeyEncoder", "MocoConfig", "OnlineNetwork", "PretrainOutput", "PretrainStep", "build_mlp",
           "contrastive_loss", "ema_parameters", "momentum_at"]
