"""Cluster-Contrast baseline (SPEC 2.6; Dai et al., 2021) and the clustering / memory pieces that
DomainMix and CALR build on.

Per epoch (:meth:`ClusterContrast.start_epoch`): momentum-encoder features of every train image ->
k-reciprocal Jaccard distance (k1 30, k2 6) -> DBSCAN (eps 0.6, min_samples 4) over the whole set ->
noise dropped -> a cluster memory whose rows are the clusters' normalised mean features -> P x K
batches of the clustered images (:class:`~dynamix_core.sampling.MultiCameraSampler`, the K images
spread over the cluster's cameras). Per step: InfoNCE of each online feature over the memory,

    loss_i = -log( exp(z_i . c_{y_i} / tau) / sum_k exp(z_i . c_k / tau) ),   tau = 0.05,

then the memory rows of the batch's clusters move towards the batch's momentum features
(``c <- m c + (1 - m) mean``, renormalised: the centroid bank's rule, applied once per cluster and
batch where the public code applies it once per sample).

Shape legend: N images, D feature dim, B batch, M clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from dynamix_core.centroids import CentroidBank
from dynamix_core.centroids.softmax import cross_entropy_over_rows
from dynamix_core.labeling import jaccard_distance_sparse
from dynamix_core.labeling.backends import dbscan_groups_sklearn
from dynamix_core.labeling.groups import group_layout
from dynamix_core.methods.config import ClusterContrastConfig, ClusterMemoryConfig, JaccardDbscanConfig
from dynamix_core.sampling import MultiCameraSampler

# --- clustering --------------------------------------------------------------------------------


def jaccard_distance(feat_ND: torch.Tensor, cfg: JaccardDbscanConfig) -> sp.csr_matrix:
    """Sparse k-reciprocal Jaccard distance over the whole set (missing entries = distance 1)."""
    return jaccard_distance_sparse(feat_ND, cfg.k1, cfg.k2)


def prune_distances(dist_csr: sp.csr_matrix, max_distance: float) -> sp.csr_matrix:
    """The entries ``<= max_distance`` only (the others read as "farther than any eps" just the same).

    The Jaccard matrix stores every pair sharing support after query expansion: ~4,400 entries per
    row at N = 5,000 (k1 30, k2 6), almost all far above eps. DBSCAN on it took 11 s on two cores,
    on the pruned matrix 0.03 s. Stored distances are >= TINY > 0, so zeroing marks exactly the
    dropped entries."""
    pruned = dist_csr.copy()
    pruned.data[pruned.data > max_distance] = 0.0
    pruned.eliminate_zeros()
    return pruned


def dbscan_precomputed(dist_csr: sp.csr_matrix, eps: float, min_samples: int) -> np.ndarray:
    """``sklearn.cluster.DBSCAN(metric="precomputed")`` over the whole sparse distance matrix:
    (N,) int64 labels, -1 = noise, clusters numbered in sklearn's order."""
    whole_set = group_layout(np.zeros(dist_csr.shape[0], dtype=np.int64), max_block_elements=1)
    return dbscan_groups_sklearn(whole_set, eps, min_samples, dist_csr=prune_distances(dist_csr, eps))


def cluster_jaccard_dbscan(feat_ND: torch.Tensor, cfg: JaccardDbscanConfig) -> np.ndarray:
    """Jaccard distance + DBSCAN: (N,) int64 cluster labels, -1 = noise."""
    return dbscan_precomputed(jaccard_distance(feat_ND, cfg), cfg.eps, cfg.min_samples)


def relabel_consecutive(labels_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber the non-negative labels 0..M-1 in order of first appearance (-1 stays); returns M."""
    labels_N = np.asarray(labels_N, dtype=np.int64)
    out_N = np.full_like(labels_N, -1)
    kept = labels_N >= 0
    _, first, inverse = np.unique(labels_N[kept], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    out_N[kept] = rank[inverse]
    return out_N, len(first)


def cluster_centroids(feat_ND: torch.Tensor, labels_N: np.ndarray, num_clusters: int) -> torch.Tensor:
    """(M, D) unit-norm mean feature of each cluster ``0..M-1`` (rows with label -1 are ignored)."""
    labels = torch.as_tensor(np.asarray(labels_N), device=feat_ND.device)
    kept = labels >= 0
    sum_MD = feat_ND.new_zeros(num_clusters, feat_ND.shape[1], dtype=torch.float32)
    sum_MD.index_add_(0, labels[kept], feat_ND[kept].float())
    return F.normalize(sum_MD, dim=1)  # the direction of the sum is that of the mean


# --- cluster memory ----------------------------------------------------------------------------


class ClusterMemory:
    """One row per cluster in a :class:`~dynamix_core.centroids.CentroidBank`, set to the clusters'
    centroids when built, then updated by momentum; InfoNCE over all rows, optionally weighted."""

    def __init__(self, centroid_MD: torch.Tensor, cfg: ClusterMemoryConfig, *, step: int = 0):
        num_clusters, dim = centroid_MD.shape
        self.cfg = cfg
        self.bank = CentroidBank(num_clusters, dim, cfg.bank_config(), device=centroid_MD.device)
        self.bank.load_rows(torch.arange(num_clusters, device=centroid_MD.device), centroid_MD, step=step)

    @property
    def num_clusters(self) -> int:
        return self.bank.num_identities

    def loss(self, feat_BD: torch.Tensor, label_B: torch.Tensor, weight_M: torch.Tensor | None = None) -> torch.Tensor:
        """``1/B sum_i w_{y_i} loss_i`` for unit online features ``feat_BD`` of clusters ``label_B``
        (``w = 1`` without ``weight_M``). Gradients reach ``feat_BD`` only."""
        inv_tau_B = feat_BD.new_full((len(label_B),), 1.0 / self.cfg.temperature, dtype=torch.float32)
        loss_B = cross_entropy_over_rows(feat_BD, inv_tau_B, self.bank.centroids, label_B, self.bank.cfg.chunk_rows)
        if weight_M is None:
            return loss_B.mean()
        return (loss_B * weight_M.to(loss_B)[label_B]).mean()

    def update(self, momentum_feat_BD: torch.Tensor, label_B: torch.Tensor, step: int) -> None:
        """Move the rows of the batch's clusters towards their momentum features (see the module doc)."""
        self.bank.update(momentum_feat_BD, label_B, step)


def cluster_sampler(labels_N: np.ndarray, camid_N: np.ndarray, *, images_per_id: int, seed: int = 0, rank: int = 0,
                    world_size: int = 1) -> MultiCameraSampler:
    """P x K sampler over the clustered images; a batch's refs are indices into the N images."""
    labels_N = np.asarray(labels_N)
    rows = np.flatnonzero(labels_N >= 0)
    if not len(rows):
        raise ValueError("no image was clustered this epoch (all DBSCAN noise): check the features or raise eps")
    return MultiCameraSampler(rows, labels_N[rows], np.asarray(camid_N)[rows], np.zeros(len(rows), dtype=np.int64),
                              images_per_id=images_per_id, cross_camera=True, balance_datasets=False, seed=seed,
                              rank=rank, world_size=world_size)


# --- the baseline's epoch hook -----------------------------------------------------------------


@dataclass(frozen=True)
class EpochClusters:
    """One epoch's pseudo-labels: ``labels[i]`` in ``0..num_clusters-1``, -1 = not used this epoch."""

    labels: np.ndarray
    num_clusters: int

    @property
    def num_used(self) -> int:
        return int((self.labels >= 0).sum())


class ClusterContrast:
    """Cluster-Contrast per-epoch state: pseudo-labels, cluster memory and P x K sampler.

        cc = ClusterContrast(cfg)
        for epoch ...:
            clusters = cc.start_epoch(feat_ND, camid_N, seed=epoch)   # f~ features of all train images
            for step ...:
                refs, label_B = cc.sampler.sample(cfg.num_ids_per_batch)
                loss = cc.memory.loss(z_BD, label_B); loss.backward(); ...
                cc.memory.update(z_momentum_BD, label_B, step)
    """

    def __init__(self, cfg: ClusterContrastConfig):
        self.cfg = cfg
        self.memory: ClusterMemory | None = None
        self.sampler: MultiCameraSampler | None = None

    def start_epoch(self, feat_ND: torch.Tensor, camid_N: np.ndarray, *, step: int = 0, seed: int = 0, rank: int = 0,
                    world_size: int = 1) -> EpochClusters:
        """Cluster ``feat_ND`` and rebuild the memory and the sampler from the clusters."""
        labels_N, num_clusters = relabel_consecutive(cluster_jaccard_dbscan(feat_ND, self.cfg.cluster))
        self.memory = ClusterMemory(cluster_centroids(feat_ND, labels_N, num_clusters), self.cfg.memory, step=step)
        self.sampler = cluster_sampler(labels_N, camid_N, images_per_id=self.cfg.images_per_id, seed=seed, rank=rank,
                                       world_size=world_size)
        return EpochClusters(labels_N, num_clusters)
