"""Configuration of pseudo-labelling (ReMix, SPEC 2.2 step 2) and relabeling (DynaMix, SPEC 2.3a)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dynamix_core.config import ConfigError, field

Metric = Literal["cosine", "jaccard"]
Backend = Literal["auto", "torch", "sklearn", "cuml"]


def _check_choice(name: str, value: str, choices) -> None:
    if value not in get_args(choices):
        raise ConfigError(f"{name}: {value!r} is not one of {list(get_args(choices))}")


@dataclass(kw_only=True)
class ClusterConfig:
    """DBSCAN run separately inside each video (or any other group of rows)."""

    eps: float = field(0.5, help="DBSCAN radius: neighbours are at distance <= eps")
    min_samples: int = field(4, help="DBSCAN: neighbours (self included) that make a core point")
    metric: Metric = field("cosine", help="cosine distance (1 - s), or k-reciprocal Jaccard distance")
    k1: int = field(20, help="jaccard: k of the k-reciprocal neighbour sets")
    k2: int = field(6, help="jaccard: neighbours averaged by the query-expansion step (1 = none)")
    backend: Backend = field(
        "auto", help="auto: cuml when importable and on GPU, else torch; sklearn = per-video reference"
    )
    max_block_elements: int = field(
        1 << 24, help="torch backend: videos x padded size^2 per batched block (bounds memory)"
    )

    def __post_init__(self) -> None:
        _check_choice("metric", self.metric, Metric)
        _check_choice("backend", self.backend, Backend)
        if self.eps <= 0:
            raise ConfigError(f"eps: {self.eps} must be > 0")
        if self.metric == "jaccard" and self.eps >= 1:
            raise ConfigError(f"eps: {self.eps} must be < 1 with metric=jaccard (Jaccard distances lie in [0, 1])")
        if self.min_samples < 1:
            raise ConfigError(f"min_samples: {self.min_samples} must be >= 1")
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"k1={self.k1}, k2={self.k2}: both must be >= 1")
        if self.max_block_elements < 1:
            raise ConfigError(f"max_block_elements: {self.max_block_elements} must be >= 1")


@dataclass(kw_only=True)
class PseudoLabelConfig:
    """ReMix per-epoch pseudo-labelling of single-camera videos."""

    quota: int | None = field(
        None, help="single-camera images labelled per epoch; None = size of the multi-camera train set"
    )
    seed: int = field(0, help="seed of the per-epoch video sampling")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, help="DBSCAN inside each sampled video")

    def __post_init__(self) -> None:
        if self.quota is not None and self.quota < 1:
            raise ConfigError(f"quota: {self.quota} must be >= 1 (or null for the multi-camera train size)")


@dataclass(kw_only=True)
class RelabelConfig:
    """DynaMix Relabeling Module: split impure tracklets, merge fragments, once per video per pass."""

    t_split: float = field(0.5, help="DBSCAN eps (cosine distance) used to split one identity's images")
    split_min_samples: int = field(4, help="DBSCAN min_samples used to split one identity's images")
    n_min: int = field(4, help="a split needs >= 2 clusters of at least this many images")
    t_merge: float = field(0.8, help="two identities merge when their centroid cosine similarity exceeds this")
    merge_rounds: int = field(
        1, help="merge rule applications per video; later rounds see merged centroids and frame sets"
    )
    warmup_fraction: float = field(0.1, help="no relabeling during this fraction of the training iterations")
    backend: Backend = field("auto", help="DBSCAN backend of the split step")

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, Backend)
        if self.t_split <= 0:
            raise ConfigError(f"t_split: {self.t_split} must be > 0")
        if self.split_min_samples < 1 or self.n_min < 1:
            raise ConfigError(f"split_min_samples={self.split_min_samples}, n_min={self.n_min}: both must be >= 1")
        if not -1.0 <= self.t_merge <= 1.0:
            raise ConfigError(f"t_merge: {self.t_merge} must be a cosine similarity in [-1, 1]")
        if self.merge_rounds < 0:
            raise ConfigError(f"merge_rounds: {self.merge_rounds} must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction: {self.warmup_fraction} must be in [0, 1)")
