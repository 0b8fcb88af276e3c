"""Identity classification losses of the DomainMix recipe (SPEC 2.4): label-smoothed cross-entropy over
temperature-scaled logits, and the soft-margin batch-hard triplet loss.

Label-smoothed cross-entropy (Szegedy et al., 2016), logits divided by a temperature ``T``:

    q_ic = (1 - eps) [c == y_i] + eps / C,     loss = 1/B sum_i sum_c -q_ic log softmax_c(x_i / T)

Soft-margin batch-hard triplet (Hermans et al., 2017, "In Defense of the Triplet Loss"):

    loss = 1/|A| sum_{i in A} log(1 + exp(max_{p: y_p = y_i, p != i} d_ip - min_{n: y_n != y_i} d_in))

with Euclidean distances ``d`` (not squared). This is the ``SoftTripletLoss(margin=0)`` of MMT/SpCL
that DomainMix trains with: ``-log_softmax([d_ap, d_an])[1] = softplus(d_ap - d_an)``. ``A`` = anchors
that have both another positive and a negative in the batch (a P x K batch with K >= 2 has all).

Shape legend: B samples, C classes, D feature dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamix_core.losses.common import mean_over_valid


def identity_cross_entropy(
    logit_BC: torch.Tensor, target_B: torch.Tensor, *, smoothing: float = 0.1, temperature: float = 2.0
) -> torch.Tensor:
    """Mean label-smoothed cross-entropy of ``logit_BC / temperature`` against class ids ``target_B``.

    The smoothing mass ``eps / C`` is spread over all ``C`` columns of ``logit_BC``: pass only the
    classes that exist this epoch (DomainMix slices its classifier to the active identities)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: {smoothing} must lie in [0, 1)")
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    # label_smoothing in F.cross_entropy is exactly (1 - eps) one-hot + eps / C over the C columns
    return F.cross_entropy(logit_BC / temperature, target_B, label_smoothing=smoothing)


def soft_margin_triplet_loss(feat_BD: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
    """Soft-margin batch-hard triplet loss of ``feat_BD`` (used as given: no normalisation).

    The hardest positive and negative of each anchor are chosen on detached distances; the chosen
    distances are then recomputed from the feature differences, so the gradient is the exact
    (sub)gradient of the batch-hard loss without the ``sqrt`` of a zero self-distance in the graph."""
    with torch.no_grad():
        x_BD = feat_BD.detach().to(torch.promote_types(feat_BD.dtype, torch.float32))
        dist_BB = torch.cdist(x_BD, x_BD)
        same_BB = label_B[:, None] == label_B[None, :]
        other_BB = ~torch.eye(len(label_B), dtype=torch.bool, device=label_B.device)
        pos_BB, neg_BB = same_BB & other_BB, ~same_BB
        hard_pos_B = dist_BB.masked_fill(~pos_BB, float("-inf")).argmax(dim=1)
        hard_neg_B = dist_BB.masked_fill(~neg_BB, float("inf")).argmin(dim=1)
        valid_B = pos_BB.any(dim=1) & neg_BB.any(dim=1)
    d_ap_B = (feat_BD - feat_BD[hard_pos_B]).norm(dim=1)
    d_an_B = (feat_BD - feat_BD[hard_neg_B]).norm(dim=1)
    return mean_over_valid(F.softplus(d_ap_B - d_an_B), valid_B)
