"""One MoCo v3 pre-training step (:mod:`dynamix_core.pretrain.moco`) in plain PyTorch: teacher EMA
at this step's momentum, online queries and teacher keys of both views, the symmetrised
contrastive loss over the all-gathered keys, backward, clipping, AdamW with warm-up + cosine.

Data parallel: pass ``gather`` (concatenate a tensor over the ranks, e.g.
``dynamix_core.training.step._all_gather``) and this rank's ``rank``; the online network may be
DistributedDataParallel-wrapped or compiled, the teacher is a plain module on every rank.

Legend: B images of this rank, C channels, H/W image size, D projector output dim.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dynamix_core.pretrain.config import MocoConfig
from dynamix_core.pretrain.moco import KeyEncoder, OnlineNetwork, contrastive_loss, ema_parameters, momentum_at
from dynamix_core.training.optim import OptimConfig, build_optimizer, lr_factor


def unwrap_online(model: nn.Module) -> OnlineNetwork:
    """The plain :class:`OnlineNetwork` inside a DistributedDataParallel and/or compiled wrapper."""
    for attr in ("module", "_orig_mod", "module"):
        model = getattr(model, attr, model)
    if not isinstance(model, OnlineNetwork):
        raise TypeError(f"expected an OnlineNetwork (possibly wrapped), got {type(model).__name__}")
    return model


@dataclass
class PretrainOutput:
    loss: float
    accuracy: float  # top-1 instance discrimination accuracy of the queries, both views
    lr: float
    momentum: float
    grad_norm: float
    compute_s: float

    def result(self, images: int, data_wait_s: float = 0.0):
        """This step for the engine's metric window."""
        from dynamix_core.engine import StepResult

        return StepResult(means={"loss/contrastive": self.loss, "pretrain/accuracy": self.accuracy},
                          last={"lr": self.lr, "momentum": self.momentum, "grad_norm": self.grad_norm},
                          images=images, timers={"data_wait": data_wait_s, "compute": self.compute_s})


class PretrainStep:
    """Owns the optimizer, the LR schedule and the teacher of one worker."""

    def __init__(self, online: nn.Module, cfg: MocoConfig, optim_cfg: OptimConfig, *, total_steps: int,
                 device: torch.device, bf16: bool = False, rank: int = 0,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.online = online  # possibly DDP-wrapped / compiled
        self.teacher = KeyEncoder(unwrap_online(online)).to(device)
        self.cfg, self.optim_cfg = cfg, optim_cfg
        self.total_steps = total_steps
        self.device, self.bf16 = device, bf16
        self.rank, self.gather = rank, gather
        self.optimizer = build_optimizer(online, optim_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, optim_cfg))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _all_keys(self, k_BD: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.gather is None:
            return k_BD, 0
        return self.gather(k_BD.contiguous()), self.rank * k_BD.shape[0]

    def __call__(self, x1_BCHW: torch.Tensor, x2_BCHW: torch.Tensor, step: int) -> PretrainOutput:
        t0 = time.perf_counter()
        m = momentum_at(step, self.total_steps, self.cfg.momentum, self.cfg.momentum_schedule)
        plain = unwrap_online(self.online)
        # MoCo v3 order: the teacher moves towards the current online weights, then makes the keys
        ema_parameters(plain, self.teacher, m)
        self.online.train()
        with self._autocast():
            q1_BD, q2_BD = self.online(x1_BCHW, x2_BCHW)
            k1_BD, k2_BD = self.teacher(x1_BCHW), self.teacher(x2_BCHW)
        k1_MD, offset = self._all_keys(k1_BD.float())
        k2_MD, _ = self._all_keys(k2_BD.float())
        loss12, acc12 = contrastive_loss(q1_BD, k2_MD, self.cfg.temperature, offset)
        loss21, acc21 = contrastive_loss(q2_BD, k1_MD, self.cfg.temperature, offset)
        loss = loss12 + loss21
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.optim_cfg.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.online.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return PretrainOutput(loss=float(loss.detach()), accuracy=float((acc12 + acc21) / 2), lr=lr, momentum=m,
                              grad_norm=float(grad_norm), compute_s=time.perf_counter() - t0)

    def backbone(self) -> nn.Module:
        """The backbone that is exported and monitored (``cfg.export``): online or teacher."""
        return unwrap_online(self.online).backbone if self.cfg.export == "online" else self.teacher.backbone

    # --- checkpoint state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"online": unwrap_online(self.online).state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        unwrap_online(self.online).load_state_dict(state["online"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
