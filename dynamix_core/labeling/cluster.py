"""``cluster_videos``: DBSCAN run separately inside each video, every backend behind one call."""

from __future__ import annotations

import numpy as np
import torch

from dynamix_core.labeling.backends import cuml_available, dbscan_groups_cuml, dbscan_groups_sklearn
from dynamix_core.labeling.config import ClusterConfig
from dynamix_core.labeling.dbscan_torch import dbscan_groups_torch
from dynamix_core.labeling.groups import group_layout
from dynamix_core.labeling.jaccard import jaccard_distance_sparse

def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> cuml when importable and the features live on a GPU, else the batched torch backend."""
    if backend == "auto":
        return "cuml" if device.type == "cuda" and cuml_available() else "torch"
    return backend


def cluster_videos(
    embeddings: np.ndarray | torch.Tensor,
    video_ids: np.ndarray,
    eps: float,
    min_samples: int,
    metric: str = "cosine",
    backend: str = "auto",
    *,
    k1: int = 20,
    k2: int = 6,
    max_block_elements: int = 1 << 24,
) -> np.ndarray:
    """One int64 label per row: DBSCAN inside each video, -1 = noise.

    Cluster ids are unique across videos and consecutive: videos in increasing id order, inside a
    video clusters numbered as ``sklearn.cluster.DBSCAN`` numbers them when run on that video's rows
    in input order (the sklearn and torch backends return identical arrays). ``metric="jaccard"``
    uses the k-reciprocal Jaccard distance computed within each video (``k1``, ``k2``)."""
    cfg = ClusterConfig(eps=eps, min_samples=min_samples, metric=metric, backend=backend, k1=k1, k2=k2,
                        max_block_elements=max_block_elements)  # validates the values
    return cluster_videos_cfg(embeddings, video_ids, cfg)


def cluster_videos_cfg(embeddings: np.ndarray | torch.Tensor, video_ids: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    """:func:`cluster_videos` driven by a :class:`ClusterConfig`."""
    feat_ND = torch.as_tensor(embeddings)
    video_ids = np.asarray(video_ids)
    if feat_ND.ndim != 2 or video_ids.shape != (feat_ND.shape[0],):
        raise ValueError(
            f"embeddings must be (N, D) and video_ids (N,), got {tuple(feat_ND.shape)} and {video_ids.shape}"
        )
    backend = resolve_backend(cfg.backend, feat_ND.device)
    layout = group_layout(video_ids, cfg.max_block_elements)
    dist_csr = None
    if cfg.metric == "jaccard":
        dist_csr = jaccard_distance_sparse(feat_ND, cfg.k1, cfg.k2, layout=layout)
    if backend == "torch":
        return dbscan_groups_torch(
            layout, cfg.eps, cfg.min_samples, feat_ND=None if dist_csr is not None else feat_ND,
            dist_csr=dist_csr, device=feat_ND.device,
        )
    if backend == "cuml":
        return dbscan_groups_cuml(
            layout, cfg.eps, cfg.min_samples, feat_ND=None if dist_csr is not None else feat_ND, dist_csr=dist_csr
        )
    feat64 = None if dist_csr is not None else feat_ND.detach().cpu().double().numpy()
    return dbscan_groups_sklearn(layout, cfg.eps, cfg.min_samples, feat_ND=feat64, dist_csr=dist_csr)
