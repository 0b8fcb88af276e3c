"""Efficient Centroids Module (SPEC 2.3b): an fp16 bank of one unit centroid per identity, its
momentum update, and the Centroids loss (SPEC 2.2 step 4) over all, sampled or sharded centroids."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dynamix_core.centroids.bank import CentroidBank
from dynamix_core.centroids.config import CentroidBankConfig
from dynamix_core.centroids.sharded import ShardedCentroidBank, owner_rank

__all__ = ["CentroidBank", "CentroidBankConfig", "ShardedCentroidBank", "build_centroid_bank", "owner_rank"]


def build_centroid_bank(cfg: CentroidBankConfig, num_identities: int, dim: int, *,
                        device: torch.device | str | None = None,
                        group: dist.ProcessGroup | None = None) -> CentroidBank:
    """The bank ``cfg.loss_mode`` asks for: sharded over ``group`` (default: the world) for
    ``sharded``, replicated otherwise."""
    if cfg.loss_mode == "sharded":
        return ShardedCentroidBank(num_identities, dim, cfg, device=device, group=group)
    return CentroidBank(num_identities, dim, cfg, device=device)
