"""Augmentation loss (ReMix, SPEC 2.2): pull the strong view of an image to the momentum key of its
standard view, push it from the keys of the other identities in the batch.

    loss_i = -log( exp(s(z^str_i, z~_i) / tau) / (exp(s(z^str_i, z~_i) / tau) + sum_{j: y_j != y_i} exp(s(z^str_i, z~_j) / tau)) )

Keys of the anchor's own identity other than its own are in neither the numerator nor the
denominator. An anchor without other-identity keys gets loss 0 (and zero gradient).

Shape legend: B images (anchors and keys are aligned: key i is image i's standard view), D embedding dim.
"""

from __future__ import annotations

import torch

from dynamix_core.losses.common import domain_mean, similarity


def augmentation_loss(
    strong_BD: torch.Tensor,
    key_BD: torch.Tensor,
    label_B: torch.Tensor,
    tau: float | torch.Tensor,
    is_single_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Augmentation loss (per domain, summed, when ``is_single_B`` is given). ``strong_BD`` unit-norm online embeddings of the strong views,
    ``key_BD`` unit-norm momentum keys of the standard views of the same images, in the same order;
    ``tau`` a float or per-anchor ``tau_B``."""
    tau_B1 = tau.reshape(-1, 1) if isinstance(tau, torch.Tensor) else tau
    logit_BB = similarity(strong_BD, key_BD) / tau_B1
    own_BB = torch.eye(len(label_B), dtype=torch.bool, device=label_B.device)
    # The denominator runs over the own key (the positive) and the other identities' keys; the
    # positive is always present, so the log-sum-exp never sees an all -inf row.
    in_denominator_BB = own_BB | (label_B[:, None] != label_B[None, :])
    log_denominator_B = torch.logsumexp(logit_BB.masked_fill(~in_denominator_BB, float("-inf")), dim=1)
    return domain_mean(log_denominator_B - logit_BB.diagonal(), None, is_single_B)
