"""DomainMix pieces on hand-made cases: the reliability criteria keep and drop the right samples,
the independence threshold is the public code's quantile and stays frozen, the domain label boundary
``pid == N_syn`` is real, classifier rows are reset, the stage schedule alternates 1 in 10, and the
head's losses are the documented weighted sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamix_core.config import ConfigError
from dynamix_core.losses.classification import identity_cross_entropy, soft_margin_triplet_loss
from dynamix_core.losses.domain import domain_balance_loss
from dynamix_core.methods.config import DomainMixConfig
from dynamix_core.methods.domainmix import (
    DomainMixHead,
    DomainMixSchedule,
    RealClusterer,
    ReliableClusters,
    StepKind,
    domain_labels,
    independence_threshold,
    overlap_distance,
    reliable_clusters,
    reset_classifier_rows,
    singletons_for_noise,
)

# ---------------------------------------------------------------- reliability criteria

# 38 samples. A = 0..5, B = 6..11, C = 12..17, D = 24..29, E = 30..36 at the middle radius; 18..23 and 37 noise.
MID = np.full(38, -1)
MID[0:6], MID[6:12], MID[12:18], MID[24:30], MID[30:37] = 0, 1, 2, 3, 4
TIGHT = np.full(38, -1)
TIGHT[0:5] = 0  # A: 5 is tight noise -> not compact
TIGHT[6:9], TIGHT[9:12] = 1, 2  # B: two tight halves of equal size -> both are "largest": all compact
TIGHT[12:18] = 3
TIGHT[24:28], TIGHT[28:30] = 4, 5  # D: compact core of 4 < 5 images -> quantity drops it
TIGHT[30:37] = 6
LOOSE = MID.copy()
LOOSE[18:24] = 2  # C merges with 6 noise points in the loose clustering: R_indep = 1 - 6/12 = 0.5
LOOSE[37] = 4  # E gains one point: R_indep = 1 - 7/8 = 0.125


def test_reliability_criteria_keep_and_drop_the_right_samples():
    labels = reliable_clusters(MID, TIGHT, LOOSE, threshold=0.2, min_cluster_size=5)
    expected = np.full(38, -1)
    expected[0:5] = 0  # A without its non-compact member 5
    expected[6:12] = 1  # B whole
    expected[30:37] = 2  # E whole (0.125 <= 0.2); C (0.5) dropped, D (4 compact) dropped
    np.testing.assert_array_equal(labels, expected)


def test_reliability_threshold_boundary_and_quantity_boundary():
    # threshold exactly at E's score keeps E (<=); just below drops it
    assert (reliable_clusters(MID, TIGHT, LOOSE, threshold=0.125, min_cluster_size=5)[30:37] == 2).all()
    assert (reliable_clusters(MID, TIGHT, LOOSE, threshold=0.12, min_cluster_size=5)[30:37] == -1).all()
    # min size 4 keeps D's compact core 24..27 and nothing else of D
    labels = reliable_clusters(MID, TIGHT, LOOSE, threshold=0.2, min_cluster_size=4)
    assert len(set(labels[24:28])) == 1 and labels[24] >= 0 and (labels[28:30] == -1).all()
    # no threshold yet: nothing is reliable
    assert (reliable_clusters(MID, TIGHT, LOOSE, threshold=None, min_cluster_size=5) == -1).all()


def test_overlap_distance_matches_a_set_loop():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
    ref = []
    for i in range(40):
        sa, sb = set(np.flatnonzero(a == a[i])), set(np.flatnonzero(b == b[i]))
        ref.append(1 - len(sa & sb) / len(sa | sb))
    np.testing.assert_allclose(overlap_distance(a, b), ref, rtol=0, atol=1e-15)


def test_independence_threshold_is_the_public_codes_quantile():
    mid = singletons_for_noise(MID)
    indep = np.array([0.0] * 12 + [0.5] * 6 + [0.9] * 6 + [0.0] * 6 + [0.125] * 7 + [0.9])  # singletons: 0.9
    # multi-image clusters' scores sorted: [0, 0, 0, 0.125, 0.5]; index min(4, round(0.9 * 5) = 4) -> 0.5
    assert independence_threshold(mid, indep, 0.9) == 0.5
    # round(0.5 * 5) = round(2.5) = 2 (numpy rounds half to even) -> 0.0; rounding half up would give 0.125
    assert independence_threshold(mid, indep, 0.5) == 0.0
    assert independence_threshold(np.arange(5), np.zeros(5), 0.9) is None


def blob_features(num_ids: int, per_id: int, noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_ids, 32, generator=g), dim=1)
    truth = np.repeat(np.arange(num_ids), per_id)
    feat = centers[torch.as_tensor(truth)] + noise * torch.randn(len(truth), 32, generator=g)
    return F.normalize(feat, dim=1), truth


def test_real_clusterer_finds_separated_identities_and_freezes_its_threshold():
    feat, truth = blob_features(8, 10, 0.1, seed=0)
    clusterer = RealClusterer(DomainMixConfig())
    first = clusterer.cluster(feat)
    assert first.independence_threshold is not None
    kept = first.labels >= 0
    assert kept.mean() > 0.9
    for c in range(first.num_clusters):  # every kept cluster is pure
        assert len(set(truth[first.labels == c])) == 1
    assert np.array_equal(np.unique(first.labels[kept]), np.arange(first.num_clusters))
    frozen = clusterer.threshold
    other, _ = blob_features(5, 12, 0.2, seed=1)
    assert clusterer.cluster(other).independence_threshold == frozen
    restored = RealClusterer(DomainMixConfig())
    restored.load_state_dict(clusterer.state_dict())
    assert restored.threshold == frozen


# ---------------------------------------------------------------- identity space and classifier


def test_domain_label_boundary_pid_equal_to_num_synthetic_is_real():
    n_syn = 100
    pid = torch.tensor([0, n_syn - 1, n_syn, n_syn + 1, 5000])
    np.testing.assert_array_equal(domain_labels(pid, n_syn).numpy(), [0, 0, 1, 1, 1])


def test_reset_classifier_rows_writes_normalised_centroids_and_nothing_else():
    weight = torch.randn(10, 4)
    before = weight.clone()
    centroids = torch.tensor([[3.0, 0, 0, 4], [0, 2, 0, 0]])
    reset_classifier_rows(weight, centroids, first_row=6)
    torch.testing.assert_close(weight[6], torch.tensor([0.6, 0, 0, 0.8]))
    torch.testing.assert_close(weight[7], torch.tensor([0.0, 1, 0, 0]))
    torch.testing.assert_close(weight[:6], before[:6])
    torch.testing.assert_close(weight[8:], before[8:])
    with pytest.raises(ValueError, match="classifier rows"):
        reset_classifier_rows(weight, centroids, first_row=9)


def test_schedule_stage1_then_one_discriminator_step_in_ten():
    schedule = DomainMixSchedule(iters_per_epoch=25, stage1_epochs=2, discriminator_period=10)
    assert all(schedule.step_kind(i) is StepKind.IDENTITY for i in range(50))
    kinds = [schedule.step_kind(i) for i in range(50, 150)]
    disc = [i for i, k in enumerate(kinds) if k is StepKind.DISCRIMINATOR]
    assert disc == list(range(0, 100, 10))  # the first stage-2 iteration, then every 10th
    assert kinds.count(StepKind.ENCODER) == 90
    cfg_schedule = DomainMixSchedule.from_config(DomainMixConfig(), iters_per_epoch=4)
    assert cfg_schedule.step_kind(30 * 4 - 1) is StepKind.IDENTITY
    assert cfg_schedule.step_kind(30 * 4) is StepKind.DISCRIMINATOR


def make_head(num_synthetic=3, max_real=4):
    torch.manual_seed(0)
    head = DomainMixHead(6, num_synthetic, max_real, DomainMixConfig(discriminator_hidden=(8,)))
    feat = F.normalize(torch.randn(12, 6), dim=1)
    labels = np.array([0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1, -1])
    head.set_real_clusters(feat, ReliableClusters(labels, 2, 0.1, 3))
    return head, feat


def test_head_sets_real_rows_and_active_classes():
    head, feat = make_head()
    assert head.num_active == 5
    torch.testing.assert_close(head.classifier.weight[3], F.normalize(feat[:3].mean(0), dim=0))
    torch.testing.assert_close(head.classifier.weight[4], F.normalize(feat[3:6].mean(0), dim=0))


def test_head_losses_are_the_documented_weighted_sums():
    head, _ = make_head()
    head.eval()  # deterministic BatchNorm in the discriminator
    pid = torch.tensor([0, 0, 2, 2, 3, 3, 4, 4])
    feat, neck = torch.randn(8, 6), torch.randn(8, 6)
    with torch.no_grad():  # the rows past the active classes must not enter the softmax
        head.classifier.weight[5:] = 100.0
    logits = neck @ head.classifier.weight[:5].T
    ce = identity_cross_entropy(logits, pid, smoothing=0.1, temperature=2.0)
    tri = soft_margin_triplet_loss(feat, pid)
    total, terms = head.losses(StepKind.IDENTITY, feat, neck, pid)
    torch.testing.assert_close(total, 10 * ce + tri)
    bal = domain_balance_loss(head.discriminator(neck))
    total, terms = head.losses(StepKind.ENCODER, feat, neck, pid)
    torch.testing.assert_close(total, ce + tri + bal)
    assert set(terms) == {"identity", "triplet", "balance"}
    neck.requires_grad_(True)
    total, _ = head.losses(StepKind.DISCRIMINATOR, feat, neck, pid)
    expected = F.cross_entropy(head.discriminator(neck.detach()), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    torch.testing.assert_close(total, expected)
    total.backward()
    assert neck.grad is None  # the discriminator step does not reach the encoder


def test_balance_loss_through_a_uniform_discriminator_is_minus_ln2():
    head, _ = make_head()
    with torch.no_grad():
        head.discriminator[-1].weight.zero_()
        head.discriminator[-1].bias.zero_()
    _, terms = head.losses(StepKind.ENCODER, torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 0, 3, 3]))
    assert terms["balance"].item() == pytest.approx(-math.log(2))


def test_config_rejects_inconsistent_values():
    with pytest.raises(ConfigError, match="eps_gap"):
        DomainMixConfig(eps_gap=0.7)
    with pytest.raises(ConfigError, match="stage1_epochs"):
        DomainMixConfig(stage1_epochs=70)
    with pytest.raises(ConfigError, match="discriminator_period"):
        DomainMixConfig(discriminator_period=1)
    cfg = DomainMixConfig()
    radii = (cfg.cluster.eps - cfg.eps_gap, cfg.cluster.eps, cfg.cluster.eps + cfg.eps_gap)
    assert radii == pytest.approx((0.58, 0.6, 0.62))
    assert (cfg.cluster.k1, cfg.cluster.k2, cfg.cluster.min_samples, cfg.min_cluster_size) == (30, 6, 4, 5)
