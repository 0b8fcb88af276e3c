"""Per-video DBSCAN backends, kNN and sparse k-reciprocal Jaccard against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from dynamix_core.labeling import ClusterConfig, assign_pseudo_labels, cluster_videos, jaccard_distance_sparse, knn
from dynamix_core.labeling.config import ConfigError
from dynamix_core.labeling.pseudo_labels import VideoQuotaSampler


def clustered_videos(seed: int, num_videos: int = 12, dim: int = 16, noise: float = 0.55):
    """Videos of 5-60 rows, shuffled together: a few identities per video plus a shared video style."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 61, num_videos)
    vid = np.repeat(rng.choice(1000, num_videos, replace=False), sizes)
    person = rng.integers(0, 4, len(vid))
    video_style = {v: rng.normal(size=dim) for v in np.unique(vid)}
    people = {(v, p): rng.normal(size=dim) for v in np.unique(vid) for p in range(4)}
    x = np.stack([people[(v, p)] + 0.5 * video_style[v] for v, p in zip(vid, person)])
    x += noise * rng.normal(size=x.shape)
    perm = rng.permutation(len(vid))
    return x[perm], vid[perm]


def reference_per_video(x, vid, eps, min_samples, metric="cosine", dist=None):
    """sklearn DBSCAN on each video alone; clusters made unique by the documented rule (videos in
    increasing id order, each video's clusters after those of the previous videos)."""
    out = np.full(len(vid), -1, dtype=np.int64)
    offset = 0
    for v in np.unique(vid):
        rows = np.flatnonzero(vid == v)
        if dist is None:
            lab = DBSCAN(eps=eps, min_samples=min_samples, metric=metric).fit(x[rows]).labels_
        else:
            lab = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(dist[np.ix_(rows, rows)]).labels_
        out[rows] = np.where(lab >= 0, lab + offset, -1)
        offset += lab.max() + 1
    return out


@pytest.mark.parametrize("seed,eps,min_samples", [(0, 0.5, 4), (1, 0.3, 3), (2, 0.7, 5), (3, 0.5, 1)])
def test_torch_equals_sklearn_per_video_on_clustered_data(seed, eps, min_samples):
    x, vid = clustered_videos(seed)
    expected = reference_per_video(x, vid, eps, min_samples)
    got = cluster_videos(x, vid, eps, min_samples, backend="torch")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)  # same core points, noise, borders and numbering
    np.testing.assert_array_equal(cluster_videos(x, vid, eps, min_samples, backend="sklearn"), expected)


@pytest.mark.parametrize("eps", [0.02, 0.04, 0.07])
def test_torch_equals_sklearn_on_random_points_with_many_borders(eps):
    # Uniform points on a 3-D sphere: chains, borders shared by two clusters and noise all occur.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 3)).astype(np.float32)
    vid = rng.integers(0, 5, 600)
    expected = reference_per_video(x.astype(np.float64), vid, eps, 4)
    assert (expected < 0).any() and expected.max() > 10
    np.testing.assert_array_equal(cluster_videos(x, vid, eps, 4, backend="torch"), expected)


def test_small_block_budget_gives_the_same_labels():
    x, vid = clustered_videos(4, num_videos=9)
    expected = reference_per_video(x, vid, 0.5, 4)
    np.testing.assert_array_equal(cluster_videos(x, vid, 0.5, 4, backend="torch", max_block_elements=1), expected)


def test_border_point_reachable_from_two_clusters_goes_to_the_first_grown():
    # Two dense groups on a circle (angles in radians) and a point p at 0.5 within eps of one member
    # of each group, with too few neighbours to be core: sklearn gives it to the cluster grown first.
    angles = np.array([0.0, 0.01, 0.02, 0.03, 0.97, 0.98, 0.99, 1.0, 0.5])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    eps = 1 - np.cos(0.475)  # p reaches 0.03 and 0.97 (0.47 away), not 0.02 or 0.98 (0.48)
    for order in (np.arange(9), np.array([4, 5, 6, 7, 8, 0, 1, 2, 3]), np.array([8, 7, 0, 6, 1, 5, 2, 4, 3])):
        vid = np.zeros(9, dtype=np.int64)
        expected = reference_per_video(x[order], vid, eps, 4)
        got = cluster_videos(x[order], vid, eps, 4, backend="torch")
        np.testing.assert_array_equal(got, expected)
        p = int(np.flatnonzero(order == 8)[0])
        assert got[p] >= 0 and (got == got[p]).sum() == 5  # joined exactly one of the two clusters


def test_decision_at_the_eps_boundary_is_the_float64_one():
    # Pairs at cosine distance eps -+ 1e-9: float32 arithmetic alone cannot tell them apart.
    eps = 0.5
    rows, vids = [], []
    for v, delta in enumerate([-1e-9, 1e-9, -3e-9, 3e-9]):
        theta = np.arccos(1 - (eps + delta))
        rows += [[1.0, 0.0], [np.cos(theta), np.sin(theta)]]
        vids += [v, v]
    x, vid = np.array(rows), np.array(vids)
    expected = reference_per_video(x, vid, eps, 2)
    assert (expected[[0, 1, 4, 5]] >= 0).all() and (expected[[2, 3, 6, 7]] < 0).all()
    np.testing.assert_array_equal(cluster_videos(torch.from_numpy(x), vid, eps, 2, backend="torch"), expected)


def test_clusters_never_span_two_videos():
    x, vid = clustered_videos(5)
    labels = cluster_videos(x, vid, 0.6, 3, backend="torch")
    for c in np.unique(labels[labels >= 0]):
        assert len(np.unique(vid[labels == c])) == 1
    # Identical features in two videos still give two clusters.
    twin = np.concatenate([x[:20], x[:20]])
    labels = cluster_videos(twin, np.repeat([1, 2], 20), 0.6, 3, backend="torch")
    assert not set(labels[:20][labels[:20] >= 0]) & set(labels[20:][labels[20:] >= 0])


def test_backend_selection_and_errors():
    x, vid = clustered_videos(6, num_videos=3)
    np.testing.assert_array_equal(cluster_videos(x, vid, 0.5, 4, backend="auto"), reference_per_video(x, vid, 0.5, 4))
    try:
        import cuml  # noqa: F401  (only whether it imports matters)
    except ImportError:
        with pytest.raises(ImportError, match=r"\[gpu\]"):
            cluster_videos(x, vid, 0.5, 4, backend="cuml")
    with pytest.raises(ConfigError, match="backend"):
        cluster_videos(x, vid, 0.5, 4, backend="spark")
    with pytest.raises(ConfigError, match="eps"):
        cluster_videos(x, vid, 1.2, 4, metric="jaccard")
    with pytest.raises(ValueError, match="video_ids"):
        cluster_videos(x, vid[:-1], 0.5, 4)


# ---------------------------------------------------------------- kNN and k-reciprocal Jaccard


def dense_jaccard_reference(feat, k1, k2):
    """Line-by-line port of Cluster-Contrast's compute_jaccard_distance (dense, float64, full argsort
    ranking with self first)."""
    x = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    n = len(x)
    dist = 2 - 2 * x @ x.T
    np.fill_diagonal(dist, -np.inf)
    rank = np.argsort(dist, axis=1, kind="stable")
    np.fill_diagonal(dist, 0.0)

    def k_reciprocal_neigh(i, k):
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    V = np.zeros((n, n))
    for i in range(n):
        r = k_reciprocal_neigh(i, k1)
        expansion = r
        for candidate in r:
            cand = k_reciprocal_neigh(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(cand, r)) > 2 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jd = np.zeros((n, n))
    for i in range(n):
        m = np.minimum(V[i][None, :], V).sum(axis=1)
        jd[i] = 1 - m / (2 - m)
    return np.maximum(jd, 0.0)


def test_knn_backends_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, np.inf)
    expected = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(knn(torch.from_numpy(x), 10, "torch", chunk_rows=64), expected)
    np.testing.assert_array_equal(knn(x.astype(np.float32), 10, "faiss"), expected)
    dup = np.concatenate([x[:5]] * 3)  # exact duplicates: every row still ranks itself first
    assert (knn(dup, 4, "faiss")[:, 0] == np.arange(15)).all()


@pytest.mark.parametrize("k1,k2", [(20, 6), (8, 1), (5, 3)])
def test_sparse_jaccard_equals_dense_reference(k1, k2):
    x, _ = clustered_videos(8, num_videos=6)
    expected = dense_jaccard_reference(x, k1, k2)
    got = jaccard_distance_sparse(torch.from_numpy(x), k1, k2, knn_backend="torch")
    assert sp.issparse(got) and (got.data > 0).all()  # explicit zeros would vanish from a sparse matrix
    dense = got.toarray()
    stored = dense > 0
    np.testing.assert_allclose(dense[stored], expected[stored], atol=1e-12)
    assert (expected[~stored] == 1.0).all()  # a missing entry means "no shared support" = distance 1
    assert 0.05 < stored.mean() < 0.9


def test_per_video_jaccard_clustering_equals_sklearn_on_the_reference_distance():
    x, vid = clustered_videos(9, num_videos=8)
    dist = np.ones((len(vid), len(vid)))
    for v in np.unique(vid):
        rows = np.flatnonzero(vid == v)
        dist[np.ix_(rows, rows)] = dense_jaccard_reference(x[rows], 20, 6)
    for eps in (0.4, 0.6):
        expected = reference_per_video(x, vid, eps, 4, dist=dist)
        assert 0 <= (expected < 0).mean() < 1 and expected.max() > len(np.unique(vid))
        for backend in ("torch", "sklearn"):
            got = cluster_videos(torch.from_numpy(x), vid, eps, 4, metric="jaccard", backend=backend)
            np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- ReMix pseudo-labels


def test_quota_sampler_fills_the_quota_without_repeats_and_covers_every_video():
    rng = np.random.default_rng(0)
    video_ids = np.arange(100, 150)
    sizes = rng.integers(10, 100, 50)
    sampler = VideoQuotaSampler(video_ids, sizes, quota=400, seed=3)
    seen = []
    size_of = dict(zip(video_ids.tolist(), sizes.tolist()))
    for _ in range(12):
        epoch = sampler.next_epoch()
        assert len(set(epoch.tolist())) == len(epoch)
        total = sum(size_of[v] for v in epoch.tolist())
        assert total >= 400 and total - size_of[int(epoch[-1])] < 400  # stops as soon as the quota is met
        seen += epoch.tolist()
    assert len(seen) >= 50 and set(seen[:50]) == set(video_ids.tolist())  # the first cycle labels every video
    resumed = VideoQuotaSampler(video_ids, sizes, quota=400, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(resumed.next_epoch(), sampler.next_epoch())
    everything = VideoQuotaSampler(video_ids, sizes, quota=10**9).next_epoch()
    assert sorted(everything.tolist()) == video_ids.tolist()


def test_assign_pseudo_labels_offsets_after_the_multi_camera_ids():
    x, vid = clustered_videos(10, num_videos=5)
    cfg = ClusterConfig()
    result = assign_pseudo_labels(x, vid, cfg, id_offset=751)
    expected = reference_per_video(x, vid, cfg.eps, cfg.min_samples)
    np.testing.assert_array_equal(result.labels, np.where(expected >= 0, expected + 751, -1))
    assert result.num_clusters == expected.max() + 1
    assert result.noise_rate == pytest.approx((expected < 0).mean())
