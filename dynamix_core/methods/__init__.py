"""Comparison methods as Ray-free per-epoch hooks and losses (SPEC 2.4-2.6).

* :mod:`.cluster_contrast` - Cluster-Contrast baseline (Jaccard + DBSCAN, cluster memory, P x K) and
  the clustering / memory pieces the other two reuse;
* :mod:`.domainmix` - DomainMix: reliable real clusters, identity classifier reset, stage schedule,
  identity / triplet / domain-balance losses;
* :mod:`.calr` - CALR: per-camera local labels, pivot-refined global clusters, camera-entropy
  weights, camera alignment behind a gradient reversal layer;
* :mod:`.config` - their typed configs.
"""

from dynamix_core.methods.calr import Calr, GlobalClusters, LocalClustering, camera_alignment_loss
from dynamix_core.methods.cluster_contrast import ClusterContrast, ClusterMemory, EpochClusters
from dynamix_core.methods.config import (
    CalrConfig,
    ClusterContrastConfig,
    ClusterMemoryConfig,
    DomainMixConfig,
    JaccardDbscanConfig,
)
from dynamix_core.methods.domainmix import DomainMixHead, DomainMixSchedule, RealClusterer, ReliableClusters, StepKind

__all__ = [
    "Calr", "CalrConfig", "ClusterContrast", "ClusterContrastConfig", "ClusterMemory", "ClusterMemoryConfig",
    "DomainMixConfig", "DomainMixHead", "DomainMixSchedule", "EpochClusters", "GlobalClusters", "JaccardDbscanConfig",
    "LocalClustering", "RealClusterer", "ReliableClusters", "StepKind", "camera_alignment_loss",
]
