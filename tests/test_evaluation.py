"""Evaluation metrics against independent references: scikit-learn AP, a stable-order loop, and
the authors' k-reciprocal re-ranking loop transcribed from the paper's public code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from dynamix_core.config import ConfigError
from dynamix_core.evaluation import (
    EvalConfig,
    RerankConfig,
    evaluate,
    evaluate_features,
    evaluate_rank,
    k_reciprocal_rerank,
    pairwise_distance,
)


def make_labels(rng, num_q, num_g, num_ids=12, num_cams=4, num_distractor_ids=5):
    """Queries drawn from ``num_ids`` identities; the gallery also holds distractor identities
    that never appear as queries, and some query identities have no cross-camera match."""
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids + num_distractor_ids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    # Identity 0 appears in the gallery only under the camera of its queries: those queries are skipped.
    q_camids[q_pids == 0] = 0
    g_camids[g_pids == 0] = 0
    return q_pids, g_pids, q_camids, g_camids


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The field's definition, one query at a time: stable argsort, drop same pid + same camera."""
    aps, inps, cmcs = [], [], []
    for q in range(len(q_pids)):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        rel = (g_pids[order][keep] == q_pids[q]).astype(np.float64)
        if rel.sum() == 0:
            continue
        hits = np.cumsum(rel)
        aps.append(np.sum(hits / np.arange(1, len(rel) + 1) * rel) / rel.sum())
        last = np.flatnonzero(rel)[-1]
        inps.append(rel.sum() / (last + 1))
        first = np.flatnonzero(rel)[0]
        cmcs.append((np.arange(max_rank) >= first).astype(np.float64))
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": np.mean(cmcs, 0), "ap": aps,
            "num_valid_queries": len(aps), "num_skipped_queries": len(q_pids) - len(aps)}


def sklearn_ap(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per-query AP by scikit-learn on the filtered gallery (valid only without ties)."""
    aps = []
    for q in range(len(q_pids)):
        keep = ~((g_pids == q_pids[q]) & (g_camids == q_camids[q]))
        rel = g_pids[keep] == q_pids[q]
        if rel.any():
            aps.append(average_precision_score(rel, -distmat[q][keep]))
    return np.array(aps)


def assert_metrics_equal(got, want, tol=1e-6):
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert got["num_skipped_queries"] == want["num_skipped_queries"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=tol)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=tol)
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=tol)


def test_matches_sklearn_average_precision_without_ties():
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 40, 300)
    distmat = rng.permutation(40 * 300).reshape(40, 300).astype(np.float32) / 1000  # all distinct
    got = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, chunk_size=7)
    want_ap = sklearn_ap(distmat, q_pids, g_pids, q_camids, g_camids)
    assert got["num_skipped_queries"] > 0 and got["num_valid_queries"] == len(want_ap)
    np.testing.assert_allclose(got["ap"][~np.isnan(got["ap"])], want_ap, atol=1e-6)
    assert got["mAP"] == pytest.approx(want_ap.mean(), abs=1e-6)
    assert_metrics_equal(got, loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, 20))


@pytest.mark.parametrize("levels", [3, 10, 200])
def test_ties_break_by_gallery_index(levels):
    rng = np.random.default_rng(levels)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 37, 251)
    distmat = rng.integers(0, levels, (37, 251)).astype(np.float32) / levels  # many exact ties
    want = loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, 15)
    for chunk_size in (1, 5, 37, 64):
        got = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=15, chunk_size=chunk_size)
        assert_metrics_equal(got, want)
        np.testing.assert_allclose(got["ap"][~np.isnan(got["ap"])], want["ap"], atol=1e-12)


def test_constant_rows_and_negative_distances():
    rng = np.random.default_rng(3)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 9, 60)
    distmat = -rng.random((9, 60)).astype(np.float64)  # e.g. negated similarities
    distmat[2] = 0.5  # one row entirely tied
    got = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, chunk_size=4)
    assert_metrics_equal(got, loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, 10), tol=1e-12)


def test_bad_inputs_raise():
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 3])
    cams_q, cams_g = np.array([0, 0]), np.array([1, 1, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_rank(np.array([[0.1, np.nan, 0.3], [0.1, 0.2, 0.3]]), q_pids, g_pids, cams_q, cams_g)
    with pytest.raises(ValueError, match="does not match"):
        evaluate_rank(np.zeros((2, 4)), q_pids, g_pids, cams_q, cams_g)
    with pytest.raises(ValueError, match="no query has a positive"):
        evaluate_rank(np.zeros((2, 3)), q_pids, g_pids, cams_q, np.array([0, 0, 0]))


def unit_features_with_ties(rng, n, dim):
    """Unit vectors with four entries of +-1/2: every dot product is exact in float32 whatever the
    summation order (so chunked and full distances agree bit for bit), and ties are frequent."""
    feat = np.zeros((n, dim), dtype=np.float32)
    for i in range(n):
        feat[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return feat


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_features_chunked_equal_full_matrix(metric):
    rng = np.random.default_rng(7)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 53, 211)
    if metric == "cosine":
        q_feat, g_feat = unit_features_with_ties(rng, 53, 12), unit_features_with_ties(rng, 211, 12)
    else:  # small integers: exact squared distances, some ties
        q_feat = rng.integers(-3, 4, (53, 6)).astype(np.float32)
        g_feat = rng.integers(-3, 4, (211, 6)).astype(np.float32)
    distmat = pairwise_distance(torch.from_numpy(q_feat), torch.from_numpy(g_feat), metric).numpy()
    want = loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, 10)
    for chunk_size in (1, 6, 53, 100):
        got = evaluate_features(q_feat, g_feat, q_pids, g_pids, q_camids, g_camids, metric=metric,
                                max_rank=10, chunk_size=chunk_size)
        assert_metrics_equal(got, want)


def test_features_distances_follow_their_definitions():
    rng = np.random.default_rng(11)
    q_feat, g_feat = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    qn = q_feat / np.linalg.norm(q_feat, axis=1, keepdims=True)
    gn = g_feat / np.linalg.norm(g_feat, axis=1, keepdims=True)
    cos = pairwise_distance(torch.tensor(q_feat), torch.tensor(g_feat), "cosine").numpy()
    euc = pairwise_distance(torch.tensor(q_feat), torch.tensor(g_feat), "euclidean").numpy()
    np.testing.assert_allclose(cos, 1 - qn @ gn.T, atol=1e-5)
    np.testing.assert_allclose(euc, ((q_feat[:, None] - g_feat[None]) ** 2).sum(-1), atol=1e-4)
    assert cos.dtype == np.float32 and euc.dtype == np.float32


def test_random_features_match_loop_reference():
    rng = np.random.default_rng(5)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 60, 400, num_ids=20)
    centres = rng.normal(size=(25, 16))
    q_feat = (centres[q_pids] + rng.normal(size=(60, 16))).astype(np.float32)
    g_feat = (centres[g_pids] + rng.normal(size=(400, 16))).astype(np.float32)
    distmat = pairwise_distance(torch.from_numpy(q_feat), torch.from_numpy(g_feat), "cosine").numpy()
    got = evaluate_features(q_feat, g_feat, q_pids, g_pids, q_camids, g_camids, max_rank=30, chunk_size=17)
    assert_metrics_equal(got, loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, 30))
    assert 0.2 < got["mAP"] < 1.0  # identity structure is visible: the check is not vacuous


def reference_rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
    """The authors' numpy loop (Zhong et al. 2017), with a stable argsort so ties are deterministic."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            cand_forward = initial_rank[candidate, :int(np.around(k1 / 2.0)) + 1]
            cand_backward = initial_rank[cand_forward, :int(np.around(k1 / 2.0)) + 1]
            fi_candidate = np.where(cand_backward == candidate)[0]
            cand_k_reciprocal_index = cand_forward[fi_candidate]
            if len(np.intersect1d(cand_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(cand_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, cand_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


@pytest.mark.parametrize("k1,k2", [(20, 6), (5, 1), (7, 3)])
def test_rerank_matches_reference_loop(k1, k2):
    rng = np.random.default_rng(k1)
    centres = rng.normal(size=(8, 6))
    q_feat = torch.tensor(centres[rng.integers(0, 8, 15)] + 0.5 * rng.normal(size=(15, 6)), dtype=torch.float32)
    g_feat = torch.tensor(centres[rng.integers(0, 8, 70)] + 0.5 * rng.normal(size=(70, 6)), dtype=torch.float32)
    d_qg, d_qq, d_gg = (pairwise_distance(a, b, "euclidean").clamp(min=0) for a, b in
                        [(q_feat, g_feat), (q_feat, q_feat), (g_feat, g_feat)])
    cfg = RerankConfig(enabled=True, k1=k1, k2=k2, lambda_value=0.3, row_chunk=16)
    got = k_reciprocal_rerank(d_qg, d_qq, d_gg, cfg).numpy()
    want = reference_rerank(d_qg.numpy(), d_qq.numpy(), d_gg.numpy(), k1, k2, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 0.1  # the re-ranked distances are not degenerate


def test_rerank_size_limit_and_config_checks():
    with pytest.raises(ValueError, match="rerank.max_images=50"):
        RerankConfig(max_images=50).check_size(20, 40)
    with pytest.raises(ConfigError, match="lambda_value"):
        RerankConfig(lambda_value=1.5)
    rng = np.random.default_rng(2)
    q_pids, g_pids, q_camids, g_camids = make_labels(rng, 10, 40)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    cfg = EvalConfig(rerank=RerankConfig(enabled=True, k1=5, k2=2), max_rank=5)
    got = evaluate(cfg, feats[:10], feats[10:], q_pids, g_pids, q_camids, g_camids)
    d = [pairwise_distance(torch.from_numpy(a), torch.from_numpy(b), "cosine").numpy()
         for a, b in [(feats[:10], feats[10:]), (feats[:10], feats[:10]), (feats[10:], feats[10:])]]
    want = loop_reference(reference_rerank(*d, 5, 2, 0.3), q_pids, g_pids, q_camids, g_camids, 5)
    assert_metrics_equal(got, want, tol=1e-5)
