"""Pseudo-labelling (ReMix) and relabeling (DynaMix) of single-camera data, Ray-free.

* :func:`cluster_videos` - DBSCAN inside each video; backends torch (batched), sklearn, cuml.
* :func:`knn`, :func:`jaccard_distance_sparse` - top-k search and sparse k-reciprocal Jaccard distance.
* :class:`VideoQuotaSampler`, :func:`assign_pseudo_labels` - ReMix per-epoch pseudo-labels.
* :func:`relabel_videos`, :class:`RelabelScheduler` - DynaMix split/merge, warm-up and once-per-pass.
* :class:`LabelTable` - row-addressed label versions (deltas, snapshots, retention) with an audit log.
* :func:`round_report` - pseudo-label quality (pairwise P/R/F, purity, fragmentation).
"""

from dynamix_core.labeling.cluster import cluster_videos, cluster_videos_cfg
from dynamix_core.labeling.config import ClusterConfig, PseudoLabelConfig, RelabelConfig
from dynamix_core.labeling.jaccard import jaccard_distance_sparse
from dynamix_core.labeling.knn import knn
from dynamix_core.labeling.label_table import LabelTable, LabelTableError
from dynamix_core.labeling.pseudo_labels import PseudoLabels, VideoQuotaSampler, assign_pseudo_labels
from dynamix_core.labeling.quality import cluster_stats, pairwise_scores, round_report
from dynamix_core.labeling.relabel import RelabelChanges, RelabelResult, relabel_videos
from dynamix_core.labeling.relabel_schedule import RelabelScheduler

__all__ = [
    "ClusterConfig", "LabelTable", "LabelTableError", "PseudoLabelConfig", "PseudoLabels",
    "RelabelChanges", "RelabelConfig", "RelabelResult", "RelabelScheduler", "VideoQuotaSampler",
    "assign_pseudo_labels", "cluster_stats", "cluster_videos", "cluster_videos_cfg", "jaccard_distance_sparse",
    "knn", "pairwise_scores", "relabel_videos", "round_report",
]
