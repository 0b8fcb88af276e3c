"""Adversarial domain / camera alignment pieces (DomainMix SPEC 2.4, CALR SPEC 2.5).

* :func:`grad_reverse` / :class:`GradientReversal` - identity forward, gradient times ``-lambda``
  backward (Ganin & Lempitsky, 2015), so a classifier behind it trains the features to fool it.
* :class:`MLPDiscriminator` - the DomainMix discriminator head (Linear-BN-LeakyReLU(0.2) x 3 ->
  Linear), also CALR's camera classifier.
* :func:`domain_balance_loss` - DomainMix's balance loss: the negative entropy of the discriminator's
  softmax, ``1/B sum_i sum_k p_ik ln p_ik``. Over K classes it is minimal, ``-ln K`` per sample, at
  the uniform output ``p_ik = 1/K`` (``-ln 2`` for synthetic vs real), where its gradient w.r.t.
  the logits, ``p_ik (ln p_ik + H_i)``, vanishes. (The public code adds a constant 0.5 per class.)

Shape legend: B samples, D feature dim, K classes of the discriminator.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return -ctx.lambd * grad_out, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """``x`` unchanged in the forward pass; the backward pass multiplies the gradient by ``-lambd``."""
    return _ReverseGradient.apply(x, lambd)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; ``lambd`` may be changed between steps (schedules)."""

    def __init__(self, lambd: float = 1.0):
        super().__init__()
        self.lambd = lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class MLPDiscriminator(nn.Sequential):
    """``Linear -> BatchNorm1d -> LeakyReLU(0.2)`` per hidden width, then ``Linear -> num_classes``
    logits (DomainMix's ``classifier_D`` with the default widths 1024, 512, 256)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (1024, 512, 256)):
        if num_classes < 2:
            raise ValueError(f"num_classes: {num_classes}; a discriminator needs at least 2 classes")
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def domain_balance_loss(logit_BK: torch.Tensor) -> torch.Tensor:
    """Mean negative entropy ``1/B sum_i sum_k p_ik ln p_ik`` of ``softmax(logit_BK)``."""
    log_p_BK = torch.log_softmax(logit_BK.to(torch.promote_types(logit_BK.dtype, torch.float32)), dim=1)
    return (log_p_BK.exp() * log_p_BK).sum(dim=1).mean()
