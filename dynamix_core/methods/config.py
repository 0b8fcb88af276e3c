"""Configuration of the comparison methods: Cluster-Contrast (SPEC 2.6), DomainMix (SPEC 2.4), CALR (SPEC 2.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.centroids import CentroidBankConfig
from dynamix_core.config import ConfigError, field


@dataclass(kw_only=True)
class JaccardDbscanConfig:
    """DBSCAN over the whole set on the k-reciprocal Jaccard distance (Cluster-Contrast's clustering)."""

    k1: int = field(30, help="k of the k-reciprocal neighbour sets of the Jaccard distance")
    k2: int = field(6, help="neighbours averaged by the Jaccard query-expansion step (1 = none)")
    eps: float = field(0.6, help="DBSCAN radius on the Jaccard distance (in (0, 1))")
    min_samples: int = field(4, help="DBSCAN: neighbours (self included) that make a core point")

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"k1={self.k1}, k2={self.k2}: both must be >= 1")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps: {self.eps} must lie in (0, 1): Jaccard distances lie in [0, 1]")
        if self.min_samples < 1:
            raise ConfigError(f"min_samples: {self.min_samples} must be >= 1")


@dataclass(kw_only=True)
class ClusterMemoryConfig:
    """Cluster memory (a centroid bank rebuilt every epoch) and its InfoNCE loss."""

    temperature: float = field(0.05, help="tau of the softmax of a feature over the cluster memory")
    momentum: float = field(0.1, help="m in c <- m c + (1 - m) mean(batch features of the cluster), renormalised")
    storage_dtype: Literal["float16", "bfloat16", "float32"] = field("float32", help="dtype of the memory rows")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"memory.temperature: {self.temperature} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"memory.momentum: {self.momentum} must lie in [0, 1)")

    def bank_config(self) -> CentroidBankConfig:
        """The centroid-bank settings of a cluster memory: softmax over every row, no video masking."""
        return CentroidBankConfig(momentum=self.momentum, temp_multi=self.temperature, temp_single=self.temperature,
                                  loss_mode="all", mask_same_video=False, storage_dtype=self.storage_dtype)


@dataclass(kw_only=True)
class ClusterContrastConfig:
    """Cluster-Contrast baseline: Jaccard + DBSCAN pseudo-labels, cluster memory, P x K batches."""

    cluster: JaccardDbscanConfig = field(default_factory=JaccardDbscanConfig, help="per-epoch clustering")
    memory: ClusterMemoryConfig = field(default_factory=ClusterMemoryConfig, help="cluster memory and its loss")
    num_ids_per_batch: int = field(16, help="P: clusters per batch")
    images_per_id: int = field(4, help="K: images per cluster, spread over its cameras")

    def __post_init__(self) -> None:
        if self.num_ids_per_batch < 1 or self.images_per_id < 1:
            raise ConfigError(f"num_ids_per_batch={self.num_ids_per_batch}, images_per_id={self.images_per_id}: "
                              "both must be >= 1")


@dataclass(kw_only=True)
class DomainMixConfig:
    """DomainMix: labeled synthetic + clustered real images, identity/triplet losses, domain balance."""

    cluster: JaccardDbscanConfig = field(default_factory=JaccardDbscanConfig,
                                         help="clustering of the real images (eps = the middle radius)")
    eps_gap: float = field(0.02, help="tight radius = eps - gap (compactness), loose radius = eps + gap (independence)")
    independence_quantile: float = field(
        0.9, help="independence threshold = this quantile of the cluster scores at the first epoch, then frozen")
    min_cluster_size: int = field(5, help="quantity: clusters left with fewer images than this are dropped")
    label_smoothing: float = field(0.1, help="epsilon of the label-smoothed identity cross-entropy")
    logit_temperature: float = field(2.0, help="identity logits are divided by this before the softmax")
    weight_identity_stage1: float = field(10.0, help="weight of the identity cross-entropy in stage 1")
    weight_identity_stage2: float = field(1.0, help="weight of the identity cross-entropy in stage 2 encoder steps")
    weight_triplet: float = field(1.0, help="weight of the soft-margin batch-hard triplet loss")
    weight_balance: float = field(1.0, help="weight of the domain balance loss in stage 2 encoder steps")
    num_epochs: int = field(60, help="training epochs")
    stage1_epochs: int = field(30, help="epochs of stage 1 (identity + triplet only); stage 2 adds the discriminator")
    discriminator_period: int = field(10, help="stage 2: one iteration in this many trains the discriminator")
    discriminator_hidden: tuple[int, ...] = field((1024, 512, 256), help="hidden widths of the discriminator MLP")

    def __post_init__(self) -> None:
        if not 0.0 < self.eps_gap < min(self.cluster.eps, 1.0 - self.cluster.eps):
            raise ConfigError(f"eps_gap: {self.eps_gap} must be > 0 and keep eps +- gap inside (0, 1) "
                              f"(cluster.eps = {self.cluster.eps})")
        if not 0.0 <= self.independence_quantile <= 1.0:
            raise ConfigError(f"independence_quantile: {self.independence_quantile} must lie in [0, 1]")
        if self.min_cluster_size < 1:
            raise ConfigError(f"min_cluster_size: {self.min_cluster_size} must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: {self.label_smoothing} must lie in [0, 1)")
        if self.logit_temperature <= 0:
            raise ConfigError(f"logit_temperature: {self.logit_temperature} must be > 0")
        if not 0 <= self.stage1_epochs <= self.num_epochs:
            raise ConfigError(f"stage1_epochs: {self.stage1_epochs} must lie in [0, num_epochs={self.num_epochs}]")
        if self.discriminator_period < 2:
            raise ConfigError(f"discriminator_period: {self.discriminator_period} must be >= 2 "
                              "(otherwise the encoder is never trained in stage 2)")


@dataclass(kw_only=True)
class CalrConfig:
    """CALR: per-camera local clusters (stage 1), pivot-refined global clusters (stage 2)."""

    local_k1: int = field(15, help="stage 1: k1 of the per-camera Jaccard distance")
    local_k2: int = field(4, help="stage 1: k2 of the per-camera Jaccard distance")
    local_cluster_divisor: int = field(5, help="stage 1: a camera with N_c images gets N_c // this clusters")
    max_camera_size: int = field(
        20000, help="stage 1: largest camera clustered (average linkage needs an N_c x N_c dense matrix)")
    local_epochs: int = field(10, help="stage 1 epochs; the local labels of the best-silhouette epoch are kept")
    global_method: Literal["dbscan", "knn"] = field(
        "dbscan", help="stage 2 clustering: DBSCAN on Jaccard, or connected components of a cosine kNN graph")
    global_dbscan: JaccardDbscanConfig = field(default_factory=JaccardDbscanConfig, help="global_method=dbscan")
    knn_k: int = field(15, help="global_method=knn: neighbours per image")
    knn_min_similarity: float = field(0.5, help="global_method=knn: an edge needs cosine similarity >= this")
    knn_min_cluster_size: int = field(5, help="global_method=knn: smaller components are dropped")
    density_k: int = field(10, help="density of a member = sum of its similarities to its k nearest cluster members")
    discard_probability: float = field(1.0, help="probability that a conflicting same-camera member is discarded")
    discard_schedule: Literal["constant", "cosine"] = field(
        "constant", help="constant: discard_probability every epoch; cosine: decays from it to 0 over stage 2")
    stage2_epochs: int = field(50, help="stage 2 epochs (the length of the cosine schedule)")
    entropy_warmup_epochs: int = field(5, help="stage 2 epochs before the ln(1 + H_cam) cluster weights apply")
    camera_alignment_epochs: int = field(3, help="training epochs (from the first) with the camera alignment loss")
    grl_lambda: float = field(1.0, help="gradient reversal scale in front of the camera classifier")
    camera_classifier_hidden: tuple[int, ...] = field((1024, 512, 256), help="hidden widths of the camera classifier")
    memory: ClusterMemoryConfig = field(default_factory=ClusterMemoryConfig, help="cluster memory and its loss")

    def __post_init__(self) -> None:
        for name in ("local_k1", "local_k2", "local_cluster_divisor", "max_camera_size", "knn_k",
                     "knn_min_cluster_size", "density_k", "stage2_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("local_epochs", "entropy_warmup_epochs", "camera_alignment_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 0")
        if not -1.0 <= self.knn_min_similarity <= 1.0:
            raise ConfigError(f"knn_min_similarity: {self.knn_min_similarity} must be a cosine in [-1, 1]")
        if not 0.0 <= self.discard_probability <= 1.0:
            raise ConfigError(f"discard_probability: {self.discard_probability} must lie in [0, 1]")
        if self.grl_lambda < 0:
            raise ConfigError(f"grl_lambda: {self.grl_lambda} must be >= 0")
