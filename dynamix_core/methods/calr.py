"""CALR (SPEC 2.5): camera-aware label refinement for unsupervised re-ID with known camera ids.

Stage 1 (local labels, :func:`local_camera_clusters`, :class:`LocalLabelSelector`): each camera's
images are clustered alone - agglomerative clustering, average linkage, ``N_c // 5`` clusters, on
the k-reciprocal Jaccard distance (k1 15, k2 4) computed within the camera. The model trains on a
cluster memory over these local clusters; every epoch's local labels are scored by the silhouette
coefficient (within each camera, on that camera's Jaccard distance; the camera scores averaged with
weights ``N_c`` over the cameras where it is defined, i.e. 2 <= clusters <= N_c - 1), and the labels
of the best epoch are kept as the *local* labels.

Stage 2, every epoch (:meth:`Calr.global_epoch`):
1. global clusters: DBSCAN on the Jaccard distance over all images, or connected components of the
   kNN graph (each image linked to those of its ``k`` (15) nearest neighbours with cosine >= 0.5,
   links made symmetric) with components of <= 4 images dropped;
2. pivot of a global cluster = its member of highest *density*, the density of member i being
   ``sum of s(z_i, z_j)`` over its ``min(density_k, n - 1)`` most similar other members j of the same
   cluster (ties: the lowest index);
3. a member in the pivot's camera whose local label differs from the pivot's local label conflicts
   with the pivot (one camera's local clustering separated them); each conflicting member is
   discarded with probability ``p`` (1.0 default; cosine schedule ``p_e = p (1 + cos(pi e / E)) / 2``
   over the stage-2 epochs, so conflicting members are progressively let back in);
4. cluster weights ``w_k = ln(1 + H_k)``, ``H_k = -sum_c q_kc ln q_kc`` the entropy of the camera
   distribution of cluster k's kept members (a one-camera cluster gets 0), from stage-2 epoch
   ``entropy_warmup_epochs`` (5) on; before that every weight is 1.

Losses: the cluster-memory InfoNCE (tau 0.05, momentum 0.1) with each anchor's loss multiplied by
its cluster's weight (``1/B sum_i w_{y_i} loss_i``), and for the first ``camera_alignment_epochs``
(3) training epochs a camera classifier (MLP) behind a gradient reversal layer (lambda 1), trained
with cross-entropy on the camera ids (:func:`camera_alignment_loss`).

Shape legend: N images, D feature dim, K neighbours, B batch, M clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score

from dynamix_core.labeling import jaccard_distance_sparse, knn
from dynamix_core.labeling.groups import group_layout
from dynamix_core.losses.domain import MLPDiscriminator, grad_reverse
from dynamix_core.methods.cluster_contrast import (
    ClusterMemory,
    cluster_centroids,
    cluster_jaccard_dbscan,
    relabel_consecutive,
)
from dynamix_core.methods.config import CalrConfig

_CHUNK_ROWS = 4096

# --- stage 1: local (per-camera) clusters ------------------------------------------------------


@dataclass(frozen=True)
class LocalClustering:
    """Per-camera cluster labels, unique across cameras (cameras in increasing id order)."""

    labels: np.ndarray  # (N,) int64
    num_clusters: int
    silhouette: float  # NaN where no camera has a defined silhouette


def local_camera_clusters(feat_ND: torch.Tensor, camid_N: np.ndarray, cfg: CalrConfig) -> LocalClustering:
    """Average-linkage agglomerative clustering of each camera's images alone (see the module doc)."""
    camid_N = np.asarray(camid_N)
    cams, sizes = np.unique(camid_N, return_counts=True)
    if sizes.max() > cfg.max_camera_size:
        cam = cams[sizes.argmax()]
        raise ValueError(f"camera {cam} has {sizes.max()} images, more than max_camera_size={cfg.max_camera_size}: "
                         "average linkage needs a dense N_c x N_c matrix; raise max_camera_size if memory allows")
    layout = group_layout(camid_N, max_block_elements=1 << 24)
    dist_csr = jaccard_distance_sparse(feat_ND, cfg.local_k1, cfg.local_k2, layout=layout)
    labels_N = np.full(len(camid_N), -1, dtype=np.int64)
    offset, weighted_sum, weight = 0, 0.0, 0
    for g in range(len(layout.group_ids)):
        rows = layout.rows_of(g)
        num_clusters = max(1, len(rows) // cfg.local_cluster_divisor)
        local = np.zeros(len(rows), dtype=np.int64)
        if num_clusters > 1:
            dist_cc = _dense_distance(dist_csr, rows)
            local = AgglomerativeClustering(n_clusters=num_clusters, metric="precomputed",
                                            linkage="average").fit_predict(dist_cc).astype(np.int64)
            if num_clusters < len(rows):  # the silhouette needs 2 <= clusters <= N_c - 1
                weighted_sum += len(rows) * silhouette_score(dist_cc, local, metric="precomputed")
                weight += len(rows)
        labels_N[rows] = local + offset
        offset += num_clusters
    return LocalClustering(labels_N, offset, weighted_sum / weight if weight else float("nan"))


def _dense_distance(dist_csr: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Dense Jaccard distances among ``rows``: unstored pairs are at distance 1, the diagonal 0."""
    sub = dist_csr[rows][:, rows].tocoo()
    dense = np.ones((len(rows), len(rows)))
    dense[sub.row, sub.col] = sub.data
    np.fill_diagonal(dense, 0.0)
    return dense


class LocalLabelSelector:
    """Keeps the local labels of the stage-1 epoch with the highest silhouette (the first on a tie)."""

    def __init__(self) -> None:
        self.best: LocalClustering | None = None
        self.best_epoch: int | None = None

    def offer(self, epoch: int, clustering: LocalClustering) -> bool:
        """Keep ``clustering`` if it beats the best so far; returns whether it was kept."""
        score, best = clustering.silhouette, self.best
        # NaN (no camera with a defined silhouette) loses to any number
        better = best is None or (not math.isnan(score) and (math.isnan(best.silhouette) or score > best.silhouette))
        if not better:
            return False
        self.best, self.best_epoch = clustering, epoch
        return True

    @property
    def labels(self) -> np.ndarray:
        if self.best is None:
            raise ValueError("no local labels yet: run at least one stage-1 epoch (CalrConfig.local_epochs >= 1)")
        return self.best.labels

    def state_dict(self) -> dict:
        if self.best is None:
            return {"best_epoch": None}
        return {"best_epoch": self.best_epoch, "labels": self.best.labels.tolist(),
                "num_clusters": self.best.num_clusters, "silhouette": self.best.silhouette}

    def load_state_dict(self, state: dict) -> None:
        self.best_epoch = state["best_epoch"]
        self.best = None if self.best_epoch is None else LocalClustering(
            np.asarray(state["labels"], dtype=np.int64), int(state["num_clusters"]), float(state["silhouette"]))


# --- stage 2: global clusters and pivot refinement ---------------------------------------------


def knn_graph_clusters(feat_ND: torch.Tensor, k: int, min_similarity: float, min_cluster_size: int) -> np.ndarray:
    """Connected components of the symmetric kNN graph with edges of cosine >= ``min_similarity``;
    components smaller than ``min_cluster_size`` -> -1; labels renumbered by first appearance."""
    num_rows = feat_ND.shape[0]
    idx_NK = knn(feat_ND, k + 1)[:, 1:]  # column 0 is the row itself
    unit_ND = F.normalize(feat_ND.float(), dim=1)
    idx_t_NK = torch.as_tensor(idx_NK, device=feat_ND.device)
    sim_NK = np.concatenate([  # row chunks bound the (rows, K, D) gather
        torch.einsum("cd,ckd->ck", unit_ND[s : s + _CHUNK_ROWS], unit_ND[idx_t_NK[s : s + _CHUNK_ROWS]]).cpu().numpy()
        for s in range(0, num_rows, _CHUNK_ROWS)
    ])
    rows, cols = np.nonzero(sim_NK >= min_similarity)
    graph = sp.coo_matrix((np.ones(len(rows)), (rows, idx_NK[rows, cols])), shape=(num_rows, num_rows))
    _, comp_N = connected_components(graph, directed=False)
    size = np.bincount(comp_N)
    return relabel_consecutive(np.where(size[comp_N] >= min_cluster_size, comp_N, -1))[0]


def member_density(feat_ND: torch.Tensor, labels_N: np.ndarray, k: int) -> np.ndarray:
    """Density of each clustered member (see the module doc); NaN for unclustered rows."""
    unit_ND = F.normalize(feat_ND.float(), dim=1)
    density_N = np.full(len(labels_N), np.nan)
    order = np.argsort(labels_N, kind="stable")
    bounds = np.flatnonzero(np.diff(labels_N[order])) + 1
    for members in np.split(order, bounds):
        if labels_N[members[0]] < 0:
            continue
        x_MD = unit_ND[torch.as_tensor(members, device=feat_ND.device)]
        sim_MM = (x_MD @ x_MD.T).fill_diagonal_(float("-inf"))
        kk = min(k, len(members) - 1)
        density_N[members] = sim_MM.topk(kk, dim=1).values.sum(dim=1).cpu().numpy() if kk else 0.0
    return density_N


def cluster_pivots(density_N: np.ndarray, labels_N: np.ndarray, num_clusters: int) -> np.ndarray:
    """(M,) index of the densest member of each cluster ``0..M-1`` (lowest index on a tie)."""
    rows = np.flatnonzero(labels_N >= 0)
    order = rows[np.lexsort((rows, -density_N[rows], labels_N[rows]))]
    first = np.r_[True, np.diff(labels_N[order]) != 0]
    pivots = np.full(num_clusters, -1, dtype=np.int64)
    pivots[labels_N[order[first]]] = order[first]
    return pivots


def pivot_conflicts(global_N: np.ndarray, local_N: np.ndarray, camid_N: np.ndarray, pivot_M: np.ndarray) -> np.ndarray:
    """(N,) bool: clustered member in its pivot's camera but not in its pivot's local cluster."""
    clustered = global_N >= 0
    pivot_N = pivot_M[np.maximum(global_N, 0)]
    return clustered & (camid_N == camid_N[pivot_N]) & (local_N != local_N[pivot_N])


def discard_probability(stage2_epoch: int, cfg: CalrConfig) -> float:
    """Discard probability of conflicting members at a stage-2 epoch (constant or cosine decay)."""
    if cfg.discard_schedule == "constant":
        return cfg.discard_probability
    progress = min(stage2_epoch / cfg.stage2_epochs, 1.0)
    return cfg.discard_probability * 0.5 * (1.0 + math.cos(math.pi * progress))


def pivot_refine(global_N: np.ndarray, local_N: np.ndarray, camid_N: np.ndarray, pivot_M: np.ndarray,
                 probability: float, rng: np.random.Generator) -> np.ndarray:
    """Global labels with each conflicting member set to -1 with ``probability``: one uniform draw
    per image in index order (``rng.random(N) < p``), so p = 1 discards exactly the conflicts."""
    discard_N = pivot_conflicts(global_N, local_N, camid_N, pivot_M) & (rng.random(len(global_N)) < probability)
    return np.where(discard_N, -1, global_N)


def camera_entropy_weights(labels_N: np.ndarray, camid_N: np.ndarray, num_clusters: int) -> np.ndarray:
    """(M,) ``ln(1 + H_k)``, ``H_k`` the natural-log entropy of cluster k's camera distribution."""
    kept = labels_N >= 0
    _, cam_code = np.unique(camid_N[kept], return_inverse=True)
    num_cams = int(cam_code.max()) + 1 if len(cam_code) else 1
    count_MC = np.bincount(labels_N[kept] * num_cams + cam_code, minlength=num_clusters * num_cams)
    count_MC = count_MC.reshape(num_clusters, num_cams)
    q_MC = count_MC / np.maximum(count_MC.sum(axis=1, keepdims=True), 1)
    entropy_M = -(q_MC * np.log(np.where(q_MC > 0, q_MC, 1.0))).sum(axis=1)
    return np.log1p(entropy_M)


# --- losses and the epoch hook -----------------------------------------------------------------


def camera_alignment_loss(feat_BD: torch.Tensor, camid_B: torch.Tensor, camera_classifier: MLPDiscriminator,
                          lambd: float) -> torch.Tensor:
    """Cross-entropy of the camera classifier on gradient-reversed features (camera ids ``0..C-1``):
    the classifier learns to tell cameras apart, the encoder to make them indistinguishable."""
    return F.cross_entropy(camera_classifier(grad_reverse(feat_BD, lambd)), camid_B)


@dataclass(frozen=True)
class GlobalClusters:
    """One stage-2 epoch's labels (``0..M-1``, -1 = unused) and per-cluster loss weights."""

    labels: np.ndarray
    num_clusters: int
    weights: np.ndarray  # (M,)
    num_discarded: int
    probability: float


class Calr:
    """CALR per-epoch state: local-label selection (stage 1), refined global labels, cluster weights
    and the cluster memory (stage 2).

        calr = Calr(cfg, seed=0)
        for epoch in range(cfg.local_epochs):        # stage 1: labels = calr.local_epoch(...).labels
        for e in range(cfg.stage2_epochs):           # stage 2: labels = calr.global_epoch(...).labels
            per step: loss = calr.loss(z_BD, label_B) [+ camera_alignment_loss(...) while
                      calr.camera_alignment_active(epoch)]; calr.memory.update(z_momentum_BD, label_B, step)
    """

    def __init__(self, cfg: CalrConfig, *, seed: int = 0):
        self.cfg = cfg
        self.selector = LocalLabelSelector()
        self.rng = np.random.default_rng(seed)
        self.memory: ClusterMemory | None = None
        self.weight_M: torch.Tensor | None = None  # None in stage 1: unweighted

    def loss(self, feat_BD: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        """The epoch's cluster-memory loss, weighted per cluster in stage 2."""
        if self.memory is None:
            raise ValueError("Calr.loss before any epoch: call local_epoch or global_epoch first")
        return self.memory.loss(feat_BD, label_B, self.weight_M)

    def camera_alignment_active(self, epoch: int) -> bool:
        """Whether training epoch ``epoch`` (0-based, stage 1 first) adds the camera alignment loss."""
        return epoch < self.cfg.camera_alignment_epochs

    def local_epoch(self, feat_ND: torch.Tensor, camid_N: np.ndarray, epoch: int, *, step: int = 0) -> LocalClustering:
        """Stage 1: cluster each camera, offer the labels to the selector, build the memory over them."""
        clustering = local_camera_clusters(feat_ND, camid_N, self.cfg)
        self.selector.offer(epoch, clustering)
        self.memory = ClusterMemory(cluster_centroids(feat_ND, clustering.labels, clustering.num_clusters),
                                    self.cfg.memory, step=step)
        self.weight_M = None
        return clustering

    def global_epoch(self, feat_ND: torch.Tensor, camid_N: np.ndarray, stage2_epoch: int, *,
                     step: int = 0) -> GlobalClusters:
        """Stage 2: global clusters, pivot refinement with the local labels, weights, memory."""
        cfg, camid_N = self.cfg, np.asarray(camid_N)
        if cfg.global_method == "dbscan":
            global_N = cluster_jaccard_dbscan(feat_ND, cfg.global_dbscan)
        else:
            global_N = knn_graph_clusters(feat_ND, cfg.knn_k, cfg.knn_min_similarity, cfg.knn_min_cluster_size)
        num_clusters = int(global_N.max(initial=-1)) + 1
        pivot_M = cluster_pivots(member_density(feat_ND, global_N, cfg.density_k), global_N, num_clusters)
        probability = discard_probability(stage2_epoch, cfg)
        refined_N = pivot_refine(global_N, self.selector.labels, camid_N, pivot_M, probability, self.rng)
        if stage2_epoch < cfg.entropy_warmup_epochs:
            weight_M = np.ones(num_clusters)
        else:
            weight_M = camera_entropy_weights(refined_N, camid_N, num_clusters)
        self.memory = ClusterMemory(cluster_centroids(feat_ND, refined_N, num_clusters), cfg.memory, step=step)
        self.weight_M = torch.as_tensor(weight_M, dtype=torch.float32, device=feat_ND.device)
        return GlobalClusters(refined_N, num_clusters, weight_M, int(((global_N >= 0) & (refined_N < 0)).sum()),
                              probability)

    def state_dict(self) -> dict:
        return {"selector": self.selector.state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state["selector"])
        self.rng.bit_generator.state = state["rng"]
