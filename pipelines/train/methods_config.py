"""The ``cluster_method`` section of a training run: what the clustering recipes (Cluster-Contrast,
DomainMix, CALR; SPEC 2.4-2.6) read on top of the shared sections (model, optim, data, scaling).

An *epoch* of these methods is a fixed number of optimizer steps between two clusterings (as the
public codes' ``--iters``): ``ceil(run.max_steps / num_epochs)``, where each method's own config
says how many epochs it has (CALR: stage 1 + stage 2; DomainMix: ``num_epochs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynamix_core.config import ConfigError, field
from dynamix_core.methods import CalrConfig, ClusterContrastConfig, ClusterMemoryConfig, DomainMixConfig
from dynamix_core.methods.config import JaccardDbscanConfig

from pipelines.train.methods import CLUSTER_METHODS  # noqa: F401  (re-exported for the config)


@dataclass(kw_only=True)
class ContrastSection:
    """Cluster-Contrast: Jaccard + DBSCAN over all train images, cluster memory."""

    num_epochs: int = field(50, help="clusterings over the run (steps per epoch = ceil(run.max_steps / this))")
    cluster: JaccardDbscanConfig = field(default_factory=JaccardDbscanConfig, help="per-epoch clustering")
    memory: ClusterMemoryConfig = field(default_factory=ClusterMemoryConfig, help="cluster memory and its loss")


@dataclass(kw_only=True)
class ClusterMethodSection:
    num_ids_per_batch: int = field(16, help="P: clusters (DomainMix: identities or clusters) per batch on each worker")
    images_per_id: int = field(4, help="K: images per cluster, spread over its cameras")
    feature_batch_size: int = field(128, help="images embedded at once by the momentum encoder before a clustering")
    cluster_contrast: ContrastSection = field(default_factory=ContrastSection, help="method=cluster_contrast")
    domainmix: DomainMixConfig = field(default_factory=DomainMixConfig, help="method=domainmix")
    calr: CalrConfig = field(default_factory=CalrConfig, help="method=calr")

    def __post_init__(self) -> None:
        if self.num_ids_per_batch < 1 or self.images_per_id < 1 or self.feature_batch_size < 1:
            raise ConfigError(f"cluster_method.num_ids_per_batch={self.num_ids_per_batch}, images_per_id="
                              f"{self.images_per_id}, feature_batch_size={self.feature_batch_size}: all must be >= 1")

    def num_epochs(self, method: str) -> int:
        if method == "cluster_contrast":
            return self.cluster_contrast.num_epochs
        if method == "domainmix":
            return self.domainmix.num_epochs
        return self.calr.local_epochs + self.calr.stage2_epochs

    def steps_per_epoch(self, method: str, max_steps: int) -> int:
        return math.ceil(max_steps / self.num_epochs(method))

    def contrast_config(self) -> ClusterContrastConfig:
        return ClusterContrastConfig(cluster=self.cluster_contrast.cluster, memory=self.cluster_contrast.memory,
                                     num_ids_per_batch=self.num_ids_per_batch, images_per_id=self.images_per_id)

    def check(self, method: str, max_steps: int) -> None:
        """Checks against the run: every epoch needs at least one step; CALR's stage 2 needs local labels."""
        epochs = self.num_epochs(method)
        where = {"cluster_contrast": "cluster_method.cluster_contrast.num_epochs",
                 "domainmix": "cluster_method.domainmix.num_epochs",
                 "calr": "cluster_method.calr.local_epochs + stage2_epochs"}[method]
        if not 1 <= epochs <= max_steps:
            raise ConfigError(f"{where} = {epochs}: must lie in [1, run.max_steps={max_steps}] (one step per epoch at least)")
        if method == "calr" and self.calr.local_epochs < 1:
            raise ConfigError("cluster_method.calr.local_epochs=0: stage 2 refines with the local labels of stage 1; "
                              "set local_epochs >= 1")
