"""One ReMix / DynaMix optimisation step (SPEC 2.2 steps 4-5, 2.3): encoder forward on both views,
momentum keys, Instance + Augmentation + Centroids + Camera-centroids losses, backward, clipping,
AdamW + LR schedule, EMA of the momentum encoder, momentum update of the centroid bank.

Shape legend: B images in the batch, D embedding dim, C (identity, camera) centroids.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynamix_core.centroids import CentroidBank
from dynamix_core.losses import (
    LossConfig,
    anchor_temperatures,
    augmentation_loss,
    camera_centroid_loss,
    instance_loss,
    total_loss,
)
from dynamix_core.model import MomentumEncoder
from dynamix_core.training.optim import OptimConfig, build_optimizer, lr_factor


@dataclass
class StepBatch:
    """One mixed batch on the training device. ``pid_B`` are global centroid-bank identity ids."""

    standard_BCHW: torch.Tensor
    strong_BCHW: torch.Tensor
    pid_B: torch.Tensor
    camid_B: torch.Tensor
    is_single_B: torch.Tensor  # bool
    video_B: torch.Tensor  # -1 for multi-camera images

    def to(self, device: torch.device) -> "StepBatch":
        return StepBatch(*(t.to(device, non_blocking=True) for t in (
            self.standard_BCHW, self.strong_BCHW, self.pid_B, self.camid_B, self.is_single_B, self.video_B)))


@dataclass
class StepOutput:
    terms: dict[str, float]  # unweighted loss terms and "total"
    lr: float
    grad_norm: float
    compute_s: float


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) over the data-parallel group."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())  # the list form: gloo (CPU) and NCCL both support it
    return torch.cat(parts)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel / compiled wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class TrainStep:
    """Owns the optimizer, schedule, momentum encoder, bank and camera centroids of one worker."""

    def __init__(self, model: nn.Module, bank: CentroidBank, *, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                 ema_momentum: float, total_steps: int, device: torch.device, bf16: bool = False,
                 data_parallel: bool = False, replicate_bank_updates: bool = False):
        self.model = model  # possibly DDP-wrapped
        self.momentum = MomentumEncoder(unwrap(model), ema_momentum).to(device)
        self.bank = bank
        self.loss_cfg = loss_cfg
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.device = device
        self.bf16 = bf16
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, optim_cfg))
        self.camera_centroids: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # a replicated bank must see every rank's keys, or the replicas drift apart
        self.replicate_bank_updates = replicate_bank_updates
        # BatchNorm running stats move with each rank's own batch after DDP broadcast them, so the
        # EMA copies of the buffers differ per rank; rank 0's are broadcast after every EMA step so
        # f~ (keys, centroids, labeling weights) is the same model on every rank
        self.data_parallel = data_parallel

    def set_camera_centroids(self, centroid_CD: torch.Tensor, pid_C: torch.Tensor, camid_C: torch.Tensor) -> None:
        self.camera_centroids = (F.normalize(centroid_CD.float(), dim=1).to(self.device),
                                 pid_C.to(self.device), camid_C.to(self.device))

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: StepBatch, step: int) -> StepOutput:
        t0 = time.perf_counter()
        self.model.train()
        B = batch.pid_B.shape[0]
        is_multi_B = ~batch.is_single_B
        with self._autocast():
            # both views in one forward: one pass through the backbone, one DDP gradient sync
            out_2BD = self.model(torch.cat([batch.standard_BCHW, batch.strong_BCHW]))
            key_BD = self.momentum.keys(batch.standard_BCHW)
        z_2BD = F.normalize(out_2BD.float(), dim=1)
        z_BD, strong_BD = z_2BD[:B], z_2BD[B:]
        key_BD = key_BD.float()
        lc = self.loss_cfg
        domain_B = batch.is_single_B if lc.anchor_mean == "per_domain" else None
        terms = {
            "instance": instance_loss(z_BD, batch.pid_B, key_BD, batch.pid_B,
                                      anchor_temperatures(is_multi_B, lc.tau_ins_multi, lc.tau_ins_single), domain_B),
            "augmentation": augmentation_loss(strong_BD, key_BD, batch.pid_B, lc.tau_aug, domain_B),
            "centroid": self.bank.loss(z_BD, batch.pid_B, self.bank.temperatures(batch.is_single_B), batch.video_B,
                                       domain_B),
        }
        if self.camera_centroids is not None:
            terms["camera_centroid"] = camera_centroid_loss(
                z_BD, batch.pid_B, batch.camid_B, is_multi_B, *self.camera_centroids, lc.tau_camera)
        loss, logged = total_loss(terms, lc)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.optim_cfg.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.momentum.update(unwrap(self.model))
        if self.data_parallel:
            import torch.distributed as dist

            for buf in self.momentum.model.buffers():
                dist.broadcast(buf, src=0)
        key_BD, pid_B = key_BD.detach(), batch.pid_B
        if self.replicate_bank_updates:
            key_BD, pid_B = _all_gather(key_BD), _all_gather(pid_B)
        self.bank.update(key_BD, pid_B, step)
        return StepOutput(terms=logged, lr=lr, grad_norm=float(grad_norm), compute_s=time.perf_counter() - t0)

    # --- checkpoint state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "model": unwrap(self.model).state_dict(),
            "momentum": self.momentum.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.camera_centroids is not None:  # they change the loss: a resume must continue with them
            state["camera_centroids"] = list(self.camera_centroids)
        return state

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.momentum.model.load_state_dict(state["momentum"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "camera_centroids" in state:
            self.camera_centroids = tuple(t.to(self.device) for t in state["camera_centroids"])
