"""Retrieval evaluation straight from features: distances chunk by chunk, never the full matrix.

    metrics = evaluate_features(q_feat, g_feat, q_pids, g_pids, q_camids, g_camids)
    metrics = evaluate(EvalConfig(), q_feat, g_feat, q_pids, g_pids, q_camids, g_camids)

Distances are float32 from one matmul per chunk of queries (CPU or CUDA); peak memory is the
gallery features plus a few bytes per element of one (chunk x gallery) block, so MSMT17-size
evaluation (11,659 x 82,161) fits in well under 2 GB where the dense reference needs ~19 GB.

Legend: Q queries (of one chunk), G gallery entries, D feature dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dynamix_core.config import field
from dynamix_core.evaluation.rank import RankAccumulator, evaluate_rank
from dynamix_core.evaluation.rerank import RerankConfig, k_reciprocal_rerank

Metric = Literal["cosine", "euclidean"]


@dataclass(kw_only=True)
class EvalConfig:
    """How retrieval metrics are computed (SPEC 3)."""

    metric: Metric = field("cosine", help="distance: cosine (1 - cosine similarity) or euclidean (squared)")
    max_rank: int = field(50, help="length of the reported CMC curve")
    chunk_size: int = field(64, help="queries per distance block; memory ~ chunk_size x gallery x 21 bytes")
    device: str = field("", help="device for distances and ranking ('' = where the features are)")
    rerank: RerankConfig = field(default_factory=RerankConfig, help="optional k-reciprocal re-ranking")


def prepare_gallery(g_feat_GD: torch.Tensor, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """What every query chunk needs of the gallery, computed once: (float32 features, unit
    features for cosine; squared norms ``sq_g_1G`` for euclidean)."""
    g_GD = g_feat_GD.float()
    if metric == "cosine":
        return F.normalize(g_GD, dim=1), torch.empty(0)
    if metric == "euclidean":
        return g_GD, g_GD.pow(2).sum(1).unsqueeze(0)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def distance_to_gallery(q_feat_QD: torch.Tensor, gallery: tuple[torch.Tensor, torch.Tensor], metric: Metric) -> torch.Tensor:
    """Float32 ``dist_QG`` of queries against a :func:`prepare_gallery` result.

    ``cosine``: ``1 - <q, g>`` of L2-normalised features. ``euclidean``: squared Euclidean
    distance ``|q|^2 + |g|^2 - 2 <q, g>`` of the features as given (torchreid / fast-reid).
    """
    g_GD, sq_g_1G = gallery
    q_QD = q_feat_QD.float()
    if metric == "cosine":
        return torch.mm(F.normalize(q_QD, dim=1), g_GD.T).neg_().add_(1.0)
    sq_q_Q1 = q_QD.pow(2).sum(1, keepdim=True)
    return torch.addmm(sq_q_Q1 + sq_g_1G, q_QD, g_GD.T, alpha=-2.0)


def pairwise_distance(q_feat_QD: torch.Tensor, g_feat_GD: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Float32 distances ``dist_QG`` (smaller = more similar), the values :func:`evaluate_features`
    ranks: row ``i`` depends only on ``q_feat_QD[i]`` and the gallery."""
    q_QD, g_GD = torch.as_tensor(q_feat_QD), torch.as_tensor(g_feat_GD)
    return distance_to_gallery(q_QD, prepare_gallery(g_GD, metric), metric)


def evaluate_features(
    q_feat, g_feat, q_pids, g_pids, q_camids, g_camids, metric: Metric = "cosine", max_rank: int = 50,
    chunk_size: int = 64, device: str | torch.device | None = None,
) -> dict:
    """Exact CMC / mAP / mINP from query and gallery features (see :mod:`dynamix_core.evaluation.rank`).

    ``q_feat`` (Q, D) and ``g_feat`` (G, D): numpy arrays or tensors. Distances are computed for
    ``chunk_size`` queries at a time on ``device`` (default: the features' device) and ranked
    there; neither the Q x G matrix nor any full-row sort is ever built.
    """
    q_QD, g_GD = torch.as_tensor(q_feat), torch.as_tensor(g_feat)
    if q_QD.dim() != 2 or g_GD.dim() != 2 or q_QD.shape[1] != g_GD.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(q_QD.shape)} and {tuple(g_GD.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = torch.device(device) if device else g_GD.device
    gallery = prepare_gallery(g_GD.to(device), metric)
    acc = RankAccumulator(q_pids, g_pids, q_camids, g_camids)
    if (len(q_QD), len(g_GD)) != (acc.num_query, acc.num_gallery):
        raise ValueError(
            f"{len(q_QD)} query / {len(g_GD)} gallery features but {acc.num_query} / {acc.num_gallery} labels"
        )
    for start in range(0, acc.num_query, chunk_size):
        q_chunk_QD = q_QD[start:start + chunk_size].to(device)
        acc.add_chunk(start, distance_to_gallery(q_chunk_QD, gallery, metric))
    return acc.result(max_rank)


def evaluate(cfg: EvalConfig, q_feat, g_feat, q_pids, g_pids, q_camids, g_camids) -> dict:
    """Metrics as configured: chunked and exact, or (``cfg.rerank.enabled``) on re-ranked distances."""
    device = cfg.device or None
    if not cfg.rerank.enabled:
        return evaluate_features(q_feat, g_feat, q_pids, g_pids, q_camids, g_camids, metric=cfg.metric,
                                 max_rank=cfg.max_rank, chunk_size=cfg.chunk_size, device=device)
    q_QD, g_GD = torch.as_tensor(q_feat), torch.as_tensor(g_feat)
    cfg.rerank.check_size(len(q_QD), len(g_GD))
    dist_QG = pairwise_distance(q_QD, g_GD, cfg.metric)
    dist_QQ = pairwise_distance(q_QD, q_QD, cfg.metric)
    dist_GG = pairwise_distance(g_GD, g_GD, cfg.metric)
    reranked_QG = k_reciprocal_rerank(dist_QG, dist_QQ, dist_GG, cfg.rerank)
    return evaluate_rank(reranked_QG, q_pids, g_pids, q_camids, g_camids, max_rank=cfg.max_rank,
                         chunk_size=cfg.chunk_size)
