"""Camera-centroids loss (ReMix, SPEC 2.2; multi-camera anchors only).

Anchor ``z_i`` of identity ``y`` seen by camera ``c`` is pulled to the centroids of ``y`` as seen by
every *other* camera ``c' != c``, and pushed from the centroids of all other identities:

    loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / (exp(s_ip / tau) + sum_{n in N(i)} exp(s_in / tau)) )

with ``P(i)`` = centroids ``(y, c')``, ``c' != c``, and ``N(i)`` = centroids of identities ``!= y``.
Centroids ``(y, c)`` of the anchor's own camera appear nowhere. Anchors whose identity has no
centroid in another camera (and single-camera anchors) contribute nothing and are excluded from
the mean; with no valid anchor the loss is 0.

Shape legend: B anchors, C (identity, camera) centroids, D embedding dim.
"""

from __future__ import annotations

import torch

from dynamix_core.losses.common import mean_over_valid, similarity


def camera_centroid_loss(
    anchor_BD: torch.Tensor,
    pid_B: torch.Tensor,
    camid_B: torch.Tensor,
    is_multi_B: torch.Tensor,
    centroid_CD: torch.Tensor,
    centroid_pid_C: torch.Tensor,
    centroid_camid_C: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Mean Camera-centroids loss over the multi-camera anchors that have a positive centroid.

    ``centroid_CD`` unit-norm (identity, camera) centroids of the momentum encoder, with their
    global ``centroid_pid_C`` and ``centroid_camid_C``."""
    logit_BC = similarity(anchor_BD, centroid_CD) / tau
    same_pid_BC = pid_B[:, None] == centroid_pid_C[None, :]
    pos_BC = same_pid_BC & (camid_B[:, None] != centroid_camid_C[None, :]) & is_multi_B[:, None]
    neg_BC = ~same_pid_BC
    # log sum_{n in N(i)} exp(s_in / tau), or -inf when N(i) is empty. The all -inf row is replaced
    # by zeros before the log-sum-exp and the result masked afterwards: logsumexp's gradient is NaN
    # on an all -inf row, and torch.where routes no gradient to the branch it does not take.
    has_neg_B = neg_BC.any(dim=1)
    neg_logit_BC = logit_BC.masked_fill(~neg_BC, float("-inf")).where(has_neg_B[:, None], 0.0)
    log_neg_B = torch.logsumexp(neg_logit_BC, dim=1).where(has_neg_B, float("-inf"))
    # -log(exp(l_p) / (exp(l_p) + exp(log_neg))) = logaddexp(l_p, log_neg) - l_p, for every (i, p)
    term_BC = torch.logaddexp(logit_BC, log_neg_B[:, None]) - logit_BC
    num_pos_B = pos_BC.sum(dim=1)
    loss_B = (term_BC * pos_BC).sum(dim=1) / num_pos_B.clamp(min=1)
    return mean_over_valid(loss_B, num_pos_B > 0)
