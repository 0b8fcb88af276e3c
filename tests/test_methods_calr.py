"""CALR pieces on hand-made cases: pivot refinement discards exactly the conflicting same-camera
members (p = 1) and a p-fraction of them under a seed, densities and pivots against loops, camera
entropy weights against the closed form, per-camera average linkage against SciPy's, the kNN-graph
clustering, the silhouette-based selection and the camera alignment loss's reversed gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from dynamix_core.config import ConfigError
from dynamix_core.losses.domain import MLPDiscriminator
from dynamix_core.methods.calr import (
    Calr,
    LocalClustering,
    LocalLabelSelector,
    _dense_distance,
    camera_alignment_loss,
    camera_entropy_weights,
    cluster_pivots,
    discard_probability,
    knn_graph_clusters,
    local_camera_clusters,
    member_density,
    pivot_conflicts,
    pivot_refine,
)
from dynamix_core.labeling import jaccard_distance_sparse
from dynamix_core.labeling.groups import group_layout
from dynamix_core.methods.config import CalrConfig

# ---------------------------------------------------------------- pivot refinement

# Two global clusters plus one unclustered image (row 9). Cluster 0 = rows 0..5, pivot row 0
# (camera 1, local cluster 10); cluster 1 = rows 6..8, pivot row 7 (camera 2, local 20).
GLOBAL = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, -1])
CAMID = np.array([1, 1, 1, 2, 2, 1, 2, 2, 2, 1])
LOCAL = np.array([10, 10, 11, 12, 13, 12, 20, 20, 21, 11])
PIVOTS = np.array([0, 7])
# conflicts: row 2 (camera 1, local 11 != 10), row 5 (camera 1, local 12), row 8 (camera 2, local 21 != 20).
# Not conflicts: row 1 (same local as its pivot), rows 3, 4 (another camera, whatever their local
# label), rows 6, 7 (same local), row 9 (unclustered).


def test_pivot_refinement_discards_exactly_the_conflicting_same_camera_members():
    np.testing.assert_array_equal(np.flatnonzero(pivot_conflicts(GLOBAL, LOCAL, CAMID, PIVOTS)), [2, 5, 8])
    refined = pivot_refine(GLOBAL, LOCAL, CAMID, PIVOTS, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(refined, [0, 0, -1, 0, 0, -1, 1, 1, -1, -1])
    untouched = pivot_refine(GLOBAL, LOCAL, CAMID, PIVOTS, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(untouched, GLOBAL)


def test_self_paced_probability_discards_a_p_fraction_of_conflicts_only():
    n = 4000
    rng = np.random.default_rng(7)
    global_n = np.zeros(n, dtype=np.int64)
    camid = rng.integers(0, 2, n)
    camid[0] = 0
    local = np.where(rng.random(n) < 0.5, 0, 1 + np.arange(n))  # half share the pivot's local cluster 0
    local[0] = 0
    pivots = np.array([0])
    conflicts = (camid == 0) & (local != 0)
    p = 0.3
    refined = pivot_refine(global_n, local, camid, pivots, p, np.random.default_rng(123))
    discarded = refined < 0
    assert not (discarded & ~conflicts).any()
    num_conflicts = int(conflicts.sum())
    sigma = math.sqrt(num_conflicts * p * (1 - p))
    assert abs(discarded.sum() - p * num_conflicts) < 4 * sigma
    again = pivot_refine(global_n, local, camid, pivots, p, np.random.default_rng(123))
    np.testing.assert_array_equal(refined, again)


def test_discard_probability_schedules():
    const = CalrConfig(discard_probability=0.8)
    assert discard_probability(0, const) == discard_probability(37, const) == 0.8
    cos = CalrConfig(discard_probability=0.8, discard_schedule="cosine", stage2_epochs=40)
    assert discard_probability(0, cos) == pytest.approx(0.8)
    assert discard_probability(20, cos) == pytest.approx(0.4)
    assert discard_probability(40, cos) == pytest.approx(0.0)
    assert discard_probability(10, cos) == pytest.approx(0.8 * (1 + math.cos(math.pi / 4)) / 2)


def test_density_and_pivots_against_loops():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, 1, 2])
    k = 3
    density = member_density(feat, labels, k)
    for i in range(11):
        if labels[i] < 0:
            assert math.isnan(density[i])
            continue
        sims = sorted((float(feat[i] @ feat[j]) for j in range(11) if j != i and labels[j] == labels[i]), reverse=True)
        assert density[i] == pytest.approx(sum(sims[:k]), abs=1e-6)
    pivots = cluster_pivots(density, labels, 3)
    for c in range(3):
        members = np.flatnonzero(labels == c)
        assert pivots[c] == members[np.argmax(density[members])]
    # ties go to the lowest index
    np.testing.assert_array_equal(cluster_pivots(np.array([1.0, 2.0, 2.0, 5.0]), np.array([0, 0, 0, 1]), 2), [1, 3])


# ---------------------------------------------------------------- camera entropy weights


def test_camera_entropy_weights_match_the_closed_form():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, -1, -1])
    camid = np.array([4, 4, 9, 9, 4, 9, 7, 5, 5, 5, 4, 4, 4, 9, 9, 7])
    h_31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = [math.log(1 + math.log(2)), math.log(1 + math.log(3)), 0.0, math.log(1 + h_31)]
    np.testing.assert_allclose(camera_entropy_weights(labels, camid, 4), expected, rtol=1e-12)


# ---------------------------------------------------------------- stage 1: local clusters


def two_camera_features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    who = np.array([0] * 6 + [1] * 6 + [2] * 5 + [3] * 5 + [0] * 5)
    camid = np.array([3] * 12 + [8] * 10 + [5] * 5)
    feat = F.normalize(centers[torch.as_tensor(who)] + 0.05 * torch.randn(len(who), 16, generator=g), dim=1)
    return feat, camid, who


def test_local_clusters_are_per_camera_average_linkage():
    feat, camid, who = two_camera_features()
    cfg = CalrConfig()
    out = local_camera_clusters(feat, camid, cfg)
    # cameras in id order: 3 (12 images -> 2 clusters), 5 (5 -> 1), 8 (10 -> 2)
    assert out.num_clusters == 5
    layout = group_layout(camid, 1 << 24)
    dist = jaccard_distance_sparse(feat, cfg.local_k1, cfg.local_k2, layout=layout)
    offset = 0
    for cam in (3, 5, 8):
        rows = np.flatnonzero(camid == cam)
        n_clusters = max(1, len(rows) // 5)
        got = out.labels[rows]
        assert set(got) == set(range(offset, offset + n_clusters))
        if n_clusters > 1:  # SciPy's average linkage cut at n_clusters: the same partition
            ref = fcluster(linkage(squareform(_dense_distance(dist, rows), checks=False), "average"),
                           n_clusters, criterion="maxclust")
            assert same_partition(got, ref)
        offset += n_clusters
    # the well-separated people of each camera are its clusters
    assert same_partition(out.labels[camid == 3], who[camid == 3])
    assert same_partition(out.labels[camid == 8], who[camid == 8])
    assert out.silhouette > 0.5


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_local_clusters_refuse_an_oversized_camera():
    feat, camid, _ = two_camera_features()
    with pytest.raises(ValueError, match="camera 3 has 12 images, more than max_camera_size=10"):
        local_camera_clusters(feat, camid, CalrConfig(max_camera_size=10))


def test_selector_keeps_the_best_silhouette_and_round_trips():
    sel = LocalLabelSelector()
    with pytest.raises(ValueError, match="no local labels"):
        _ = sel.labels
    a = LocalClustering(np.array([0, 0, 1]), 2, float("nan"))
    b = LocalClustering(np.array([0, 1, 1]), 2, 0.4)
    c = LocalClustering(np.array([1, 0, 0]), 2, 0.3)
    assert sel.offer(0, a) and sel.offer(1, b) and not sel.offer(2, c)
    assert not sel.offer(3, LocalClustering(np.array([0, 0, 0]), 1, float("nan")))
    assert sel.best_epoch == 1 and sel.labels.tolist() == [0, 1, 1]
    other = LocalLabelSelector()
    other.load_state_dict(sel.state_dict())
    assert other.best_epoch == 1 and other.labels.tolist() == [0, 1, 1] and other.best.silhouette == 0.4


# ---------------------------------------------------------------- stage 2: global clusters


def test_knn_graph_clusters_link_similar_images_and_drop_small_components():
    base = torch.eye(4)
    # 6 images near axis 0, 5 near axis 1, 3 near axis 2 (too small), 1 on axis 3
    who = [0] * 6 + [1] * 5 + [2] * 3 + [3]
    g = torch.Generator().manual_seed(0)
    feat = base[who] + 0.05 * torch.randn(len(who), 4, generator=g)
    labels = knn_graph_clusters(feat, k=15, min_similarity=0.5, min_cluster_size=5)
    np.testing.assert_array_equal(labels, [0] * 6 + [1] * 5 + [-1] * 4)


def test_global_epoch_end_to_end_with_warmup_weights():
    feat, camid, who = two_camera_features()
    calr = Calr(CalrConfig(global_method="knn", knn_min_cluster_size=4, entropy_warmup_epochs=1), seed=0)
    calr.local_epoch(feat, camid, epoch=0)
    warm = calr.global_epoch(feat, camid, stage2_epoch=0)
    assert (warm.weights == 1).all() and calr.weight_M.tolist() == [1.0] * warm.num_clusters
    after = calr.global_epoch(feat, camid, stage2_epoch=1)
    np.testing.assert_allclose(after.weights, camera_entropy_weights(after.labels, camid, after.num_clusters))
    kept = after.labels >= 0
    for c in range(after.num_clusters):  # person 0 spans cameras 3 and 5
        assert len(set(who[after.labels == c])) == 1
    assert kept.sum() >= 20
    z = feat[[0, 6, 12, 17]].clone()
    label = torch.as_tensor(after.labels[[0, 6, 12, 17]])
    assert (label >= 0).all()
    rows = calr.memory.bank.centroids.double()
    ref = sum(after.weights[int(y)] * -torch.log_softmax(z[i].double() @ rows.T / 0.05, dim=0)[int(y)]
              for i, y in enumerate(label)) / 4
    torch.testing.assert_close(calr.loss(z, label).double(), ref, rtol=1e-5, atol=1e-6)


def test_camera_alignment_loss_reverses_the_encoder_gradient_only():
    torch.manual_seed(0)
    clf = MLPDiscriminator(6, 3, hidden=(8,)).eval()
    feat = torch.randn(5, 6, requires_grad=True)
    cam = torch.tensor([0, 1, 2, 1, 0])
    loss = camera_alignment_loss(feat, cam, clf, 1.0)
    g_feat, g_w = torch.autograd.grad(loss, (feat, clf[0].weight))
    plain = F.cross_entropy(clf(feat), cam)
    p_feat, p_w = torch.autograd.grad(plain, (feat, clf[0].weight))
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(g_feat, -p_feat)
    torch.testing.assert_close(g_w, p_w)


def test_calr_config_validation():
    with pytest.raises(ConfigError, match="discard_probability"):
        CalrConfig(discard_probability=1.5)
    with pytest.raises(ConfigError, match="knn_min_similarity"):
        CalrConfig(knn_min_similarity=2.0)
    cfg = CalrConfig()
    assert (cfg.local_k1, cfg.local_k2, cfg.local_cluster_divisor) == (15, 4, 5)
    assert (cfg.knn_k, cfg.knn_min_similarity, cfg.knn_min_cluster_size) == (15, 0.5, 5)
    assert (cfg.entropy_warmup_epochs, cfg.camera_alignment_epochs, cfg.grl_lambda) == (5, 3, 1.0)
    assert (cfg.memory.temperature, cfg.memory.momentum, cfg.discard_probability) == (0.05, 0.1, 1.0)
