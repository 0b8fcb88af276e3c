"""Instance loss (ReMix, SPEC 2.2): multi-positive contrastive loss of anchors against momentum keys.

    loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s(z_i, z~_p) / tau_i) / sum_j exp(s(z_i, z~_j) / tau_i) )

``P(i)`` = keys with the anchor's label. When the keys are the momentum keys of the anchors' own
batch (the ReMix setting), the anchor's own key ``z~_i`` is one of its positives: every anchor then
has at least one positive, and an identity with a single image in the batch still gets the
instance-discrimination signal (its own key against everything else). An anchor without any
positive key (possible only with a key set that excludes it) is left out of the mean.

Shape legend: B anchors, N keys, D embedding dim.
"""

from __future__ import annotations

import torch

from dynamix_core.losses.common import domain_mean, similarity


def instance_loss(
    anchor_BD: torch.Tensor,
    anchor_label_B: torch.Tensor,
    key_ND: torch.Tensor,
    key_label_N: torch.Tensor,
    tau: float | torch.Tensor,
    is_single_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Instance loss over anchors (per domain, summed, when ``is_single_B`` is given; see
    :func:`~dynamix_core.losses.common.domain_mean`).

    ``anchor_BD`` are unit-norm online embeddings ``z``; ``key_ND`` unit-norm momentum keys ``z~``
    (no gradient flows into them by construction of ``f~``); ``tau`` a float or per-anchor
    temperatures ``tau_B`` (see :func:`~dynamix_core.losses.common.anchor_temperatures`)."""
    tau_B1 = tau.reshape(-1, 1) if isinstance(tau, torch.Tensor) else tau
    logit_BN = similarity(anchor_BD, key_ND) / tau_B1
    log_prob_BN = logit_BN - torch.logsumexp(logit_BN, dim=1, keepdim=True)
    pos_BN = anchor_label_B[:, None] == key_label_N[None, :]
    num_pos_B = pos_BN.sum(dim=1)
    loss_B = -(log_prob_BN * pos_BN).sum(dim=1) / num_pos_B.clamp(min=1)
    return domain_mean(loss_B, num_pos_B > 0, is_single_B)
