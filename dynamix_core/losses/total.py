"""Weighted sum of the loss terms (SPEC 2.2 step 4, 2.3: Instance + Augmentation + Centroids + Camera centroids)."""

from __future__ import annotations

import torch

from dynamix_core.losses.config import TERMS, LossConfig


def total_loss(terms: dict[str, torch.Tensor], cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_t weight_t * terms[t]`` and, for logging, each unweighted term as a float plus ``total``.

    ``terms`` holds the scalar terms computed this step (a recipe may omit some, e.g. the
    multi-camera-only baseline has no single-camera data); names are those of
    :data:`~dynamix_core.losses.config.TERMS`."""
    if not terms:
        raise ValueError(f"total_loss: no loss terms given; expected some of {list(TERMS)}")
    names = list(terms)
    weights = [cfg.weight(name) for name in names]
    total = sum(w * terms[n] for w, n in zip(weights, names))
    # One device-to-host copy for all logged values instead of one synchronisation per term.
    values = torch.stack([terms[n].detach().float() for n in names] + [total.detach().float()]).tolist()
    logged = dict(zip(names + ["total"], values))
    return total, logged
