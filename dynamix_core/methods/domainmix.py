"""DomainMix (SPEC 2.4; Wang et al., BMVC 2021): labeled synthetic images + clustered real images.

Identity space: synthetic identities are ``0..N_syn-1``; the reliable real clusters of the current
epoch follow as ``N_syn..N_syn+M-1``. The domain label of a sample is ``pid >= N_syn`` (1 = real);
the public code writes ``pid > N_syn`` and so calls the first real cluster synthetic.

Per epoch (:class:`RealClusterer`): the real images are clustered three times on one Jaccard
distance (k1 30, k2 6) with DBSCAN at ``eps - gap``, ``eps``, ``eps + gap`` (0.58 / 0.60 / 0.62),
min_samples 4, and filtered by the reliability criteria of SpCL (Ge et al., NeurIPS 2020) as the
DomainMix code applies them. DBSCAN noise points count as singleton clusters in every clustering.
With ``I(i)``, ``I_t(i)``, ``I_l(i)`` the sets of samples sharing sample i's cluster at the middle,
tight and loose radius:

* independence: ``R_indep(i) = 1 - |I(i) & I_l(i)| / |I(i) | I_l(i)|`` (0 when the loose clustering
  does not grow the cluster); a cluster's score is the minimum over its members. At the first
  epoch with a multi-image cluster, the threshold is frozen at the ``independence_quantile`` of the
  multi-image clusters' scores (sorted scores, index ``min(n - 1, round(q n))``, as the public code
  does). A cluster whose score exceeds it (it merges into a much larger loose cluster) is dropped.
* compactness: ``R_comp(i) = 1 - |I(i) & I_t(i)| / |I(i) | I_t(i)|``; a sample is kept only when its
  ``R_comp`` equals its cluster's minimum, i.e. when it lies in the cluster's largest tight
  sub-cluster (all largest ones on a tie); members of smaller tight sub-clusters and tight noise go.
* quantity: clusters left with fewer than ``min_cluster_size`` (5) images after the two criteria
  are dropped (this removes every singleton).

Kept clusters are renumbered in order of first appearance. The rows ``N_syn..N_syn+M-1`` of the
identity classifier are reset to the clusters' normalised centroids (:func:`reset_classifier_rows`).

Training (:class:`DomainMixSchedule`, :class:`DomainMixHead`): stage 1 (epochs ``< stage1_epochs``)
minimises ``10 CE + triplet``; in stage 2, one iteration in ``discriminator_period`` (10) trains the
discriminator alone (cross-entropy on synthetic vs real, features detached) and the others train the
encoder and classifier with ``CE + triplet + domain balance``. CE = label-smoothed (0.1)
cross-entropy over the active identities with logits / 2; triplet = soft-margin batch-hard.

Shape legend: N images, D feature dim, B batch, M real clusters, C classifier rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn

from dynamix_core.losses.classification import identity_cross_entropy, soft_margin_triplet_loss
from dynamix_core.losses.domain import MLPDiscriminator, domain_balance_loss
from dynamix_core.methods.cluster_contrast import (
    cluster_centroids,
    dbscan_precomputed,
    jaccard_distance,
    prune_distances,
    relabel_consecutive,
)
from dynamix_core.methods.config import DomainMixConfig

# --- reliability criteria ----------------------------------------------------------------------


def singletons_for_noise(labels_N: np.ndarray) -> np.ndarray:
    """Labels where each noise point (-1) gets a cluster of its own (ids after the real ones)."""
    labels_N = np.asarray(labels_N, dtype=np.int64).copy()
    noise = labels_N < 0
    labels_N[noise] = labels_N.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return labels_N


def overlap_distance(labels_N: np.ndarray, other_N: np.ndarray) -> np.ndarray:
    """``1 - IoU`` of the set of samples sharing i's label in ``labels_N`` and in ``other_N``, per
    sample (both labelings without noise). Counts per label and per label pair; no N x N matrix."""
    _, inv_a, size_a = np.unique(labels_N, return_inverse=True, return_counts=True)
    _, inv_b, size_b = np.unique(other_N, return_inverse=True, return_counts=True)
    _, inv_ab, size_ab = np.unique(np.stack([labels_N, other_N]), axis=1, return_inverse=True, return_counts=True)
    both = size_ab[inv_ab.reshape(-1)]
    return 1.0 - both / (size_a[inv_a] + size_b[inv_b] - both)


def cluster_minimum(score_N: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
    """Per sample, the minimum of ``score_N`` over the members of its cluster."""
    _, inv = np.unique(labels_N, return_inverse=True)
    low = np.full(inv.max() + 1, np.inf)
    np.minimum.at(low, inv, score_N)
    return low[inv]


def independence_scores(labels_N: np.ndarray, loose_N: np.ndarray) -> np.ndarray:
    """Per sample, its cluster's independence score ``min over members of R_indep`` (noise-free labels)."""
    return cluster_minimum(overlap_distance(labels_N, loose_N), labels_N)


def independence_threshold(labels_N: np.ndarray, indep_N: np.ndarray, quantile: float) -> float | None:
    """The ``quantile`` of the multi-image clusters' independence scores (public-code indexing);
    ``None`` when there is no multi-image cluster."""
    _, first, counts = np.unique(labels_N, return_index=True, return_counts=True)
    scores = np.sort(indep_N[first][counts > 1])  # the cluster score is shared by all members
    if not len(scores):
        return None
    return float(scores[min(len(scores) - 1, int(np.round(len(scores) * quantile)))])


@dataclass(frozen=True)
class ReliableClusters:
    """One epoch's real-image labels: ``labels[i]`` in ``0..num_clusters-1``, -1 = not used."""

    labels: np.ndarray
    num_clusters: int
    independence_threshold: float | None
    num_raw_clusters: int  # DBSCAN clusters at the middle radius, before the criteria


def reliable_clusters(labels_N: np.ndarray, tight_N: np.ndarray, loose_N: np.ndarray, threshold: float | None,
                      min_cluster_size: int) -> np.ndarray:
    """Apply independence (``threshold``; ``None`` drops everything), compactness and quantity
    (see the module doc) to DBSCAN labels at the middle, tight and loose radius (-1 = noise).
    Returns the kept samples' labels renumbered ``0..M-1``, -1 elsewhere."""
    if threshold is None:
        return np.full(len(labels_N), -1, dtype=np.int64)
    mid_N, tight_N, loose_N = (singletons_for_noise(x) for x in (labels_N, tight_N, loose_N))
    indep_N = independence_scores(mid_N, loose_N)
    comp_N = overlap_distance(mid_N, tight_N)
    keep_N = (indep_N <= threshold) & (comp_N <= cluster_minimum(comp_N, mid_N))
    kept_N = np.where(keep_N, mid_N, -1)
    size = np.bincount(kept_N[keep_N], minlength=mid_N.max() + 1)
    kept_N = np.where(keep_N & (size[np.maximum(kept_N, 0)] >= min_cluster_size), kept_N, -1)
    return relabel_consecutive(kept_N)[0]


class RealClusterer:
    """Per-epoch clustering of the real images with the frozen independence threshold as state."""

    def __init__(self, cfg: DomainMixConfig):
        self.cfg = cfg
        self.threshold: float | None = None

    def cluster(self, feat_ND: torch.Tensor) -> ReliableClusters:
        """Reliable clusters of the real images' (momentum-encoder) features ``feat_ND``."""
        cfg = self.cfg
        eps, gap, min_samples = cfg.cluster.eps, cfg.eps_gap, cfg.cluster.min_samples
        dist_csr = prune_distances(jaccard_distance(feat_ND, cfg.cluster), eps + gap)  # once for all three radii
        mid_N, tight_N, loose_N = (dbscan_precomputed(dist_csr, e, min_samples) for e in (eps, eps - gap, eps + gap))
        if self.threshold is None:
            mid = singletons_for_noise(mid_N)
            indep_N = independence_scores(mid, singletons_for_noise(loose_N))
            self.threshold = independence_threshold(mid, indep_N, cfg.independence_quantile)
        labels = reliable_clusters(mid_N, tight_N, loose_N, self.threshold, cfg.min_cluster_size)
        return ReliableClusters(labels=labels, num_clusters=int(labels.max(initial=-1)) + 1,
                                independence_threshold=self.threshold, num_raw_clusters=int(mid_N.max()) + 1)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"]


# --- identity space, classifier and schedule ---------------------------------------------------


def domain_labels(pid_B: torch.Tensor, num_synthetic: int) -> torch.Tensor:
    """Domain class of each sample: 0 = synthetic (``pid < N_syn``), 1 = real (``pid >= N_syn``)."""
    return (pid_B >= num_synthetic).long()


@torch.no_grad()
def reset_classifier_rows(weight_CD: torch.Tensor, centroid_MD: torch.Tensor, first_row: int) -> None:
    """Overwrite rows ``first_row..first_row+M-1`` of a classifier weight with the L2-normalised centroids."""
    stop = first_row + centroid_MD.shape[0]
    if stop > weight_CD.shape[0]:
        raise ValueError(f"{centroid_MD.shape[0]} real clusters from row {first_row} need {stop} classifier rows, "
                         f"the classifier has {weight_CD.shape[0]}: build it with more max_real_clusters")
    weight_CD[first_row:stop] = torch.nn.functional.normalize(centroid_MD.float(), dim=1).to(weight_CD)


class StepKind(str, Enum):
    """Which update a DomainMix iteration runs."""

    IDENTITY = "identity"  # stage 1: encoder + classifier on 10 CE + triplet
    DISCRIMINATOR = "discriminator"  # stage 2: the discriminator alone
    ENCODER = "encoder"  # stage 2: encoder + classifier on CE + triplet + domain balance


@dataclass(frozen=True)
class DomainMixSchedule:
    """Maps a global iteration (0-based, ``epoch * iters_per_epoch + i``) to its :class:`StepKind`.

    Stage 2 iterations are counted from the first iteration of stage 2; iteration ``k`` of stage 2
    trains the discriminator when ``k % discriminator_period == 0`` (the first one does)."""

    iters_per_epoch: int
    stage1_epochs: int
    discriminator_period: int = 10

    def __post_init__(self) -> None:
        if self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch: {self.iters_per_epoch} must be >= 1")

    @classmethod
    def from_config(cls, cfg: DomainMixConfig, iters_per_epoch: int) -> DomainMixSchedule:
        return cls(iters_per_epoch, cfg.stage1_epochs, cfg.discriminator_period)

    def step_kind(self, iteration: int) -> StepKind:
        stage2_iteration = iteration - self.stage1_epochs * self.iters_per_epoch
        if stage2_iteration < 0:
            return StepKind.IDENTITY
        return StepKind.DISCRIMINATOR if stage2_iteration % self.discriminator_period == 0 else StepKind.ENCODER


class DomainMixHead(nn.Module):
    """Identity classifier (bias-free linear over the neck features, one row per synthetic identity
    and up to ``max_real_clusters`` real clusters) and the synthetic-vs-real discriminator."""

    def __init__(self, dim: int, num_synthetic: int, max_real_clusters: int, cfg: DomainMixConfig):
        super().__init__()
        self.cfg = cfg
        self.num_synthetic = num_synthetic
        self.num_active = num_synthetic
        self.classifier = nn.Linear(dim, num_synthetic + max_real_clusters, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.discriminator = MLPDiscriminator(dim, 2, cfg.discriminator_hidden)

    def set_real_clusters(self, feat_ND: torch.Tensor, clusters: ReliableClusters) -> None:
        """Reset the real rows to this epoch's centroids and activate ``N_syn + M`` classes."""
        centroid_MD = cluster_centroids(feat_ND, clusters.labels, clusters.num_clusters)
        reset_classifier_rows(self.classifier.weight, centroid_MD, self.num_synthetic)
        self.num_active = self.num_synthetic + clusters.num_clusters

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters the encoder optimizer steps together with the encoder's (the classifier)."""
        return list(self.classifier.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def losses(self, kind: StepKind, feat_BD: torch.Tensor, neck_BD: torch.Tensor,
               pid_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to backpropagate, unweighted terms)`` of one iteration of ``kind``.

        ``feat_BD``: features for the triplet loss (the backbone output); ``neck_BD``: the BNNeck
        output that the classifier and discriminator read; ``pid_B``: ids in the space above. Only
        the optimizer of ``kind`` may step after the backward: an encoder step also leaves
        gradients in the discriminator (through the balance loss), which must not be applied."""
        cfg = self.cfg
        if kind is StepKind.DISCRIMINATOR:
            logit_BK = self.discriminator(neck_BD.detach())
            term = nn.functional.cross_entropy(logit_BK, domain_labels(pid_B, self.num_synthetic))
            return term, {"discriminator": term}
        logit_BC = self.classifier(neck_BD)[:, : self.num_active]
        terms = {
            "identity": identity_cross_entropy(logit_BC, pid_B, smoothing=cfg.label_smoothing,
                                               temperature=cfg.logit_temperature),
            "triplet": soft_margin_triplet_loss(feat_BD, pid_B),
        }
        if kind is StepKind.IDENTITY:
            return cfg.weight_identity_stage1 * terms["identity"] + cfg.weight_triplet * terms["triplet"], terms
        terms["balance"] = domain_balance_loss(self.discriminator(neck_BD))
        total = (cfg.weight_identity_stage2 * terms["identity"] + cfg.weight_triplet * terms["triplet"]
                 + cfg.weight_balance * terms["balance"])
        return total, terms
