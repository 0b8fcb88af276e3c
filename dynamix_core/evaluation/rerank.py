"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), for reporting only (SPEC 3).

Same algorithm and conventions as the authors' reference ``re_ranking(q_g, q_q, g_g, k1, k2,
lambda)``: squared distances normalised by their maximum, k-reciprocal sets R(i, k1) expanded by
the sets R(c, k1/2) of their members that overlap by more than 2/3 (Eq. 12), Gaussian-weighted
set vectors V (Eq. 14), local query expansion over the k2 nearest neighbours (Eq. 15), Jaccard
distance (Eq. 11 via min/max sums) mixed with the original distance by lambda (Eq. 16).
Neighbour lists are taken with a *stable* sort, so ties resolve by index.

Memory: the (Q+G) x (Q+G) distance matrix is dense, 4 (Q+G)^2 bytes (1.5 GB at Market-1501's
19,281 images); V is kept sparse. Past ``max_images`` a clear error is raised instead.

Legend: N = Q + G images (queries first), K = k1 + 1, H = round(k1 / 2) + 1, E sparse entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamix_core.config import ConfigError, field


@dataclass(kw_only=True)
class RerankConfig:
    """k-reciprocal re-ranking parameters (Zhong et al. 2017 defaults)."""

    enabled: bool = field(False, help="re-rank distances before computing metrics (reporting only)")
    k1: int = field(20, help="k of the k-reciprocal neighbour sets")
    k2: int = field(6, help="neighbours averaged by local query expansion (1 = none)")
    lambda_value: float = field(0.3, help="weight of the original distance in the final distance")
    max_images: int = field(20_000, help="largest query + gallery count; the dense distance matrix takes 4 N^2 bytes")
    row_chunk: int = field(1024, help="rows per block when sorting neighbour lists and joining set vectors")

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"rerank.k1 and rerank.k2 must be >= 1, got k1={self.k1} k2={self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ConfigError(f"rerank.lambda_value must be in [0, 1], got {self.lambda_value}")

    def check_size(self, num_query: int, num_gallery: int) -> None:
        """Raise if re-ranking this many images would exceed the configured dense-matrix budget."""
        n = num_query + num_gallery
        if n > self.max_images:
            raise ValueError(
                f"re-ranking {num_query} queries + {num_gallery} gallery = {n} images needs a dense "
                f"{n} x {n} matrix ({4 * n * n / 2**30:.1f} GiB), over rerank.max_images={self.max_images}; "
                f"raise rerank.max_images if the memory is there, or evaluate without re-ranking"
            )


def _neighbours(dist_NN: torch.Tensor, k: int, row_chunk: int) -> torch.Tensor:
    """First ``k`` columns of the stable argsort of every row: ``rank_NK``."""
    return torch.cat([
        torch.sort(dist_NN[r:r + row_chunk], dim=1, stable=True).indices[:, :k]
        for r in range(0, len(dist_NN), row_chunk)
    ])


def _reciprocal(forward_NK: torch.Tensor) -> torch.Tensor:
    """``mask_NK[i, a]``: ``forward[i, a]`` has ``i`` among its own first K neighbours."""
    idx_N11 = torch.arange(len(forward_NK)).view(-1, 1, 1)
    return (forward_NK[forward_NK] == idx_N11).any(2)


def _set_vectors(dist_NN: torch.Tensor, rank_NK: torch.Tensor, cfg: RerankConfig) -> tuple[torch.Tensor, ...]:
    """Sparse V (Eq. 14) as sorted COO ``(row_E, col_E, val_E)``."""
    n = len(dist_NN)
    forward_NK = rank_NK[:, :cfg.k1 + 1]
    recip_NK = _reciprocal(forward_NK)
    half = int(round(cfg.k1 / 2))  # banker's rounding, like np.around in the reference
    forward_NH = rank_NK[:, :half + 1]
    recip_NH = _reciprocal(forward_NH)
    rows, cols = [], []
    for r in range(0, n, cfg.row_chunk):
        f_BK, m_BK = forward_NK[r:r + cfg.row_chunk], recip_NK[r:r + cfg.row_chunk]
        cand_BKH, cand_mask_BKH = forward_NH[f_BK], recip_NH[f_BK]  # R(c, k1/2) of each neighbour c
        in_r_BKH = ((cand_BKH.unsqueeze(-1) == f_BK.view(len(f_BK), 1, 1, -1)) & m_BK.view(len(f_BK), 1, 1, -1)).any(-1)
        overlap_BK = (in_r_BKH & cand_mask_BKH).sum(-1)
        accept_BK = m_BK & (overlap_BK > 2.0 / 3.0 * cand_mask_BKH.sum(-1))
        row_BK = torch.arange(r, r + len(f_BK)).unsqueeze(1).expand_as(f_BK)
        rows += [row_BK[m_BK], row_BK.unsqueeze(-1).expand_as(cand_BKH)[accept_BK.unsqueeze(-1) & cand_mask_BKH]]
        cols += [f_BK[m_BK], cand_BKH[accept_BK.unsqueeze(-1) & cand_mask_BKH]]
    flat_E = torch.unique(torch.cat(rows) * n + torch.cat(cols))  # sorted, deduplicated expansion sets
    row_E, col_E = flat_E // n, flat_E % n
    weight_E = torch.exp(-dist_NN[row_E, col_E])
    row_sum_N = torch.zeros(n, dtype=weight_E.dtype).index_add_(0, row_E, weight_E)
    return row_E, col_E, weight_E / row_sum_N[row_E]


def _ranges(start_R: torch.Tensor, count_R: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(start, start + count)`` of every range (an index into CSR storage)."""
    offset_R = torch.cumsum(count_R, 0) - count_R
    total = int(count_R.sum())
    return torch.repeat_interleave(start_R - offset_R, count_R) + torch.arange(total)


def _gather_rows(row_E, col_E, val_E, n: int, sel_ND: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Sparse ``out[i] = scale * sum_t V[sel_ND[i, t]]`` as sorted COO (local query expansion, Eq. 15)."""
    count_N = torch.bincount(row_E, minlength=n)
    start_N = torch.cumsum(count_N, 0) - count_N
    src_rows = sel_ND.reshape(-1)
    out_rows = torch.arange(n).repeat_interleave(sel_ND.shape[1])
    counts = count_N[src_rows]
    entry = _ranges(start_N[src_rows], counts)
    flat = torch.repeat_interleave(out_rows, counts) * n + col_E[entry]
    flat_E, inverse = torch.unique(flat, return_inverse=True)
    summed = torch.zeros(len(flat_E), dtype=val_E.dtype).index_add_(0, inverse, val_E[entry])
    return flat_E // n, flat_E % n, summed * scale


def k_reciprocal_rerank(dist_QG, dist_QQ, dist_GG, cfg: RerankConfig | None = None) -> torch.Tensor:
    """Re-ranked float32 query x gallery distances from the three distance blocks."""
    cfg = cfg or RerankConfig()
    dist_QG, dist_QQ, dist_GG = (torch.as_tensor(d).float() for d in (dist_QG, dist_QQ, dist_GG))
    num_q, num_g = dist_QG.shape
    cfg.check_size(num_q, num_g)
    n = num_q + num_g
    full_NN = torch.empty(n, n)
    full_NN[:num_q, :num_q], full_NN[:num_q, num_q:] = dist_QQ, dist_QG
    full_NN[num_q:, :num_q], full_NN[num_q:, num_q:] = dist_QG.T, dist_GG
    # As the reference: square, divide each column by its maximum, transpose.
    dist_NN = full_NN.pow_(2).div_(full_NN.amax(0, keepdim=True)).T
    rank_NK = _neighbours(dist_NN, max(cfg.k1 + 1, cfg.k2), cfg.row_chunk)

    row_E, col_E, val_E = _set_vectors(dist_NN, rank_NK, cfg)
    if cfg.k2 > 1:
        row_E, col_E, val_E = _gather_rows(row_E, col_E, val_E, n, rank_NK[:, :cfg.k2], 1.0 / cfg.k2)

    # Jaccard (Eq. 11): sum_k min(V[i, k], V[j, k]) over the shared support of query i and gallery j,
    # joined through the gallery rows' column lists (the reference's inverted index).
    gal = row_E >= num_q
    g_col, order = torch.sort(col_E[gal], stable=True)
    g_row, g_val = row_E[gal][order] - num_q, val_E[gal][order]
    col_count_N = torch.bincount(g_col, minlength=n)
    col_start_N = torch.cumsum(col_count_N, 0) - col_count_N
    overlap_QG = torch.zeros(num_q, num_g)
    query_entries = torch.nonzero(row_E < num_q).squeeze(1)
    for r in range(0, len(query_entries), cfg.row_chunk * 64):
        q_e = query_entries[r:r + cfg.row_chunk * 64]
        counts = col_count_N[col_E[q_e]]
        pair = _ranges(col_start_N[col_E[q_e]], counts)
        q_rows = torch.repeat_interleave(row_E[q_e], counts)
        mins = torch.minimum(torch.repeat_interleave(val_E[q_e], counts), g_val[pair])
        overlap_QG.index_put_((q_rows, g_row[pair]), mins, accumulate=True)
    jaccard_QG = 1.0 - overlap_QG / (2.0 - overlap_QG)
    return jaccard_QG * (1.0 - cfg.lambda_value) + dist_NN[:num_q, num_q:] * cfg.lambda_value
