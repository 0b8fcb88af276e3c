"""AdamW with decoupled weight decay (none on norms, biases and embeddings), linear warm-up + cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dynamix_core.config import ConfigError, field


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = field(3.5e-4, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.05, help="decoupled weight decay (not applied to norms, biases, embeddings)")
    betas: tuple[float, float] = field((0.9, 0.999), help="AdamW betas")
    warmup_fraction: float = field(0.05, help="linear warm-up over this fraction of run.max_steps")
    min_lr_ratio: float = field(0.01, help="cosine decay ends at lr * min_lr_ratio")
    grad_clip: float = field(5.0, help="clip the global gradient norm to this value (0: off)")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warm-up to 1, then cosine to ``min_lr_ratio``."""
    warmup = int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
