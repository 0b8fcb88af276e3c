"""Exact cosine top-k neighbours: faiss (CPU, or GPU where faiss-gpu is installed) or chunked torch matmul.

Legend: N rows, D feature dim, K neighbours, C rows of one chunk, B groups in a block, M padded size.

Every row's own index comes first (rank 0), as in the dense reference where d(x, x) = 0; then the
others by decreasing cosine similarity. Nothing of size N x N is ever materialised.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch

from dynamix_core.labeling.groups import GroupLayout

KnnBackend = Literal["auto", "faiss", "torch"]


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def knn(
    feat_ND: torch.Tensor | np.ndarray, k: int, backend: KnnBackend = "auto", *, chunk_rows: int = 4096
) -> np.ndarray:
    """Indices (N, min(k, N)) int64 of each row's k most cosine-similar rows, self first.

    ``auto``: torch when the features are on a GPU (a matmul there is as fast as faiss' flat index),
    else faiss when importable, else torch. The torch path computes in the input's dtype (float64 in,
    float64 ranking out); faiss always ranks in float32."""
    feat_ND = torch.as_tensor(feat_ND)
    if feat_ND.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(feat_ND.shape)}")
    k = min(k, feat_ND.shape[0])
    if backend == "auto":
        backend = "torch" if feat_ND.is_cuda or not faiss_available() else "faiss"
    if backend == "faiss":
        idx_NK = _knn_faiss(feat_ND, k)
    elif backend == "torch":
        idx_NK = _knn_torch(feat_ND, k, chunk_rows)
    else:
        raise ValueError(f"knn backend {backend!r}: expected 'auto', 'faiss' or 'torch'")
    return _self_first(idx_NK)


def _knn_torch(feat_ND: torch.Tensor, k: int, chunk_rows: int) -> np.ndarray:
    if feat_ND.dtype in (torch.float16, torch.bfloat16):
        feat_ND = feat_ND.float()
    unit_ND = torch.nn.functional.normalize(feat_ND, dim=1)
    out = []
    for start in range(0, unit_ND.shape[0], chunk_rows):
        sim_CN = unit_ND[start : start + chunk_rows] @ unit_ND.T
        rows_C = torch.arange(start, start + sim_CN.shape[0], device=sim_CN.device)
        sim_CN[torch.arange(sim_CN.shape[0], device=sim_CN.device), rows_C] = float("inf")  # self first
        out.append(sim_CN.topk(k, dim=1).indices.cpu())
    return torch.cat(out).numpy().astype(np.int64)


def _knn_faiss(feat_ND: torch.Tensor, k: int) -> np.ndarray:
    import faiss

    unit_ND = np.ascontiguousarray(torch.nn.functional.normalize(feat_ND.float(), dim=1).cpu().numpy())
    index = faiss.IndexFlatIP(unit_ND.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(unit_ND)
    _, idx_NK = index.search(unit_ND, k)
    return idx_NK.astype(np.int64)


def _self_first(idx_NK: np.ndarray) -> np.ndarray:
    """Move each row's own index to column 0 (exact duplicates can tie with it, and may even push it
    out of the top k: then it replaces the last column)."""
    rows_N = np.arange(idx_NK.shape[0])
    wrong = np.nonzero(idx_NK[:, 0] != rows_N)[0]
    for r in wrong:
        others = idx_NK[r][idx_NK[r] != r][: idx_NK.shape[1] - 1]
        idx_NK[r] = np.concatenate([[r], others])
    return idx_NK


def knn_within_groups(feat_ND: torch.Tensor, layout: GroupLayout, k: int) -> np.ndarray:
    """Top-k inside each group only: (N, K) global indices, self first, -1 where a group has < K rows.

    Computed block by block with batched matmuls in the features' dtype."""
    num_rows = feat_ND.shape[0]
    unit_ND = torch.nn.functional.normalize(feat_ND, dim=1)
    idx_NK = np.full((num_rows, k), -1, dtype=np.int64)
    for block in layout.blocks:
        rows_BM = torch.from_numpy(block.rows_BM).to(feat_ND.device)
        valid_BM = rows_BM >= 0
        x_BMD = unit_ND[rows_BM.clamp(min=0)]
        sim_BMM = torch.bmm(x_BMD, x_BMD.transpose(1, 2))
        sim_BMM = sim_BMM.masked_fill(~valid_BM.unsqueeze(1), float("-inf"))
        sim_BMM.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # self first
        kk = min(k, rows_BM.shape[1])
        top_BMK = sim_BMM.topk(kk, dim=2).indices
        glob_BMK = rows_BM.gather(1, top_BMK.flatten(1)).view_as(top_BMK)
        # A group with fewer than kk members: the tail of its ranking points at padding (row -1).
        rows_np = block.rows_BM[block.valid_BM]
        idx_NK[rows_np, :kk] = glob_BMK[valid_BM].cpu().numpy()
    return idx_NK
