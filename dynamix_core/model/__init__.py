"""Re-ID encoder ``f`` (timm backbone + BNNeck), its momentum copy ``f~``, and local weight I/O (SPEC 2.1)."""

from dynamix_core.model.config import ModelConfig
from dynamix_core.model.encoder import (BNNeck, ReIDEncoder, build_encoder, check_backbone, create_backbone,
                                        load_backbone_weights)
from dynamix_core.model.momentum import MomentumEncoder, ema_update
from dynamix_core.model.weights import WeightsError, load_weights, read_state_dict, save_state_dict, save_weights, strip_key_prefixes

__all__ = [
    "BNNeck", "ModelConfig", "MomentumEncoder", "ReIDEncoder", "WeightsError", "build_encoder", "check_backbone",
    "create_backbone",
    "ema_update", "load_backbone_weights", "load_weights", "read_state_dict", "save_state_dict", "save_weights",
    "strip_key_prefixes",
]
