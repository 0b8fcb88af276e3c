"""Cluster-Contrast baseline: DBSCAN on the sparse Jaccard distance against scikit-learn on the dense
matrix, centroids and the memory's InfoNCE / momentum update against loops, and one epoch end to end
on separated identities (clusters = people, memory = their centroids, P x K batches of one cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

from dynamix_core.config import ConfigError, load_config
from dynamix_core.methods.cluster_contrast import (
    ClusterContrast,
    ClusterMemory,
    cluster_centroids,
    dbscan_precomputed,
    jaccard_distance,
    relabel_consecutive,
)
from dynamix_core.methods.config import ClusterContrastConfig, ClusterMemoryConfig, JaccardDbscanConfig


def blobs(num_ids: int, per_id: int, noise: float, seed: int, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_ids, dim, generator=g), dim=1)
    truth = np.repeat(np.arange(num_ids), per_id)
    feat = F.normalize(centers[torch.as_tensor(truth)] + noise * torch.randn(len(truth), dim, generator=g), dim=1)
    return feat, truth


def test_relabel_consecutive_in_order_of_first_appearance():
    labels, num = relabel_consecutive(np.array([7, -1, 3, 7, 9, 3, -1]))
    np.testing.assert_array_equal(labels, [0, -1, 1, 0, 2, 1, -1])
    assert num == 3


def test_dbscan_on_sparse_jaccard_equals_sklearn_on_the_dense_matrix():
    feat, _ = blobs(6, 8, 0.35, seed=3)
    cfg = JaccardDbscanConfig(k1=10, k2=3, eps=0.6)
    dist = jaccard_distance(feat, cfg)
    dense = dist.toarray()
    dense[dense == 0] = 1.0  # unstored pairs are at distance 1
    np.fill_diagonal(dense, 0.0)
    ref = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(dbscan_precomputed(dist, 0.6, 4), ref)
    assert (ref >= 0).any() and len(set(ref)) > 2  # a non-trivial case


def test_cluster_centroids_are_normalised_member_means():
    feat = torch.randn(7, 3, dtype=torch.float64)
    labels = np.array([1, 0, 1, -1, 0, 0, 1])
    cent = cluster_centroids(feat, labels, 2)
    for c in range(2):
        mean = sum(feat[i] for i in range(7) if labels[i] == c) / int((labels == c).sum())
        torch.testing.assert_close(cent[c].double(), mean / mean.norm(), rtol=1e-6, atol=1e-7)


def test_memory_loss_and_update_against_loops():
    g = torch.Generator().manual_seed(1)
    cent = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    cfg = ClusterMemoryConfig(temperature=0.05, momentum=0.1)
    memory = ClusterMemory(cent, cfg)
    z = F.normalize(torch.randn(6, 4, generator=g), dim=1).requires_grad_(True)
    label = torch.tensor([0, 0, 3, 4, 4, 4])
    weight = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0])

    def ref(zz, w):
        total = 0.0
        for i in range(6):
            logits = [sum(zz[i, d] * cent[k, d] for d in range(4)) / 0.05 for k in range(5)]
            log_z = torch.log(sum(torch.exp(v) for v in logits))
            total = total + w[label[i]] * (log_z - logits[label[i]])
        return total / 6

    for w in (None, weight):
        loss = memory.loss(z, label, w)
        expected = ref(z, torch.ones(5) if w is None else w)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        (g_loss,) = torch.autograd.grad(loss, z)
        (g_ref,) = torch.autograd.grad(expected, z)
        torch.testing.assert_close(g_loss, g_ref, rtol=1e-4, atol=1e-5)

    key = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    memory.update(key, label, step=1)
    for k in range(5):
        members = [i for i in range(6) if label[i] == k]
        if not members:
            torch.testing.assert_close(memory.bank.centroids[k], cent[k])
            continue
        moved = 0.1 * cent[k] + 0.9 * sum(key[i] for i in members) / len(members)
        torch.testing.assert_close(memory.bank.centroids[k], moved / moved.norm(), rtol=1e-5, atol=1e-6)


def test_one_epoch_end_to_end_on_separated_identities():
    feat, truth = blobs(8, 10, 0.1, seed=0)
    camid = np.arange(len(truth)) % 3
    cc = ClusterContrast(ClusterContrastConfig(images_per_id=4))
    clusters = cc.start_epoch(feat, camid, seed=5)
    assert clusters.num_clusters == 8 and clusters.num_used == 80
    for c in range(8):  # one cluster per person
        members = clusters.labels == c
        assert len(set(truth[members])) == 1 and members.sum() == 10
        torch.testing.assert_close(cc.memory.bank.centroids[c], F.normalize(feat[members].mean(0), dim=0))
    refs, label = cc.sampler.sample(3)
    assert len(refs) == 12
    np.testing.assert_array_equal(clusters.labels[np.asarray(refs)], label)
    assert all(len(set(label[i : i + 4])) == 1 for i in range(0, 12, 4))
    assert len(set(camid[np.asarray(refs[:4])])) == 3  # K images spread over the cluster's cameras


def test_sampler_refuses_an_epoch_without_clusters():
    feat = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    cc = ClusterContrast(ClusterContrastConfig(cluster=JaccardDbscanConfig(eps=0.01, min_samples=4)))
    with pytest.raises(ValueError, match="no image was clustered"):
        cc.start_epoch(feat, np.zeros(12))


def test_config_defaults_and_validation(tmp_path):
    cfg = ClusterContrastConfig()
    assert (cfg.cluster.k1, cfg.cluster.k2, cfg.cluster.eps, cfg.cluster.min_samples) == (30, 6, 0.6, 4)
    assert cfg.memory.temperature == 0.05
    bank_cfg = cfg.memory.bank_config()
    assert (bank_cfg.loss_mode, bank_cfg.mask_same_video, bank_cfg.momentum) == ("all", False, 0.1)
    path = tmp_path / "cc.yaml"
    path.write_text("cluster: {eps: 0.55}\nmemory: {momentum: 0.2}\n")
    loaded = load_config(ClusterContrastConfig, path)
    assert loaded.cluster.eps == 0.55 and loaded.memory.momentum == 0.2
    with pytest.raises(ConfigError, match="eps"):
        JaccardDbscanConfig(eps=1.2)
    with pytest.raises(ConfigError, match="no key .epsilon."):
        load_config(ClusterContrastConfig, None, ["cluster.epsilon=0.5"])
