"""Exact re-ID retrieval metrics (CMC, mAP, mINP) from query x gallery distances, chunk by chunk.

Semantics are the field's reference (torchreid / fast-reid ``eval_market1501``, SPEC 3):
for each query, gallery entries with the same pid *and* the same camera are removed; a query with
no remaining positive is skipped (and counted); CMC is first-match; AP is non-interpolated
(``sum_k precision@k * rel_k / num_rel``); mINP averages ``num_rel / rank of the last positive``;
ties in distance are broken by gallery index (a stable sort).

Nothing here sorts a gallery row. The metrics only need the rank of each positive among the
kept gallery entries, ``rank(p) = 1 + #{kept j : (d_j, j) < (d_p, p)}``, and that count is taken
with a histogram: each row's distances are mapped to buckets by a monotone map, so entries in
lower buckets are certainly smaller; only the few entries sharing a bucket with a positive are
sorted exactly. Cost is a handful of O(G) passes per query instead of an O(G log G) sort, and
peak memory is a few bytes per element of one chunk.

Legend: Q queries (of one chunk), G gallery entries, B buckets, S same-pid (query, gallery) pairs,
C candidates (entries sharing a bucket with a positive), P positives.
"""

from __future__ import annotations

import numpy as np
import torch

# Buckets per gallery entry: only speed depends on it (smaller buckets -> fewer candidates to
# sort exactly, larger histogram). Results are exact for any value.
_ENTRIES_PER_BUCKET = 4


def as_index_tensor(values, name: str) -> torch.Tensor:
    """Labels (pids or camids) as a 1-D int64 CPU tensor; ``name`` is used in the error."""
    tensor = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {tensor.dtype} shape {tuple(tensor.shape)}")
    return tensor.to(device="cpu", dtype=torch.int64)


class RankAccumulator:
    """Collects per-query ranks of the positives, chunk of queries by chunk, then summarises them.

    Feed ``add_chunk(q_start, dist_QG)`` for consecutive query ranges covering all queries (any
    order, any chunk size, CPU or CUDA tensors), then call ``result(max_rank)``.
    """

    def __init__(self, q_pids, g_pids, q_camids, g_camids):
        self.q_pids = as_index_tensor(q_pids, "q_pids")
        self.g_pids = as_index_tensor(g_pids, "g_pids")
        self.q_camids = as_index_tensor(q_camids, "q_camids")
        self.g_camids = as_index_tensor(g_camids, "g_camids")
        if len(self.q_pids) != len(self.q_camids) or len(self.g_pids) != len(self.g_camids):
            raise ValueError(
                f"label lengths differ: {len(self.q_pids)} q_pids vs {len(self.q_camids)} q_camids, "
                f"{len(self.g_pids)} g_pids vs {len(self.g_camids)} g_camids"
            )
        self.num_query, self.num_gallery = len(self.q_pids), len(self.g_pids)
        self.num_buckets = max(1, -(-self.num_gallery // _ENTRIES_PER_BUCKET))
        self._pair_q_S, self._pair_g_S, self._pair_junk_S = self._same_pid_pairs()
        self._labels_on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._buffers: tuple[torch.Tensor, ...] = ()
        self._filled = torch.zeros(self.num_query, dtype=torch.bool)
        self.ap = torch.zeros(self.num_query, dtype=torch.float64)
        self.inp = torch.zeros(self.num_query, dtype=torch.float64)
        self.first_rank = torch.zeros(self.num_query, dtype=torch.int64)
        self.num_pos = torch.zeros(self.num_query, dtype=torch.int64)

    def _same_pid_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All (query, gallery) pairs with the same pid, sorted by query then gallery index;
        ``junk`` marks the same-camera ones (removed from that query's gallery)."""
        g_order = torch.sort(self.g_pids, stable=True).indices
        g_pids_sorted = self.g_pids[g_order]
        start_Q = torch.searchsorted(g_pids_sorted, self.q_pids, right=False)
        count_Q = torch.searchsorted(g_pids_sorted, self.q_pids, right=True) - start_Q
        pair_q_S = torch.repeat_interleave(torch.arange(self.num_query), count_Q)
        offset_Q = torch.cumsum(count_Q, 0) - count_Q
        within_S = torch.arange(len(pair_q_S)) - offset_Q[pair_q_S]
        pair_g_S = g_order[start_Q[pair_q_S] + within_S]  # ascending within a query: stable sort
        pair_junk_S = self.g_camids[pair_g_S] == self.q_camids[pair_q_S]
        return pair_q_S, pair_g_S, pair_junk_S

    def _labels(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(q_pids, q_camids, g_pids, g_camids) on ``device``, copied once per device."""
        if device not in self._labels_on:
            self._labels_on[device] = tuple(
                t.to(device) for t in (self.q_pids, self.q_camids, self.g_pids, self.g_camids)
            )
        return self._labels_on[device]

    def _workspace(self, num_q: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(shifted_QG, bucket_QG, hist_QB, cand_QG) for ``num_q`` rows, reused across chunks:
        fresh multi-megabyte tensors per chunk cost page faults comparable to the work itself."""
        buffers = self._buffers
        if not buffers or len(buffers[0]) < num_q or buffers[0].dtype != dtype or buffers[0].device != device:
            shape = (num_q, self.num_gallery)
            buffers = self._buffers = (
                torch.empty(shape, dtype=dtype, device=device),
                torch.empty(shape, dtype=torch.int64, device=device),
                torch.empty(num_q, self.num_buckets + 1, dtype=torch.int64, device=device),
                torch.empty(shape, dtype=torch.bool, device=device),
            )
        return tuple(b[:num_q] for b in buffers)

    def add_chunk(self, q_start: int, dist_QG: torch.Tensor) -> None:
        """Rank the positives of queries ``q_start : q_start + len(dist_QG)`` (exact, see module doc)."""
        num_q, num_g = dist_QG.shape
        if num_g != self.num_gallery or q_start < 0 or q_start + num_q > self.num_query:
            raise ValueError(
                f"distance chunk of shape {tuple(dist_QG.shape)} at query {q_start} does not fit "
                f"{self.num_query} queries x {self.num_gallery} gallery entries"
            )
        if num_q == 0:
            return
        device = dist_QG.device
        num_b = self.num_buckets

        # Monotone bucket map per row: d1 <= d2 implies bucket(d1) <= bucket(d2) because rounded
        # subtraction and multiplication by a positive constant are monotone, and so is truncation.
        lo_Q1 = dist_QG.amin(1, keepdim=True)
        hi_Q1 = dist_QG.amax(1, keepdim=True)
        if not (torch.isfinite(lo_Q1).all() and torch.isfinite(hi_Q1).all()):
            bad = int(torch.nonzero(~(torch.isfinite(lo_Q1) & torch.isfinite(hi_Q1)))[0, 0]) + q_start
            raise ValueError(f"distances of query {bad} contain NaN or inf; distances must be finite")
        scale_Q1 = (num_b - 1) / (hi_Q1 - lo_Q1)
        # A constant row (or a span so small that the scale overflows) goes to bucket 0 entirely:
        # still exact, the candidates then cover the whole row.
        scale_Q1 = torch.where(torch.isfinite(scale_Q1), scale_Q1, torch.zeros_like(scale_Q1))
        shifted_QG, bucket_QG, hist_QB, cand_QG = self._workspace(num_q, dist_QG.dtype, device)
        torch.sub(dist_QG, lo_Q1, out=shifted_QG).mul_(scale_Q1)
        bucket_QG.copy_(shifted_QG)  # float -> int64 truncates toward zero (values are >= 0)

        lo, hi = torch.searchsorted(self._pair_q_S, torch.tensor([q_start, q_start + num_q]))
        pair_row_S = (self._pair_q_S[lo:hi] - q_start).to(device)
        pair_g_S = self._pair_g_S[lo:hi].to(device)
        junk_S = self._pair_junk_S[lo:hi].to(device)
        pos_row_P, pos_g_P = pair_row_S[~junk_S], pair_g_S[~junk_S]
        # Removed entries go to an extra bucket past every positive, so they are never counted.
        bucket_QG.view(-1)[pair_row_S[junk_S] * num_g + pair_g_S[junk_S]] = num_b

        hist_QB.zero_().scatter_add_(1, bucket_QG, torch.ones(1, 1, dtype=torch.int64, device=device).expand_as(bucket_QG))
        upto_QB = hist_QB.cumsum_(1)  # kept entries in buckets <= b

        # Entries sharing a bucket with a positive of their row are ordered exactly by (d, j).
        flag_QB = torch.zeros(num_q, num_b + 1, dtype=torch.bool, device=device)
        flag_QB[pos_row_P, bucket_QG[pos_row_P, pos_g_P]] = True
        torch.gather(flag_QB, 1, bucket_QG, out=cand_QG)
        cand_row_C, cand_g_C = torch.nonzero(cand_QG, as_tuple=True)  # (row, j) ascending
        cand_d_C = dist_QG[cand_row_C, cand_g_C]
        order_C = torch.sort(cand_d_C, stable=True).indices
        order_C = order_C[torch.sort(cand_row_C[order_C], stable=True).indices]  # by (row, d, j)
        row_C, g_C = cand_row_C[order_C], cand_g_C[order_C]
        bucket_C = bucket_QG[row_C, g_C]
        idx_C = torch.arange(len(row_C), device=device)
        run_head_C = torch.ones_like(row_C, dtype=torch.bool)
        run_head_C[1:] = (row_C[1:] != row_C[:-1]) | (bucket_C[1:] != bucket_C[:-1])
        run_start_C = torch.cummax(torch.where(run_head_C, idx_C, torch.zeros_like(idx_C)), 0).values
        run_id_C = torch.cumsum(run_head_C, 0) - 1
        run_len_C = torch.bincount(run_id_C)[run_id_C]  # a run holds its whole bucket
        rank_C = upto_QB[row_C, bucket_C] - run_len_C + (idx_C - run_start_C) + 1

        q_pids, q_camids, g_pids, g_camids = self._labels(device)
        q_row_C = row_C + q_start
        is_pos_C = (g_pids[g_C] == q_pids[q_row_C]) & (g_camids[g_C] != q_camids[q_row_C])
        self._store(q_start, num_q, row_C[is_pos_C], rank_C[is_pos_C])

    def _store(self, q_start: int, num_q: int, row_P: torch.Tensor, rank_P: torch.Tensor) -> None:
        """Per-query AP, INP and first-match rank from positive ranks sorted by (row, rank)."""
        device = row_P.device
        num_pos_Q = torch.bincount(row_P, minlength=num_q)
        first_Q = torch.cumsum(num_pos_Q, 0) - num_pos_Q
        ordinal_P = torch.arange(len(row_P), device=device) - first_Q[row_P]
        precision_P = (ordinal_P + 1).double() / rank_P.double()
        ap_Q = torch.zeros(num_q, dtype=torch.float64, device=device).index_add_(0, row_P, precision_P)
        has_pos_Q = num_pos_Q > 0
        ap_Q = torch.where(has_pos_Q, ap_Q / num_pos_Q.clamp(min=1), torch.zeros_like(ap_Q))
        first_rank_Q = torch.zeros(num_q, dtype=torch.int64, device=device)
        last_rank_Q = torch.ones(num_q, dtype=torch.int64, device=device)
        first_rank_Q[has_pos_Q] = rank_P[first_Q[has_pos_Q]]
        last_rank_Q[has_pos_Q] = rank_P[first_Q[has_pos_Q] + num_pos_Q[has_pos_Q] - 1]

        rows = slice(q_start, q_start + num_q)
        self.ap[rows] = ap_Q.cpu()
        self.inp[rows] = (num_pos_Q.double() / last_rank_Q.double()).cpu()
        self.first_rank[rows] = first_rank_Q.cpu()
        self.num_pos[rows] = num_pos_Q.cpu()
        self._filled[rows] = True

    def result(self, max_rank: int = 50) -> dict:
        """``mAP``, ``mINP`` (floats in [0, 1]), ``cmc`` (np.ndarray of ``max_rank`` floats:
        ``cmc[k]`` = fraction of valid queries whose first positive is within the top k+1),
        ``num_valid_queries``, ``num_skipped_queries``, ``ap`` (per query; NaN where skipped)."""
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if not bool(self._filled.all()):
            missing = int(torch.nonzero(~self._filled)[0, 0])
            raise ValueError(f"query {missing} was never given distances (add_chunk must cover all queries)")
        valid = self.num_pos > 0
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(
                "no query has a positive in the gallery (same pid seen by another camera); "
                "check that query and gallery pids/camids come from the same dataset"
            )
        first = self.first_rank[valid]
        cmc = (first.unsqueeze(1) <= torch.arange(1, max_rank + 1).unsqueeze(0)).double().mean(0)
        ap = torch.where(valid, self.ap, torch.full_like(self.ap, float("nan")))
        return {
            "mAP": float(self.ap[valid].mean()),
            "mINP": float(self.inp[valid].mean()),
            "cmc": cmc.numpy(),
            "num_valid_queries": num_valid,
            "num_skipped_queries": self.num_query - num_valid,
            "ap": ap.numpy(),
        }


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, chunk_size: int = 256) -> dict:
    """Exact CMC / mAP / mINP of a dense query x gallery distance matrix (smaller = more similar).

    ``distmat``: numpy array or torch tensor (Q, G), float32 or float64, read ``chunk_size`` rows at
    a time without copying the whole matrix. Returns the dict of :meth:`RankAccumulator.result`.
    """
    dist = torch.as_tensor(distmat)
    if dist.dim() != 2 or not dist.dtype.is_floating_point:
        raise ValueError(f"distmat must be a 2-D float matrix, got dtype {dist.dtype} shape {tuple(dist.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    acc = RankAccumulator(q_pids, g_pids, q_camids, g_camids)
    if tuple(dist.shape) != (acc.num_query, acc.num_gallery):
        raise ValueError(
            f"distmat shape {tuple(dist.shape)} does not match {acc.num_query} queries x {acc.num_gallery} gallery labels"
        )
    for start in range(0, acc.num_query, chunk_size):
        acc.add_chunk(start, dist[start:start + chunk_size])
    return acc.result(max_rank)
