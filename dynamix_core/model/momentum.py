"""The momentum encoder ``f~``: an exponential moving average of the online encoder ``f`` (SPEC 2.1).

``f~`` produces the keys of the Instance and Augmentation losses, the centroids and the pseudo-labels,
and it is the model that is deployed (ReMix keeps only the momentum encoder).

Mode choice (MoCo / BYOL / mean-teacher practice): the *training keys* (:meth:`MomentumEncoder.keys`)
normalise every BatchNorm layer with the key batch's own statistics and update ``f~``'s **own**
running statistics; dropout and stochastic depth stay off. Deployment, labelling, centroids and
evaluation (:meth:`MomentumEncoder.embed`, ``forward``) run in eval mode on those running statistics.

Why not eval mode with running statistics copied from ``f`` (the first design): those are statistics
of ``f``'s weights, not of the EMA weights. For a network trained from scratch they do not normalise
``f~``'s activations at all (at step 0 they are the (0, 1) defaults), and every key, centroid and
camera centroid collapsed onto one direction (mean key-key cosine 1.0 for the first ~20 steps), so
the contrastive losses had nothing to learn from.

Shape legend: B batch, C image channels, H/W image height/width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def ema_update(online: nn.Module, momentum_model: nn.Module, m: float = 0.999) -> None:
    """``theta~ <- m * theta~ + (1 - m) * theta`` for every parameter. Buffers (BatchNorm running
    statistics) are ``f~``'s own and are left alone: the key forwards update them.

    Call after every optimizer step. Both modules must have the same parameter and buffer names
    (pass the bare model, not a DistributedDataParallel wrapper)."""
    online_params = dict(online.named_parameters())
    ema_params = dict(momentum_model.named_parameters())
    online_buffers = dict(online.named_buffers())
    ema_buffers = dict(momentum_model.named_buffers())
    if online_params.keys() != ema_params.keys() or online_buffers.keys() != ema_buffers.keys():
        differ = sorted((online_params.keys() ^ ema_params.keys()) | (online_buffers.keys() ^ ema_buffers.keys()))
        raise ValueError(
            f"ema_update: online and momentum models differ in names {differ[:10]}; "
            "pass the unwrapped online model (model.module under DistributedDataParallel)"
        )
    names = list(ema_params)
    # One fused multi-tensor kernel for all parameters: lerp(a, b, w) = a + w (b - a) = m a + (1 - m) b.
    torch._foreach_lerp_([ema_params[n] for n in names], [online_params[n].detach() for n in names], 1.0 - m)


def _batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class MomentumEncoder(nn.Module):
    """A frozen copy of an encoder, updated by :func:`ema_update`; eval mode except in :meth:`keys`."""

    def __init__(self, online: nn.Module, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.model = copy.deepcopy(online)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> MomentumEncoder:
        """Record ``mode`` but keep the wrapped model in eval mode (see the module docstring)."""
        self.training = mode
        return self

    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online`` (after the optimizer step)."""
        ema_update(online, self.model, self.momentum)

    @torch.no_grad()
    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model(img_BCHW)

    @torch.no_grad()
    def embed(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Unit-norm deployment embeddings (eval mode, running statistics)."""
        return F.normalize(self.model(img_BCHW), dim=1)

    @torch.no_grad()
    def keys(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Unit-norm training keys ``z~``: BatchNorm on the batch's statistics (which also updates
        ``f~``'s running statistics), everything else as in eval mode."""
        layers = _batch_norm_layers(self.model)
        for layer in layers:
            layer.train()
        try:
            return F.normalize(self.model(img_BCHW), dim=1)
        finally:
            for layer in layers:
                layer.eval()
