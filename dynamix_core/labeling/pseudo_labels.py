"""ReMix pseudo-labelling (SPEC 2.2 step 2): per epoch, sample single-camera videos up to a fixed image
quota, cluster each sampled video alone, drop noise, give every cluster a globally unique pseudo-id.

Pseudo-ids: ``id_offset + cluster index``, clusters numbered consecutively over the epoch's videos
(see :func:`dynamix_core.labeling.cluster.cluster_videos`). Pass ``id_offset`` = number of
multi-camera identities so pseudo-ids follow them in one id space; each epoch's labels replace the
previous epoch's, so ids are unique within an epoch (the centroids of pseudo-identities are rebuilt
every epoch, SPEC 2.2 step 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dynamix_core.labeling.cluster import cluster_videos_cfg
from dynamix_core.labeling.config import ClusterConfig


class VideoQuotaSampler:
    """Draws each epoch's videos at random until the epoch's image quota is reached.

    Videos come from a random permutation consumed in order (without replacement), so one cycle
    through the permutation labels every video once; a new permutation starts when it runs out. A
    video never appears twice in one epoch: at a cycle boundary the videos already drawn this epoch
    are moved to the end of the new cycle. If the quota is at least the whole set, an epoch takes
    every video once. State is two integers plus the seed (``state_dict``), so a restarted actor
    resumes the same sequence."""

    def __init__(self, video_ids: np.ndarray, video_sizes: np.ndarray, quota: int, seed: int = 0):
        self.video_ids = np.asarray(video_ids)
        self.video_sizes = np.asarray(video_sizes, dtype=np.int64)
        if self.video_ids.shape != self.video_sizes.shape or self.video_ids.ndim != 1 or not len(self.video_ids):
            raise ValueError(
                f"video_ids {self.video_ids.shape} and video_sizes {self.video_sizes.shape} "
                "must have the same non-empty 1-D shape"
            )
        if quota < 1:
            raise ValueError(f"quota: {quota} must be >= 1")
        self.quota = int(quota)
        self.seed = int(seed)
        self.cycle = 0
        self.position = 0
        self._order = self._cycle_order(self.cycle)

    def _cycle_order(self, cycle: int) -> np.ndarray:
        return np.random.default_rng([self.seed, cycle]).permutation(len(self.video_ids))

    def next_epoch(self) -> np.ndarray:
        """Video ids of the next epoch (their sizes sum to >= quota unless every video is taken)."""
        taken: list[int] = []
        total = 0
        while total < self.quota and len(taken) < len(self.video_ids):
            if self.position == len(self._order):
                self.cycle += 1
                self.position = 0
                self._order = self._cycle_order(self.cycle)
                if taken:  # no video twice in one epoch
                    used = np.isin(self._order, taken)
                    self._order = np.concatenate([self._order[~used], self._order[used]])
            v = int(self._order[self.position])
            self.position += 1
            taken.append(v)
            total += int(self.video_sizes[v])
        return self.video_ids[np.asarray(taken, dtype=np.int64)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "cycle": self.cycle, "position": self.position, "order": self._order.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.cycle, self.position = int(state["seed"]), int(state["cycle"]), int(state["position"])
        self._order = np.asarray(state["order"], dtype=np.int64)


@dataclass(frozen=True)
class PseudoLabels:
    """One epoch's pseudo-labels for the rows given to :func:`assign_pseudo_labels`."""

    labels: np.ndarray  # (N,) int64 pseudo-id, -1 = noise (not used this epoch)
    num_clusters: int
    id_offset: int

    @property
    def noise_rate(self) -> float:
        return float((self.labels < 0).mean()) if len(self.labels) else 0.0


def assign_pseudo_labels(
    embeddings: np.ndarray | torch.Tensor, video_ids: np.ndarray, cfg: ClusterConfig, id_offset: int
) -> PseudoLabels:
    """DBSCAN inside each video (momentum-encoder embeddings), noise -> -1, clusters -> ``id_offset + k``."""
    if id_offset < 0:
        raise ValueError(f"id_offset: {id_offset} must be >= 0 (the number of multi-camera identities)")
    clusters = cluster_videos_cfg(embeddings, video_ids, cfg)
    num_clusters = int(clusters.max()) + 1 if len(clusters) else 0
    labels = np.where(clusters >= 0, clusters + id_offset, -1).astype(np.int64)
    return PseudoLabels(labels=labels, num_clusters=num_clusters, id_offset=id_offset)
