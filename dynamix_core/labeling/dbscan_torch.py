"""Batched DBSCAN of many small groups (videos) on torch tensors: exact scikit-learn semantics.

Legend: N rows, D feature dim, B groups in a block, M padded group size.

Per block: a neighbour mask ``adj_BMM`` (distance <= eps, self included, padding excluded), core
points = neighbour count >= min_samples, connected components of the core-core graph by min-label
propagation with pointer jumping (labels converge to the smallest core index of each component),
then every non-core point with a core neighbour joins the component of smallest such index.

Why this equals ``sklearn.cluster.DBSCAN`` run on each group alone, labels included: sklearn visits
points in index order and grows a cluster (breadth-first) from each unvisited core point, so cluster
k is the component whose smallest core index is the k-th smallest, and a border point reachable from
several clusters is taken by the one grown first, i.e. the one with the smallest core index. Both
rules are reproduced here, so the output is identical, not just equal up to a permutation.

Cosine distances are computed as sklearn does on float64 input (``1 - x.y / (|x| |y|)``): a float32
batched matmul first, then every pair whose float32 distance lies within a rounding bound of eps is
recomputed in float64, so the ``<= eps`` decision is the float64 one.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from dynamix_core.labeling.groups import Block, GroupLayout, offset_group_labels

_F32_EPS = float(torch.finfo(torch.float32).eps)
_TF32_ROUNDING = 2.0**-10  # TF32 keeps 10 mantissa bits: |error of a unit-vector dot| <= ~2^-10


def dbscan_groups_torch(
    layout: GroupLayout,
    eps: float,
    min_samples: int,
    *,
    feat_ND: torch.Tensor | None = None,
    dist_csr: sp.csr_matrix | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """DBSCAN inside each group of ``layout``; one int64 label per row, unique across groups, -1 = noise.

    Give either ``feat_ND`` (cosine distance) or ``dist_csr`` (precomputed sparse distances: a stored
    entry is a distance, a missing one is "farther than eps"; only within-group entries are read)."""
    if (feat_ND is None) == (dist_csr is None):
        raise ValueError("give exactly one of feat_ND (cosine) or dist_csr (precomputed)")
    device = torch.device(device)
    num_rows = len(layout.group_of_row)
    local_N = np.full(num_rows, -1, dtype=np.int64)
    num_clusters_G = np.zeros(len(layout.group_ids), dtype=np.int64)
    if feat_ND is not None:
        feat_ND = feat_ND.detach().to(device)
        feat32_ND = feat_ND.to(torch.float32)
    else:
        slot_b, slot_m = _slots_of_rows(layout, num_rows)
    for block in layout.blocks:
        rows_BM = torch.from_numpy(block.rows_BM).to(device)
        valid_BM = rows_BM >= 0
        if feat_ND is not None:
            adj_BMM = cosine_neighbours(feat32_ND, feat_ND, rows_BM, eps)
        else:
            adj_BMM = precomputed_neighbours(dist_csr, layout, block, slot_b, slot_m, eps).to(device)
        labels_BM, count_B = dbscan_block(adj_BMM, valid_BM, min_samples)
        rows = block.rows_BM[block.valid_BM]
        local_N[rows] = labels_BM[valid_BM].cpu().numpy()
        num_clusters_G[block.groups] = count_B.cpu().numpy()
    return offset_group_labels(layout, local_N, num_clusters_G)


def cosine_neighbours(
    feat32_ND: torch.Tensor, feat_ND: torch.Tensor, rows_BM: torch.Tensor, eps: float
) -> torch.Tensor:
    """``adj_BMM[b, i, j]`` = members i and j of group b are at cosine distance <= eps (float64 decision).

    ``feat32_ND`` = the features in float32, ``feat_ND`` as given (for the float64 re-check).
    Padding columns are never neighbours; padding rows are left as they fall (callers mask them)."""
    valid_BM = rows_BM >= 0
    x_BMD = feat32_ND.index_select(0, rows_BM.clamp(min=0).flatten()).view(*rows_BM.shape, -1)
    x_BMD.view(-1, x_BMD.shape[-1]).index_fill_(0, torch.nonzero(~valid_BM.flatten()).squeeze(1), 0.0)  # padding
    x_BMD.mul_(1.0 / x_BMD.norm(dim=2, keepdim=True).clamp(min=1e-12))  # unit rows (zeros stay zero)
    sim_BMM = torch.bmm(x_BMD, x_BMD.transpose(1, 2))
    # Forward error of a float32 dot of unit vectors is <= D * 2^-24 (plus the float32 rounding of the
    # inputs); TF32 matmuls, where enabled on the GPU, round the inputs to 10 bits.
    tol = 2.0 * x_BMD.shape[-1] * _F32_EPS + 4.0 * _F32_EPS
    if x_BMD.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        tol += _TF32_ROUNDING
    threshold = 1.0 - eps  # distance <= eps  <=>  similarity >= 1 - eps
    adj_BMM = sim_BMM >= threshold + tol  # surely neighbours
    unsure_BMM = (sim_BMM >= threshold - tol) ^ adj_BMM  # too close to the threshold for float32
    del sim_BMM
    b, i, j = torch.nonzero(unsure_BMM, as_tuple=True)
    if len(b):
        u_PD = torch.nn.functional.normalize(feat_ND[rows_BM[b, i]].double(), dim=1)
        v_PD = torch.nn.functional.normalize(feat_ND[rows_BM[b, j]].double(), dim=1)
        adj_BMM[b, i, j] = (1.0 - (u_PD * v_PD).sum(dim=1)) <= eps
    adj_BMM.diagonal(dim1=1, dim2=2).fill_(True)  # sklearn sets d(x, x) = 0 exactly
    if threshold - tol <= 0.0:  # padding rows are zero vectors (similarity 0): neighbours only when eps >= 1
        adj_BMM &= valid_BM.unsqueeze(1)
    return adj_BMM


def _slots_of_rows(layout: GroupLayout, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, m) position of every row inside its block."""
    slot_b = np.empty(num_rows, dtype=np.int64)
    slot_m = np.empty(num_rows, dtype=np.int64)
    for block in layout.blocks:
        b, m = np.nonzero(block.valid_BM)
        slot_b[block.rows_BM[b, m]] = b
        slot_m[block.rows_BM[b, m]] = m
    return slot_b, slot_m


def precomputed_neighbours(
    dist_csr: sp.csr_matrix, layout: GroupLayout, block: Block, slot_b: np.ndarray, slot_m: np.ndarray, eps: float
) -> torch.Tensor:
    """Neighbour mask of one block from stored sparse distances (within-group entries only)."""
    rows = block.rows_BM[block.valid_BM]
    sub = dist_csr[rows].tocoo()
    i_rows, j_rows = rows[sub.row], sub.col
    keep = (sub.data <= eps) & (layout.group_of_row[j_rows] == layout.group_of_row[i_rows])
    i_rows, j_rows = i_rows[keep], j_rows[keep]
    num_b, m = block.rows_BM.shape
    adj_BMM = np.zeros((num_b, m, m), dtype=bool)
    adj_BMM[slot_b[i_rows], slot_m[i_rows], slot_m[j_rows]] = True
    b, mm = np.nonzero(block.valid_BM)
    adj_BMM[b, mm, mm] = True  # a point is its own neighbour (sklearn sets the sparse diagonal)
    return torch.from_numpy(adj_BMM)


def dbscan_block(adj_BMM: torch.Tensor, valid_BM: torch.Tensor, min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DBSCAN of each group in a block from its neighbour mask (self included, padding columns excluded).

    Returns ``labels_BM`` (0..C_b-1 numbered like sklearn, -1 = noise or padding) and ``count_B`` = C_b."""
    m = valid_BM.shape[1]
    big = m  # "no label": larger than any member index, neutral for min
    # Narrow labels: the masked min over B x M x M below is the hot loop and is memory-bound.
    index_M = torch.arange(m, device=adj_BMM.device, dtype=torch.int16 if m < 2**15 else torch.int32)
    core_BM = valid_BM & (adj_BMM.sum(dim=2, dtype=torch.int32) >= min_samples)
    labels_BM = torch.where(core_BM, index_M, big)
    # min over the neighbours' labels; non-core neighbours carry `big`, so for a core row this is the
    # min over its core neighbours (and itself) and for a non-core row the border rule's candidate.
    nb_BM = _min_neighbour_label(adj_BMM, labels_BM, big)
    while True:
        new_BM = torch.minimum(labels_BM, nb_BM)
        # Pointer jumping: a label is always a core index of the same component and never above it.
        new_BM = torch.where(core_BM, new_BM.gather(1, new_BM.clamp(max=m - 1).long()), big)
        if torch.equal(new_BM, labels_BM):
            break
        labels_BM = new_BM
        nb_BM = _min_neighbour_label(adj_BMM, labels_BM, big)
    root_BM = torch.where(core_BM, labels_BM, nb_BM)  # smallest core index of the cluster, or big
    root_BM = torch.where(valid_BM, root_BM, big)
    is_first_BM = core_BM & (labels_BM == index_M)
    rank_BM = is_first_BM.cumsum(dim=1) - 1  # clusters numbered by their smallest core index
    labels_out_BM = torch.where(root_BM < big, rank_BM.gather(1, root_BM.clamp(max=m - 1).long()), -1)
    return labels_out_BM, is_first_BM.sum(dim=1)


def _min_neighbour_label(adj_BMM: torch.Tensor, labels_BM: torch.Tensor, big: int) -> torch.Tensor:
    return torch.where(adj_BMM, labels_BM.unsqueeze(1), big).amin(dim=2)
