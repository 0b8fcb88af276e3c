"""MoCo v3 (Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021): the networks, the contrastive loss and the teacher's momentum.

Why MoCo v3 and not DINO with multi-crop (the two objectives of the field: LUPerson pre-trains
with MoCo v2, TransReID-SSL with DINO):

* **Cost.** MoCo v3 needs two views per image at the training size: 2 online forward+backward
  passes and 2 teacher forwards. DINO's recipe is 2 global + 6-10 local crops per image, and its
  quality depends on the local crops; on the 2-core CPU budget of the demo every image-pass counts.
* **Any timm backbone as built by the project.** Both views have the model's ``img_size``. Local
  crops at another size would need ViTs built with dynamic image size (position-embedding
  interpolation on every forward) and the exported weights to be re-gridded; MoCo v3 trains
  exactly the backbone that ``model.weights`` later loads.
* **Short runs.** DINO's self-distillation avoids collapse only through centring and sharpening
  of a 65k-way head with temperature and momentum schedules tuned over hundreds of epochs; the
  contrastive loss cannot collapse (the negatives push apart), so a few hundred steps already
  learn something, which is what the demo can afford.

The cost of that choice: negatives come from the batch (MoCo v3 has no queue), so the batch should
not be tiny, and two frames of the same person in one batch are false negatives (the single-camera
sampler caps images per video per batch for that reason).

Networks (MoCo v3 ``builder.py``):

* online: ``predictor(projector(backbone(x)))``; projector = ``projector_layers`` linear layers,
  BatchNorm + ReLU between them and an affine-free BatchNorm at the end; predictor = the same
  with ``predictor_layers`` layers and no final BatchNorm;
* teacher (:class:`KeyEncoder`): ``projector~(backbone~(x))``, a copy whose *parameters* follow
  the online ones by EMA. It runs in **train mode**: its BatchNorm layers normalise each key batch
  with that batch's own statistics and keep their own running statistics (they are not copied
  from the online network, whose statistics describe other weights).

Loss, for online queries ``q`` (B of this rank) and teacher keys ``k`` (all M of the global batch,
all-gathered), both L2-normalised, the positive of query ``i`` being key ``offset + i``:

    L(q, k) = 2 tau * mean_i [ -log( exp(q_i . k_{offset+i} / tau) / sum_j exp(q_i . k_j / tau) ) ]

and the step minimises ``L(q1, k2) + L(q2, k1)`` (symmetrised over the two views).

Teacher momentum at step ``t`` of ``T``: ``m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2``.

Legend: B queries of this rank, M keys of the global batch, D projector output dim, H hidden dim.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """``num_layers`` bias-free linear layers with BatchNorm + ReLU between them (MoCo v3's heads);
    ``last_bn`` appends an affine-free BatchNorm to the output (the projector, after SimCLR)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class OnlineNetwork(nn.Module):
    """Backbone + projector + predictor, trained by backprop.

    ``forward(x1, x2)`` embeds both views with *separate* passes (BatchNorm statistics per view, as
    MoCo v3) inside one module call, so a DistributedDataParallel wrapper sees one forward per
    backward."""

    def __init__(self, backbone: nn.Module, dim: int, mlp_dim: int, projector_layers: int, predictor_layers: int):
        super().__init__()
        self.backbone = backbone
        self.projector = build_mlp(projector_layers, backbone.num_features, mlp_dim, dim, last_bn=True)
        self.predictor = build_mlp(predictor_layers, dim, mlp_dim, dim, last_bn=False)

    def forward(self, x1_BCHW: torch.Tensor, x2_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.predictor(self.projector(self.backbone(x1_BCHW))),
                self.predictor(self.projector(self.backbone(x2_BCHW))))


class KeyEncoder(nn.Module):
    """The momentum teacher: copies of the online backbone and projector, no gradients, always in
    train mode (keys normalised with their own batch statistics, see the module docstring)."""

    def __init__(self, online: OnlineNetwork):
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)
        super().train(True)

    def train(self, mode: bool = True) -> KeyEncoder:
        """Stays in train mode whatever ``mode`` is: an eval-mode teacher would normalise keys with
        running statistics that lag its weights (an eval-mode key encoder broke the training step's keys)."""
        return self

    @torch.no_grad()
    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x_BCHW))


@torch.no_grad()
def ema_parameters(online: nn.Module, teacher: nn.Module, m: float) -> None:
    """``theta~ <- m theta~ + (1 - m) theta`` for every parameter ``teacher`` shares by name with
    ``online`` (the teacher's buffers, i.e. its BatchNorm running statistics, are its own)."""
    online_params = dict(online.named_parameters())
    names = [n for n, _ in teacher.named_parameters()]
    missing = [n for n in names if n not in online_params]
    if missing:
        raise ValueError(f"ema_parameters: the online network has no parameters {missing[:5]}; pass the "
                         "unwrapped online network (model.module under DistributedDataParallel)")
    teacher_params = dict(teacher.named_parameters())
    torch._foreach_lerp_([teacher_params[n] for n in names], [online_params[n].detach() for n in names], 1.0 - m)


def momentum_at(step: int, total_steps: int, m0: float, schedule: str = "cosine") -> float:
    """The teacher momentum ``m_t`` at 0-based ``step`` of ``total_steps`` (module docstring)."""
    if schedule == "constant":
        return m0
    progress = min(step, total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - m0) * 0.5 * (1.0 + math.cos(math.pi * progress))


def contrastive_loss(q_BD: torch.Tensor, k_MD: torch.Tensor, temperature: float, offset: int = 0,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's InfoNCE ``L(q, k)`` (module docstring) in float32, and the top-1 accuracy (the
    fraction of queries whose own key is the most similar), as ``(loss, accuracy)``.

    ``k_MD`` holds the keys of every rank (rank r's at rows ``r*B .. r*B+B-1``); ``offset`` is this
    rank's first row. Keys carry no gradient."""
    B, M = q_BD.shape[0], k_MD.shape[0]
    if not 0 <= offset <= M - B:
        raise ValueError(f"contrastive_loss: offset {offset} with {B} queries does not fit {M} keys")
    q_BD = F.normalize(q_BD.float(), dim=1)
    k_MD = F.normalize(k_MD.detach().float(), dim=1)
    logits_BM = q_BD @ k_MD.T / temperature
    target_B = torch.arange(B, device=q_BD.device) + offset
    loss = F.cross_entropy(logits_BM, target_B) * (2.0 * temperature)
    accuracy = (logits_BM.detach().argmax(dim=1) == target_B).float().mean()
    return loss, accuracy
