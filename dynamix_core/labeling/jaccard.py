"""k-reciprocal Jaccard distance (Zhong et al., CVPR 2017; Cluster-Contrast's ``compute_jaccard_distance``)
computed from a sparse top-k graph: never an N x N dense matrix.

Legend: N rows, K = k1 + 1 ranked neighbours (self first), H = round(k1 / 2) + 1, L expansion slots,
C rows of one chunk.

Steps, as in the dense reference:
1. ``R(i)`` = k1-reciprocal neighbours: j among the k1+1 nearest of i and i among the k1+1 nearest of j.
2. Expansion: for each candidate c in R(i), add ``R_half(c)`` (round(k1/2)-reciprocal) when more than
   2/3 of it already lies in R(i).
3. ``V[i, j] = softmax_j(-|x_i - x_j|^2)`` over the expanded set (unit features: |x_i - x_j|^2 = 2 - 2 s).
4. Query expansion: ``V[i] <- mean(V[j] for j among the k2 nearest of i)`` (k2 = 1: none).
5. ``d(i, j) = 1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])`` (every row of V sums to 1).

Only pairs that share support in V get a stored entry; every other pair is at distance exactly 1.
Stored distances are at least ``TINY`` because scipy drops explicit zeros from sparse matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from dynamix_core.labeling.groups import GroupLayout
from dynamix_core.labeling.knn import KnnBackend, knn, knn_within_groups

TINY = 1e-12
_CHUNK_ELEMENTS = 1 << 23  # bounds the per-chunk temporaries of steps 1, 2 and 5


def jaccard_distance_sparse(
    feat_ND: torch.Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    *,
    layout: GroupLayout | None = None,
    knn_backend: KnnBackend = "auto",
) -> sp.csr_matrix:
    """Symmetric (N, N) CSR of k-reciprocal Jaccard distances (< 1 where stored, 1 elsewhere).

    With ``layout`` the neighbour search (hence every distance) stays inside each group: per-video
    Jaccard for all videos in one pass. Computed in float64 when the features are float64."""
    feat_ND = torch.as_tensor(feat_ND)
    if feat_ND.dtype not in (torch.float32, torch.float64):
        feat_ND = feat_ND.float()
    unit_ND = torch.nn.functional.normalize(feat_ND, dim=1)
    if layout is None:
        rank_NK = knn(unit_ND, k1 + 1, knn_backend)
    else:
        rank_NK = knn_within_groups(unit_ND, layout, k1 + 1)
    v_csr = _expanded_weights(unit_ND, rank_NK, k1)
    if k2 > 1:
        v_csr = _query_expansion(v_csr, rank_NK[:, :k2])
    return _jaccard_from_weights(v_csr)


def _reciprocal(rank_NK: np.ndarray, k: int) -> np.ndarray:
    """(N, k+1) k-reciprocal neighbours of each row, -1 where not reciprocal or missing."""
    fwd_NK = rank_NK[:, : k + 1]
    out_NK = np.full_like(fwd_NK, -1)
    step = max(1, _CHUNK_ELEMENTS // fwd_NK.shape[1] ** 2)
    for s in range(0, len(fwd_NK), step):
        f_CK = fwd_NK[s : s + step]
        back_CKK = rank_NK[np.maximum(f_CK, 0), : k + 1]
        rows_C = np.arange(s, s + len(f_CK))
        ok_CK = (back_CKK == rows_C[:, None, None]).any(axis=2) & (f_CK >= 0)
        out_NK[s : s + step] = np.where(ok_CK, f_CK, -1)
    return out_NK


def _row_unique(idx_CL: np.ndarray, num_rows: int) -> np.ndarray:
    """Sort each row, blank (-> num_rows) duplicates and -1, and trim all-blank trailing columns."""
    x_CL = np.sort(np.where(idx_CL < 0, num_rows, idx_CL), axis=1)
    dup_CL = np.zeros_like(x_CL, dtype=bool)
    dup_CL[:, 1:] = x_CL[:, 1:] == x_CL[:, :-1]
    x_CL = np.sort(np.where(dup_CL, num_rows, x_CL), axis=1)
    width = int((x_CL < num_rows).sum(axis=1).max())
    return x_CL[:, :width]


def _expanded_weights(unit_ND: torch.Tensor, rank_NK: np.ndarray, k1: int) -> sp.csr_matrix:
    """Steps 1-3: the sparse row-stochastic matrix V."""
    num_rows = len(rank_NK)
    r_NK = _reciprocal(rank_NK, k1)
    r_NH = _reciprocal(rank_NK, int(np.around(k1 / 2)))
    size_N = (r_NH >= 0).sum(axis=1)
    k, h = r_NK.shape[1], r_NH.shape[1]
    step = max(1, _CHUNK_ELEMENTS // (k * h * 4))
    indptr, indices, data = [0], [], []
    for s in range(0, num_rows, step):
        r_CK = r_NK[s : s + step]
        r_sorted_CK = np.sort(np.where(r_CK < 0, num_rows, r_CK), axis=1)
        cand_CKH = np.where((r_CK >= 0)[:, :, None], r_NH[np.maximum(r_CK, 0)], -1)
        flat_CX = cand_CKH.reshape(len(r_CK), k * h)
        # Membership of each candidate element in R(i): binary search in the sorted row of R(i).
        pos_CX = torch.searchsorted(torch.from_numpy(r_sorted_CK), torch.from_numpy(np.maximum(flat_CX, 0))).numpy()
        hit_CX = (np.take_along_axis(r_sorted_CK, np.minimum(pos_CX, k - 1), axis=1) == flat_CX) & (flat_CX >= 0)
        overlap_CK = hit_CX.reshape(len(r_CK), k, h).sum(axis=2)
        accept_CK = (r_CK >= 0) & (overlap_CK > 2.0 / 3.0 * size_N[np.maximum(r_CK, 0)])
        cand_CKH = np.where(accept_CK[:, :, None], cand_CKH, -1)
        expanded_CL = _row_unique(np.concatenate([r_CK, cand_CKH.reshape(len(r_CK), k * h)], axis=1), num_rows)
        valid_CL = expanded_CL < num_rows
        e_CL = torch.from_numpy(np.minimum(expanded_CL, num_rows - 1)).to(unit_ND.device)
        rows_C = torch.arange(s, s + len(r_CK), device=unit_ND.device)
        sim_CL = torch.einsum("cd,cld->cl", unit_ND[rows_C], unit_ND[e_CL])
        logit_CL = (-(2.0 - 2.0 * sim_CL)).masked_fill(~torch.from_numpy(valid_CL).to(unit_ND.device), float("-inf"))
        w_CL = torch.softmax(logit_CL.double(), dim=1).cpu().numpy()
        indices.append(expanded_CL[valid_CL])
        data.append(w_CL[valid_CL])
        indptr.extend((indptr[-1] + np.cumsum(valid_CL.sum(axis=1))).tolist())
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=(num_rows, num_rows)
    )


def _query_expansion(v_csr: sp.csr_matrix, rank_NQ: np.ndarray) -> sp.csr_matrix:
    """Step 4: average the rows of V over each row's k2 nearest neighbours (fewer where a group is small)."""
    num_rows = v_csr.shape[0]
    valid_NQ = rank_NQ >= 0
    rows = np.repeat(np.arange(num_rows), valid_NQ.sum(axis=1))
    weight = 1.0 / valid_NQ.sum(axis=1)
    avg = sp.csr_matrix((weight[rows], (rows, rank_NQ[valid_NQ])), shape=(num_rows, num_rows))
    return (avg @ v_csr).tocsr()


def _jaccard_from_weights(v_csr: sp.csr_matrix) -> sp.csr_matrix:
    """Step 5 over all pairs sharing a support column, row chunk by row chunk."""
    num_rows = v_csr.shape[0]
    v_csr.sort_indices()
    v_csc = v_csr.tocsc()
    col_nnz = np.diff(v_csc.indptr)
    pieces = []
    # Every row of V holds at least its own column, so no row is empty (reduceat needs that).
    cum_cost = np.cumsum(np.add.reduceat(col_nnz[v_csr.indices], v_csr.indptr[:-1]))
    s = 0
    while s < num_rows:
        done = cum_cost[s - 1] if s else 0
        e = max(s + 1, int(np.searchsorted(cum_cost, done + _CHUNK_ELEMENTS, side="right")))
        lo, hi = v_csr.indptr[s], v_csr.indptr[e]
        cols, vals = v_csr.indices[lo:hi], v_csr.data[lo:hi]
        rows = np.repeat(np.arange(e - s), np.diff(v_csr.indptr[s : e + 1]))
        cnt = col_nnz[cols]
        first = np.repeat(v_csc.indptr[cols] - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        partner, partner_val = v_csc.indices[first], v_csc.data[first]
        mins = np.minimum(np.repeat(vals, cnt), partner_val)
        m_chunk = sp.coo_matrix((mins, (np.repeat(rows, cnt), partner)), shape=(e - s, num_rows)).tocsr()
        m_chunk.sum_duplicates()
        m_chunk.data = np.maximum(1.0 - m_chunk.data / (2.0 - m_chunk.data), TINY)
        pieces.append(m_chunk)
        s = e
    return sp.vstack(pieces, format="csr")
