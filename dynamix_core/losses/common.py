"""Helpers shared by the contrastive losses.

Shape legend: B anchors, N keys, D embedding dim.
"""

from __future__ import annotations

import torch


def similarity(anchor_BD: torch.Tensor, key_ND: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``s(a, k) = a . k`` of unit vectors in at least float32.

    Autocast is switched off: at tau = 0.05 a bf16 similarity (3 significant digits) would put
    errors of ~0.1 into the logits. float64 inputs stay float64 (the tests' references)."""
    dtype = torch.promote_types(anchor_BD.dtype, torch.float32)
    with torch.autocast(anchor_BD.device.type, enabled=False):
        return anchor_BD.to(dtype) @ key_ND.to(dtype).T


def anchor_temperatures(
    is_multi_B: torch.Tensor, tau_multi: float, tau_single: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-anchor temperature: ``tau_multi`` for multi-camera anchors, ``tau_single`` for the others."""
    # fill kernels take the scalars directly: no host-to-device copy per step
    tau_B = torch.full(is_multi_B.shape, tau_single, dtype=dtype, device=is_multi_B.device)
    return tau_B.masked_fill_(is_multi_B, tau_multi)


def mean_over_valid(loss_B: torch.Tensor, valid_B: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss_B`` over the anchors where ``valid_B`` holds; 0 when there are none.

    Written without a data-dependent branch, so it never forces a GPU synchronisation."""
    valid = valid_B.to(loss_B.dtype)
    return (loss_B * valid).sum() / valid.sum().clamp(min=1.0)


def domain_mean(loss_B: torch.Tensor, valid_B: torch.Tensor | None = None,
                is_single_B: torch.Tensor | None = None) -> torch.Tensor:
    """The batch reduction of a loss term (``loss.anchor_mean``).

    ``is_single_B`` None: the mean over the valid anchors (``batch``). Given: the mean over the valid
    multi-camera anchors plus the mean over the valid single-camera anchors (``per_domain``), so the
    multi-camera anchors weigh as much as in a batch without videos and the videos add a term of
    their own; a domain without anchors adds 0."""
    valid_B = torch.ones_like(loss_B, dtype=torch.bool) if valid_B is None else valid_B
    if is_single_B is None:
        return mean_over_valid(loss_B, valid_B)
    return mean_over_valid(loss_B, valid_B & ~is_single_B) + mean_over_valid(loss_B, valid_B & is_single_B)
