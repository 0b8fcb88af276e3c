"""Centroid softmax cross-entropy computed chunk by chunk, in fp32, from low-precision centroid rows.

The loss of anchor ``i`` with unit feature ``z_i``, temperature ``tau_i`` and positive row ``p(i)`` is

    l_i = logsumexp_j (z_i . c_j / tau_i) - z_i . c_p(i) / tau_i,
    dl_i / dz_i = (sum_j softmax_ij c_j - c_p(i)) / tau_i.

The rows are visited ``chunk_rows`` at a time with an online (running-max) logsumexp, and the
softmax-weighted sum of rows that the gradient needs is accumulated in the same pass, the way
flash attention accumulates its output. So neither a B x N logit matrix nor an fp32 copy of the
bank ever exists, and autograd saves nothing per chunk: the gradient is attached analytically.
Centroids get no gradient (they are updated by momentum).

Legend: B anchors, D feature dim, N centroid rows, C rows of one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowMask:
    """Rows excluded from an anchor's softmax (its own identity's row never is):

    * rows never written (all-zero centroids: a logit of 0 for every anchor would otherwise flood
      the denominator with identities the bank knows nothing about yet);
    * with ``video_B``, the other identities of the anchor's own video (possible unmerged
      duplicates; SPEC 2.3b). Multi-camera anchors (video -1) mask no video.

    ``row_id_N``/``row_video_N``/``row_unwritten_N`` describe the rows the softmax runs over
    (global identity id, video id or -1, never-written flag)."""

    pid_B: Tensor
    video_B: Tensor | None
    row_id_N: Tensor
    row_video_N: Tensor
    row_unwritten_N: Tensor

    def apply_(self, logit_BC: Tensor, start: int, stop: int) -> None:
        """Set the masked logits of rows ``start:stop`` to -inf, in place."""
        row_id_C = self.row_id_N[start:stop]
        masked_BC = self.row_unwritten_N[start:stop][None, :].expand(logit_BC.shape[0], -1).clone()
        if self.video_B is not None:
            row_video_C = self.row_video_N[start:stop]
            masked_BC |= (row_video_C[None, :] == self.video_B[:, None]) & (self.video_B[:, None] >= 0)
        masked_BC &= row_id_C[None, :] != self.pid_B[:, None]
        logit_BC.masked_fill_(masked_BC, float("-inf"))


def chunk_logits(feat_BD: Tensor, inv_tau_B: Tensor, rows_ND: Tensor, start: int, stop: int,
                 mask: RowMask | None) -> tuple[Tensor, Tensor]:
    """fp32 logits of the anchors against rows ``start:stop`` (masked), and those rows in fp32."""
    rows_CD = rows_ND[start:stop].float()
    # the training step runs under autocast; this matmul must stay fp32 (SPEC 2.3b: fp16 storage only)
    with torch.autocast(device_type=feat_BD.device.type, enabled=False):
        logit_BC = (feat_BD @ rows_CD.T) * inv_tau_B[:, None]
    if mask is not None:
        mask.apply_(logit_BC, start, stop)
    return logit_BC, rows_CD


@torch.no_grad()
def softmax_stats(feat_BD: Tensor, inv_tau_B: Tensor, rows_ND: Tensor, chunk_rows: int,
                  mask: RowMask | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Running softmax statistics of fp32 ``feat_BD`` against ``rows_ND``.

    Returns ``(max_B, sumexp_B, weighted_BD)`` with ``sumexp = sum_j exp(l_ij - max_i)`` and
    ``weighted = sum_j exp(l_ij - max_i) c_j``. ``max`` starts at the lowest finite float rather
    than -inf so that fully masked chunks and empty shards never produce ``-inf - -inf = nan``."""
    num_anchors, dim = feat_BD.shape
    max_B = torch.full((num_anchors,), torch.finfo(torch.float32).min, device=feat_BD.device)
    sumexp_B = torch.zeros(num_anchors, device=feat_BD.device)
    weighted_BD = torch.zeros(num_anchors, dim, device=feat_BD.device)
    for start in range(0, rows_ND.shape[0], chunk_rows):
        stop = min(start + chunk_rows, rows_ND.shape[0])
        logit_BC, rows_CD = chunk_logits(feat_BD, inv_tau_B, rows_ND, start, stop, mask)
        new_max_B = torch.maximum(max_B, logit_BC.amax(dim=1))
        rescale_B = torch.exp(max_B - new_max_B)
        prob_BC = torch.exp(logit_BC - new_max_B[:, None])
        sumexp_B = sumexp_B * rescale_B + prob_BC.sum(dim=1)
        with torch.autocast(device_type=feat_BD.device.type, enabled=False):
            weighted_BD = weighted_BD * rescale_B[:, None] + prob_BC @ rows_CD
        max_B = new_max_B
    return max_B, sumexp_B, weighted_BD


class _AnalyticGradient(torch.autograd.Function):
    """Returns ``loss_B`` as a function of ``feat_BD`` whose Jacobian rows are ``grad_BD``."""

    @staticmethod
    def forward(ctx, feat_BD: Tensor, loss_B: Tensor, grad_BD: Tensor) -> Tensor:
        ctx.save_for_backward(grad_BD)
        ctx.feat_dtype = feat_BD.dtype
        return loss_B.clone()

    @staticmethod
    def backward(ctx, grad_loss_B: Tensor):
        (grad_BD,) = ctx.saved_tensors
        return (grad_loss_B[:, None] * grad_BD).to(ctx.feat_dtype), None, None


def cross_entropy_from_stats(feat_BD: Tensor, inv_tau_B: Tensor, max_B: Tensor, sumexp_B: Tensor,
                             weighted_BD: Tensor, positive_BD: Tensor) -> Tensor:
    """Per-anchor loss ``l_B`` (differentiable w.r.t. ``feat_BD``) from finished softmax statistics.

    ``positive_BD`` holds each anchor's own centroid in fp32; it must be one of the rows that
    ``sumexp`` summed over (the positive is never masked)."""
    with torch.no_grad():
        feat32_BD = feat_BD.detach().float()
        positive_logit_B = (feat32_BD * positive_BD).sum(dim=1) * inv_tau_B
        loss_B = max_B + torch.log(sumexp_B) - positive_logit_B
        grad_BD = (weighted_BD / sumexp_B[:, None] - positive_BD) * inv_tau_B[:, None]
    return _AnalyticGradient.apply(feat_BD, loss_B, grad_BD)


def cross_entropy_over_rows(feat_BD: Tensor, inv_tau_B: Tensor, rows_ND: Tensor, positive_row_B: Tensor,
                            chunk_rows: int, mask: RowMask | None = None) -> Tensor:
    """Per-anchor softmax cross-entropy of ``feat_BD`` over all of ``rows_ND``, positive ``positive_row_B``."""
    feat32_BD = feat_BD.detach().float()
    max_B, sumexp_B, weighted_BD = softmax_stats(feat32_BD, inv_tau_B, rows_ND, chunk_rows, mask)
    positive_BD = rows_ND[positive_row_B].float()
    return cross_entropy_from_stats(feat_BD, inv_tau_B, max_B, sumexp_B, weighted_BD, positive_BD)


@torch.no_grad()
def hardest_rows(feat_BD: Tensor, inv_tau_B: Tensor, rows_ND: Tensor, num_rows: int, excluded_N: Tensor,
                 chunk_rows: int, mask: RowMask | None = None) -> Tensor:
    """Indices of the ``num_rows`` rows with the highest logit for any anchor (masked rows and
    ``excluded_N`` rows never count), hardest first."""
    score_N = torch.empty(rows_ND.shape[0], device=feat_BD.device)
    feat32_BD = feat_BD.detach().float()
    for start in range(0, rows_ND.shape[0], chunk_rows):
        stop = min(start + chunk_rows, rows_ND.shape[0])
        logit_BC, _ = chunk_logits(feat32_BD, inv_tau_B, rows_ND, start, stop, mask)
        score_N[start:stop] = logit_BC.amax(dim=0)
    score_N.masked_fill_(excluded_N, float("-inf"))
    return torch.topk(score_N, num_rows, sorted=True).indices
