"""The three clustering recipes as one interface for :mod:`pipelines.train.cluster_worker`.

Each adapter wraps a method core of :mod:`dynamix_core.methods` and says: which images are trained
on (the *pool*: refs of a batch index it) and which of them are clustered, what one epoch's
clustering does (``start_epoch``: labels over the pool, -1 = unused this epoch), the loss of a
batch, and what is updated after the optimizer step.

* Cluster-Contrast and CALR: the pool is the multi-camera train images, labels ignored (cameras kept:
  CALR clusters per camera and aligns cameras); every pool image is clustered.
* DomainMix: the pool is the labeled synthetic images (``data.multi``, identities ``0..N_syn-1``)
  followed by the real images (``data.single`` train split, labels ignored); only the real ones are
  clustered, their reliable clusters become identities ``N_syn + c``.

Every rank calls ``start_epoch`` with the same (all-gathered) features; the clustering code is
deterministic, so all ranks hold the same labels, memory and classifier rows (the worker checks it).

Shape legend: N clustered images, D feature dim, B batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynamix_core.losses.domain import MLPDiscriminator
from dynamix_core.methods import Calr, ClusterContrast, DomainMixHead, DomainMixSchedule, RealClusterer, StepKind
from dynamix_core.methods.calr import camera_alignment_loss
from dynamix_core.methods.cluster_contrast import cluster_sampler
from dynamix_core.data.train_sets import MultiCameraSet
from pipelines.train.methods_config import ClusterMethodSection


class LossNet(nn.Module):
    """Encoder + the method's trainable head. The loss is computed inside ``forward`` so that
    DistributedDataParallel sees every parameter use (a head used outside forward is not synced)."""

    def __init__(self, encoder: nn.Module, head: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, img_BCHW: torch.Tensor, loss_fn):
        feat_BD = self.encoder.features(img_BCHW)  # stripe-pooled when model.num_stripes > 1
        return loss_fn(feat_BD, self.encoder.neck(feat_BD), self.head)


class MemoryMethod:
    """Shared by Cluster-Contrast and CALR: the pool is the multi-camera train set, all clustered."""

    uses_momentum_keys = True  # the cluster memory moves towards f~ features of the batch

    def __init__(self, multi: MultiCameraSet, sec: ClusterMethodSection, *, rank: int, world: int):
        self.pool = multi
        self.cluster_rows = np.arange(len(multi.keys))
        self.sec, self.rank, self.world = sec, rank, world
        self.sampler = None
        self.labels = np.full(len(multi.keys), -1, dtype=np.int64)

    def optimizer_groups(self, net: LossNet) -> dict[str, nn.Module]:
        return {"encoder": net}

    def step_kind(self, step: int) -> str:
        return "encoder"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClusterContrastMethod(MemoryMethod):
    head = None
    find_unused_parameters = False

    def __init__(self, multi: MultiCameraSet, sec: ClusterMethodSection, *, dim: int, rank: int, world: int):
        super().__init__(multi, sec, rank=rank, world=world)
        self.core = ClusterContrast(sec.contrast_config())

    def start_epoch(self, feat_ND: torch.Tensor, epoch: int, step: int, seed: int) -> dict:
        clusters = self.core.start_epoch(feat_ND, self.pool.camid, step=step, seed=seed, rank=self.rank,
                                         world_size=self.world)
        self.labels, self.sampler = clusters.labels, self.core.sampler
        return {"num_clusters": clusters.num_clusters, "clustered_fraction": clusters.num_used / len(self.labels)}

    def loss_fn(self, label_B: torch.Tensor, camid_B: torch.Tensor, epoch: int, step: int):
        def fn(feat_BD, neck_BD, head):
            loss = self.core.memory.loss(F.normalize(neck_BD.float(), dim=1), label_B)
            return loss, {"contrast": loss}
        return fn

    def after_step(self, key_BD: torch.Tensor, label_B: torch.Tensor, step: int) -> None:
        self.core.memory.update(key_BD, label_B, step)


class CalrMethod(MemoryMethod):
    def __init__(self, multi: MultiCameraSet, sec: ClusterMethodSection, *, dim: int, rank: int, world: int,
                 seed: int = 0):
        super().__init__(multi, sec, rank=rank, world=world)
        self.cfg = sec.calr
        self.core = Calr(sec.calr, seed=seed)  # same seed on every rank: the same discard draws
        num_cameras = int(multi.camid.max()) + 1
        self.head = (MLPDiscriminator(dim, num_cameras, self.cfg.camera_classifier_hidden)
                     if self.cfg.camera_alignment_epochs > 0 and num_cameras >= 2 else None)
        self.find_unused_parameters = self.head is not None  # the camera classifier idles after its epochs

    def start_epoch(self, feat_ND: torch.Tensor, epoch: int, step: int, seed: int) -> dict:
        if epoch < self.cfg.local_epochs:
            local = self.core.local_epoch(feat_ND, self.pool.camid, epoch, step=step)
            self.labels, num, stats = local.labels, local.num_clusters, {"silhouette": local.silhouette}
        else:
            glob = self.core.global_epoch(feat_ND, self.pool.camid, epoch - self.cfg.local_epochs, step=step)
            self.labels, num = glob.labels, glob.num_clusters
            stats = {"discarded": float(glob.num_discarded), "discard_probability": glob.probability}
        self.sampler = cluster_sampler(self.labels, self.pool.camid, images_per_id=self.sec.images_per_id,
                                       seed=seed, rank=self.rank, world_size=self.world)
        return {"num_clusters": num, "clustered_fraction": float((self.labels >= 0).mean()), **stats}

    def loss_fn(self, label_B: torch.Tensor, camid_B: torch.Tensor, epoch: int, step: int):
        align = self.head is not None and self.core.camera_alignment_active(epoch)

        def fn(feat_BD, neck_BD, head):
            terms = {"contrast": self.core.loss(F.normalize(neck_BD.float(), dim=1), label_B)}
            if align:
                terms["camera_alignment"] = camera_alignment_loss(neck_BD.float(), camid_B, head, self.cfg.grl_lambda)
            return sum(terms.values()), terms
        return fn

    def after_step(self, key_BD: torch.Tensor, label_B: torch.Tensor, step: int) -> None:
        self.core.memory.update(key_BD, label_B, step)

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state)


class DomainMixMethod:
    uses_momentum_keys = False
    find_unused_parameters = True  # discriminator steps leave the encoder unused, stage 1 the discriminator

    def __init__(self, multi: MultiCameraSet, real: MultiCameraSet, sec: ClusterMethodSection, *, dim: int,
                 rank: int, world: int, steps_per_epoch: int):
        self.cfg, self.sec, self.rank, self.world = sec.domainmix, sec, rank, world
        self.num_synthetic = multi.num_identities
        self.num_synthetic_images = len(multi.keys)
        self.pool = MultiCameraSet(
            keys=multi.keys + real.keys, data=multi.data + real.data,
            pid=np.concatenate([multi.pid, np.full(len(real.keys), -1)]),
            camid=np.concatenate([multi.camid, real.camid + int(multi.camid.max()) + 1]),
            dataset=np.concatenate([multi.dataset, real.dataset]), num_identities=multi.num_identities)
        self.cluster_rows = np.arange(len(multi.keys), len(self.pool.keys))
        # clusters of < min_cluster_size images are dropped, so there are at most N_real // that many
        max_real = max(1, len(real.keys) // self.cfg.min_cluster_size)
        self.head = DomainMixHead(dim, self.num_synthetic, max_real, self.cfg)
        self.clusterer = RealClusterer(self.cfg)
        self.schedule = DomainMixSchedule.from_config(self.cfg, steps_per_epoch)
        self.sampler = None
        self.labels = self.pool.pid

    def start_epoch(self, feat_ND: torch.Tensor, epoch: int, step: int, seed: int) -> dict:
        clusters = self.clusterer.cluster(feat_ND)
        self.head.set_real_clusters(feat_ND.to(self.head.classifier.weight.device), clusters)
        real_N = np.where(clusters.labels >= 0, clusters.labels + self.num_synthetic, -1)
        self.labels = np.concatenate([self.pool.pid[: self.num_synthetic_images], real_N])
        self.sampler = cluster_sampler(self.labels, self.pool.camid, images_per_id=self.sec.images_per_id,
                                       seed=seed, rank=self.rank, world_size=self.world)
        return {"num_clusters": clusters.num_clusters, "num_raw_clusters": float(clusters.num_raw_clusters),
                "clustered_fraction": float((clusters.labels >= 0).mean())}

    def optimizer_groups(self, net: LossNet) -> dict[str, nn.Module]:
        return {"encoder": nn.ModuleDict({"encoder": net.encoder, "classifier": net.head.classifier}),
                "discriminator": net.head.discriminator}

    def step_kind(self, step: int) -> str:
        return "discriminator" if self.schedule.step_kind(step) is StepKind.DISCRIMINATOR else "encoder"

    def loss_fn(self, label_B: torch.Tensor, camid_B: torch.Tensor, epoch: int, step: int):
        kind = self.schedule.step_kind(step)

        def fn(feat_BD, neck_BD, head):
            return head.losses(kind, feat_BD.float(), neck_BD.float(), label_B)
        return fn

    def after_step(self, key_BD, label_B, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return self.clusterer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.clusterer.load_state_dict(state)


def build_method(method: str, multi: MultiCameraSet, real: MultiCameraSet | None, sec: ClusterMethodSection, *,
                 dim: int, rank: int, world: int, steps_per_epoch: int, seed: int):
    if method == "cluster_contrast":
        return ClusterContrastMethod(multi, sec, dim=dim, rank=rank, world=world)
    if method == "calr":
        return CalrMethod(multi, sec, dim=dim, rank=rank, world=world, seed=seed)
    if method == "domainmix":
        return DomainMixMethod(multi, real, sec, dim=dim, rank=rank, world=world, steps_per_epoch=steps_per_epoch)
    raise ValueError(f"method {method!r} is not a clustering method")
