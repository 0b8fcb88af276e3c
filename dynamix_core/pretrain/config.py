"""Configuration of the self-supervised pre-training objective (MoCo v3, SPEC 2.5b)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.config import ConfigError, field


@dataclass(kw_only=True)
class MocoConfig:
    """Projector / predictor heads, contrastive temperature and the teacher's momentum schedule."""

    dim: int = field(256, help="output width of the projector and the predictor (the contrasted vectors)")
    mlp_dim: int = field(4096, help="hidden width of the projector and predictor MLPs")
    projector_layers: int = field(3, help="linear layers of the projector (MoCo v3: 3 for ViTs, 2 for ResNets)")
    predictor_layers: int = field(2, help="linear layers of the predictor on the online branch only")
    temperature: float = field(0.2, help="softmax temperature tau of the contrastive loss (MoCo v3: 0.2 for ViTs, 1.0 for ResNets)")
    momentum: float = field(0.99, help="teacher EMA momentum m0 at step 0; it rises to 1 on a half cosine over the run")
    momentum_schedule: Literal["cosine", "constant"] = field("cosine", help="cosine: m0 -> 1 over the run (MoCo v3, BYOL); constant: m0 throughout")
    export: Literal["online", "momentum"] = field(
        "online", help="which backbone is exported and monitored: the online one (MoCo v3 practice) or the teacher")

    def __post_init__(self) -> None:
        if self.dim < 1 or self.mlp_dim < 1:
            raise ConfigError(f"objective.dim={self.dim}, objective.mlp_dim={self.mlp_dim}: both must be >= 1")
        if self.projector_layers < 1 or self.predictor_layers < 1:
            raise ConfigError(f"objective.projector_layers={self.projector_layers}, objective.predictor_layers="
                              f"{self.predictor_layers}: each head needs at least one linear layer")
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature={self.temperature}: must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"objective.momentum={self.momentum}: expected 0 <= m0 < 1")
