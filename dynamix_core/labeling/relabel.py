"""DynaMix Relabeling Module (SPEC 2.3a): refine single-camera identities inside each video.

Runs on momentum-encoder features of whole videos, for all the given videos at once:

* split: each identity's images are clustered alone (DBSCAN, cosine ``t_split``, batched over all
  identities); when >= 2 clusters hold >= ``n_min`` images each, every such cluster becomes a new
  identity and the identity's other images get label -1 (dropped from this use); otherwise the
  identity is left untouched;
* merge: inside one video, identities a and b merge when their unit-centroid similarity exceeds
  ``t_merge``, each is the other's nearest identity (ties -> lower index), and no frame holds both
  (frame -1 = unknown, never a clash). Mutual nearest neighbours form a matching, so one round is
  a set of disjoint pairs and needs no transitive closure; with ``merge_rounds > 1`` the rule is
  applied again to the merged identities (centroids and frame sets of the union), so a chain of
  merges only happens where every step satisfied the rule. The merged identity keeps the smaller id.

New identities get fresh ids from ``next_id`` upward. :class:`RelabelChanges` says which centroid
rows to re-initialise (``reinit_ids``) and which ids are gone (``retired_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dynamix_core.labeling.cluster import cluster_videos_cfg
from dynamix_core.labeling.config import ClusterConfig, RelabelConfig


@dataclass
class RelabelChanges:
    """What one relabel call changed."""

    videos: list[int] = field(default_factory=list)
    splits: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (old id, new ids)
    merges: list[tuple[int, int]] = field(default_factory=list)  # (kept id, absorbed id)
    num_dropped: int = 0  # images set to -1 by splits

    @property
    def retired_ids(self) -> set[int]:
        return {old for old, _ in self.splits} | {absorbed for _, absorbed in self.merges}

    @property
    def created_ids(self) -> set[int]:
        return {n for _, new in self.splits for n in new} - self.retired_ids

    @property
    def reinit_ids(self) -> set[int]:
        """Identities whose membership is new or changed: their centroids must be re-initialised."""
        return (self.created_ids | {kept for kept, _ in self.merges}) - self.retired_ids


@dataclass(frozen=True)
class RelabelResult:
    labels: np.ndarray  # (N,) int64, -1 = not used
    changes: RelabelChanges
    next_id: int  # first id not yet allocated


def relabel_videos(
    feat_ND: np.ndarray | torch.Tensor,
    video_ids: np.ndarray,
    labels: np.ndarray,
    frames: np.ndarray,
    cfg: RelabelConfig,
    next_id: int,
) -> RelabelResult:
    """Split then merge the identities of every video present in ``video_ids``.

    ``labels`` are the current identity ids (unique across videos, -1 = unused; rows with -1 stay -1),
    ``frames`` the frame index per row (-1 = unknown). ``next_id`` must exceed every id in use."""
    feat_ND = torch.as_tensor(feat_ND)
    video_ids, labels, frames = np.asarray(video_ids), np.asarray(labels, dtype=np.int64), np.asarray(frames)
    n = feat_ND.shape[0]
    if feat_ND.ndim != 2 or video_ids.shape != (n,) or labels.shape != (n,) or frames.shape != (n,):
        raise ValueError(
            f"features (N, D) and video_ids, labels, frames (N,) expected; got {tuple(feat_ND.shape)}, "
            f"{video_ids.shape}, {labels.shape}, {frames.shape}"
        )
    if len(labels) and next_id <= labels.max():
        raise ValueError(f"next_id {next_id} must exceed the largest identity id in use ({labels.max()})")
    changes = RelabelChanges(videos=sorted(int(v) for v in np.unique(video_ids)))
    new_labels, next_id = _split(feat_ND, labels, cfg, next_id, changes)
    unit_ND = torch.nn.functional.normalize(feat_ND.detach().double(), dim=1).cpu().numpy()
    order = np.argsort(video_ids, kind="stable")
    bounds = np.flatnonzero(np.diff(video_ids[order])) + 1
    for rows in np.split(order, bounds):
        for _ in range(cfg.merge_rounds):
            if not _merge_round(unit_ND[rows], new_labels, rows, frames[rows], cfg.t_merge, changes):
                break
    return RelabelResult(labels=new_labels, changes=changes, next_id=next_id)


def _split(feat_ND: torch.Tensor, labels: np.ndarray, cfg: RelabelConfig, next_id: int, changes: RelabelChanges):
    out = labels.copy()
    used = np.flatnonzero(labels >= 0)
    if not len(used):
        return out, next_id
    split_cfg = ClusterConfig(eps=cfg.t_split, min_samples=cfg.split_min_samples, metric="cosine", backend=cfg.backend)
    clusters = cluster_videos_cfg(feat_ND[torch.from_numpy(used).to(feat_ND.device)], labels[used], split_cfg)
    lab_U = labels[used]
    # Cluster ids are unique across identities, so any member row tells a cluster's identity.
    clustered = clusters >= 0
    cid, first, size = np.unique(clusters[clustered], return_index=True, return_counts=True)
    owner = lab_U[clustered][first]
    big = size >= cfg.n_min
    ids, num_big = np.unique(owner[big], return_counts=True)
    for old in ids[num_big >= 2]:
        parts = cid[big & (owner == old)]
        new_ids = tuple(range(next_id, next_id + len(parts)))
        next_id += len(parts)
        in_old = lab_U == old
        rows, part_of_row = used[in_old], clusters[in_old]
        out[rows] = -1
        for c, new in zip(parts, new_ids):
            out[rows[part_of_row == c]] = new
        changes.splits.append((int(old), new_ids))
        changes.num_dropped += int((out[rows] < 0).sum())
    return out, next_id


def _merge_round(
    unit_VD: np.ndarray, labels: np.ndarray, rows: np.ndarray, frames_V: np.ndarray, t_merge: float,
    changes: RelabelChanges,
) -> bool:
    """One application of the merge rule inside one video (legend: V rows of the video, I identities).
    Updates ``labels`` in place; returns whether anything merged."""
    lab_V = labels[rows]
    ids_I, inv_V = np.unique(lab_V[lab_V >= 0], return_inverse=True)
    if len(ids_I) < 2:
        return False
    members = lab_V >= 0
    cen_ID = np.zeros((len(ids_I), unit_VD.shape[1]))
    np.add.at(cen_ID, inv_V, unit_VD[members])
    cen_ID /= np.linalg.norm(cen_ID, axis=1, keepdims=True)
    sim_II = cen_ID @ cen_ID.T
    np.fill_diagonal(sim_II, -np.inf)
    nn_I = sim_II.argmax(axis=1)  # first maximum = lowest index on ties
    frames_of = [set(frames_V[members][inv_V == i].tolist()) - {-1} for i in range(len(ids_I))]
    merged = False
    for a in range(len(ids_I)):
        b = int(nn_I[a])
        if a < b and nn_I[b] == a and sim_II[a, b] > t_merge and not (frames_of[a] & frames_of[b]):
            kept, absorbed = int(ids_I[a]), int(ids_I[b])  # ids_I is sorted: a < b -> smaller id kept
            labels[rows[lab_V == absorbed]] = kept
            changes.merges.append((kept, absorbed))
            merged = True
    return merged
