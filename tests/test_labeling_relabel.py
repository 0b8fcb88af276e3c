"""DynaMix relabeling rules on hand-made videos, the relabel schedule, and pseudo-label quality metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics.cluster import pair_confusion_matrix

from dynamix_core.labeling import RelabelConfig, RelabelScheduler, pairwise_scores, relabel_videos, round_report

DIM = 32


def person(rng, proto, n, spread=0.15):
    return proto + spread * rng.normal(size=(n, DIM)) / np.sqrt(DIM)


def test_two_person_tracklet_is_split_and_strays_dropped():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, DIM))
    feat = np.concatenate([person(rng, a, 6), person(rng, b, 5), person(rng, c, 3), -a[None]])
    labels = np.full(15, 7)
    frames = np.arange(15)
    result = relabel_videos(feat, np.zeros(15), labels, frames, RelabelConfig(), next_id=100)
    assert result.changes.splits == [(7, (100, 101))]
    assert (result.labels[:6] == 100).all() and (result.labels[6:11] == 101).all()
    assert (result.labels[11:] == -1).all() and result.changes.num_dropped == 4  # 4 < n_min: dropped
    assert result.next_id == 102
    assert result.changes.created_ids == {100, 101} and result.changes.retired_ids == {7}


def test_one_big_cluster_plus_strays_is_not_a_split():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, DIM))
    feat = np.concatenate([person(rng, a, 8), person(rng, b, 3)])
    result = relabel_videos(feat, np.zeros(11), np.full(11, 3), np.arange(11), RelabelConfig(), next_id=4)
    assert result.changes.splits == [] and (result.labels == 3).all() and result.next_id == 4


def test_two_fragments_of_one_person_merge_into_the_smaller_id():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, DIM))
    feat = np.concatenate([person(rng, a, 5), person(rng, a, 5), person(rng, b, 5)])
    labels = np.repeat([12, 10, 11], 5)
    frames = np.arange(15)  # no shared frame
    result = relabel_videos(feat, np.full(15, 4), labels, frames, RelabelConfig(), next_id=13)
    assert result.changes.merges == [(10, 12)]
    np.testing.assert_array_equal(result.labels, np.repeat([10, 10, 11], 5))
    assert result.changes.reinit_ids == {10} and result.changes.retired_ids == {12}


def test_tracklets_sharing_a_frame_never_merge():
    rng = np.random.default_rng(3)
    a = rng.normal(size=DIM)
    feat = np.concatenate([person(rng, a, 5), person(rng, a, 5)])
    frames = np.concatenate([np.arange(5), np.arange(4, 9)])  # both in frame 4
    result = relabel_videos(feat, np.zeros(10), np.repeat([0, 1], 5), frames, RelabelConfig(), next_id=2)
    assert result.changes.merges == []
    unknown = np.full(10, -1)  # unknown frames never clash
    assert relabel_videos(feat, np.zeros(10), np.repeat([0, 1], 5), unknown, RelabelConfig(), next_id=2).changes.merges == [(0, 1)]


def test_merge_needs_similarity_above_t_merge_mutual_nn_and_same_video():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, DIM))
    mix = (a + b) / 2
    feat = np.concatenate([person(rng, a, 5), person(rng, b, 5)])
    cen_sim = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    assert cen_sim(a, b) < 0.8
    assert relabel_videos(feat, np.zeros(10), np.repeat([0, 1], 5), np.arange(10), RelabelConfig(), 2).changes.merges == []
    # Same person in two videos: identities are video-local, never merged across videos.
    feat2 = np.concatenate([person(rng, a, 5), person(rng, a, 5)])
    r = relabel_videos(feat2, np.repeat([0, 1], 5), np.repeat([0, 1], 5), np.arange(10), RelabelConfig(), 2)
    assert r.changes.merges == []
    # Three identities: a, a', and mix; a and a' are mutual nearest neighbours, mix is not merged.
    feat3 = np.concatenate([person(rng, a, 5), person(rng, a, 5), person(rng, mix, 5)])
    r = relabel_videos(feat3, np.zeros(15), np.repeat([0, 1, 2], 5), np.arange(15), RelabelConfig(t_merge=0.5), 3)
    assert r.changes.merges == [(0, 1)]
    # With a second round, the merged a+a' is compared with mix again (its centroid moved).
    r2 = relabel_videos(feat3, np.zeros(15), np.repeat([0, 1, 2], 5), np.arange(15),
                        RelabelConfig(t_merge=0.5, merge_rounds=2), 3)
    assert r2.changes.merges[0] == (0, 1) and len(r2.changes.merges) <= 2


def test_next_id_must_exceed_ids_in_use():
    with pytest.raises(ValueError, match="next_id"):
        relabel_videos(np.ones((3, DIM)), np.zeros(3), np.array([0, 5, 5]), np.arange(3), RelabelConfig(), next_id=5)


def test_scheduler_warmup_and_once_per_pass():
    sched = RelabelScheduler(np.array([1, 2, 3]), total_iterations=100, warmup_fraction=0.1)
    assert sched.due(9, [1, 2]).tolist() == []  # first 10% of iterations: no relabeling
    assert sched.due(10, [1, 2, 2]).tolist() == [1, 2]
    sched.mark_done([1, 2])
    assert sched.due(11, [1, 2, 3]).tolist() == [3] and sched.pass_index == 0
    sched.mark_done([3])
    assert sched.pass_index == 1 and sched.due(12, [1, 3]).tolist() == [1, 3]  # new pass
    resumed = RelabelScheduler(np.array([1, 2, 3]), 100)
    sched.mark_done([1])
    resumed.load_state_dict(sched.state_dict())
    assert resumed.due(50, [1, 2]).tolist() == [2] and resumed.pass_index == 1
    with pytest.raises(ValueError, match="unknown video"):
        sched.due(50, [9])


# ---------------------------------------------------------------- quality metrics


def brute_force_pairs(pred, true):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        same_pred = pred[i] >= 0 and pred[i] == pred[j]
        same_true = true[i] == true[j]
        tp += same_pred and same_true
        fp += same_pred and not same_true
        fn += same_true and not same_pred
    return tp, fp, fn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_scores_match_a_pairs_loop_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 8, 120)
    pred = np.where(rng.random(120) < 0.8, true * 2 + rng.integers(0, 2, 120), -1)  # fragments + noise
    pred[:10] = 3  # an impure cluster
    tp, fp, fn = brute_force_pairs(pred, true)
    got = pairwise_scores(pred, true)
    assert got["pair_precision"] == pytest.approx(tp / (tp + fp))
    assert got["pair_recall"] == pytest.approx(tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert got["pair_f_score"] == pytest.approx(2 * p * r / (p + r))
    # sklearn counts ordered pairs; give each noise sample its own cluster id (singletons).
    singles = np.where(pred >= 0, pred, 10_000 + np.arange(120))
    (_, c01), (c10, c11) = pair_confusion_matrix(true, singles)
    assert got["pair_precision"] == pytest.approx(c11 / (c11 + c01))
    assert got["pair_recall"] == pytest.approx(c11 / (c11 + c10))


def test_purity_and_fragmentation_on_a_hand_example():
    true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([5, 5, 5, 6, 6, 6, -1, 7, 7, 8])
    got = round_report(pred, true)
    # clusters 5: {0,0,0} 6: {0,1,1} 7: {2,2} 8: {2}: majorities 3 + 2 + 2 + 1 of 9 clustered samples
    assert got["purity"] == pytest.approx(8 / 9)
    # identity 0 in clusters {5, 6}, 1 in {6}, 2 in {7, 8}: (2 + 1 + 2) / 3
    assert got["fragmentation"] == pytest.approx(5 / 3)
    assert got["noise_rate"] == pytest.approx(0.1) and got["num_clusters"] == 4
    assert got["size_max"] == 3 and got["size_min"] == 1
