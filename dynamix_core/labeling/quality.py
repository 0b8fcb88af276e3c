"""Pseudo-label quality per labelling/relabeling round, as a plain dict of floats.

Conventions (label -1 = noise / dropped):
* pairwise precision / recall / F-score over all samples, a noise sample counting as a singleton
  cluster, so dropping images costs recall; computed from contingency counts (sum of C(n, 2)), never
  from the O(N^2) pairs. 0/0 counts as 1 (no predicted pairs = no false pair).
* purity (share of clustered samples carrying their cluster's majority true identity) and
  fragmentation (mean number of predicted clusters per true identity) over clustered samples only;
  the noise rate is reported beside them.
"""

from __future__ import annotations

import numpy as np

from dynamix_core.labeling.relabel import RelabelChanges


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def cluster_stats(pred: np.ndarray) -> dict[str, float]:
    """Number of clusters, noise rate and cluster-size statistics of one labelling."""
    pred = np.asarray(pred)
    sizes = np.unique(pred[pred >= 0], return_counts=True)[1]
    return {
        "num_clusters": float(len(sizes)),
        "noise_rate": float((pred < 0).mean()) if len(pred) else 0.0,
        "size_mean": float(sizes.mean()) if len(sizes) else 0.0,
        "size_median": float(np.median(sizes)) if len(sizes) else 0.0,
        "size_min": float(sizes.min()) if len(sizes) else 0.0,
        "size_max": float(sizes.max()) if len(sizes) else 0.0,
    }


def pairwise_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Pairwise precision/recall/F-score, purity and fragmentation of ``pred`` against ``true`` (>= 0)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must be equal 1-D shapes")
    if len(true) and true.min() < 0:
        raise ValueError("ground-truth labels must be >= 0")
    clustered = pred >= 0
    p, t = pred[clustered], true[clustered]
    if len(p):
        (cell_p, cell_t), cell_n = np.unique(np.stack([p, t]), axis=1, return_counts=True)
    else:
        cell_p = cell_t = cell_n = np.zeros(0, dtype=np.int64)
    tp = _pairs(cell_n)
    pred_pairs = _pairs(np.unique(p, return_counts=True)[1])
    true_pairs = _pairs(np.unique(true, return_counts=True)[1])
    precision = tp / pred_pairs if pred_pairs else 1.0
    recall = tp / true_pairs if true_pairs else 1.0
    f_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if len(p):
        _, cluster_of_cell = np.unique(cell_p, return_inverse=True)
        majority = np.zeros(cluster_of_cell.max() + 1)
        np.maximum.at(majority, cluster_of_cell, cell_n)
        purity = float(majority.sum() / len(p))
        fragmentation = float(len(cell_t) / len(np.unique(cell_t)))  # (cluster, identity) cells per identity
    else:
        purity, fragmentation = 1.0, 0.0
    return {
        "pair_precision": float(precision), "pair_recall": float(recall), "pair_f_score": float(f_score),
        "purity": purity, "fragmentation": fragmentation,
    }


def round_report(
    pred: np.ndarray, true: np.ndarray | None = None, changes: RelabelChanges | None = None
) -> dict[str, float]:
    """Everything known about one round: cluster stats, relabel counts, and scores when ``true`` is given."""
    report = cluster_stats(pred)
    if changes is not None:
        report.update({
            "num_splits": float(len(changes.splits)), "num_merges": float(len(changes.merges)),
            "num_dropped": float(changes.num_dropped), "num_videos": float(len(changes.videos)),
        })
    if true is not None:
        report.update(pairwise_scores(pred, true))
    return report
