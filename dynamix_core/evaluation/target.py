"""Target-domain evaluation with the momentum encoder (SPEC 3): query/gallery of an ingested shard
set, features by f~ (L2-normalised), exact chunked ranking (:mod:`dynamix_core.evaluation.features`).
Ray-free: the training and pre-training workers, ``dynamix evaluate``, the demo and retraining use it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from dynamix_core.data.images import decode_image
from dynamix_core.data.reader import read_dataset_manifest
from dynamix_core.data.records import IdentityMap
from dynamix_core.data.shards import read_members
from dynamix_core.data.transforms import TransformConfig, ViewTransform
from dynamix_core.evaluation.features import EvalConfig, evaluate


@dataclass
class TargetSet:
    """Query and gallery images (encoded) with global pids and cameras of one shard set."""

    q_data: list[bytes]
    g_data: list[bytes]
    q_pid: np.ndarray
    g_pid: np.ndarray
    q_cam: np.ndarray
    g_cam: np.ndarray
    transform: TransformConfig
    name: str

    @classmethod
    def load(cls, root: str, transform: TransformConfig) -> "TargetSet":
        table = read_dataset_manifest(root)
        table = table.filter(pc.is_in(pc.field("split"), __import__("pyarrow").array(["query", "gallery"])))
        if table.num_rows == 0:
            raise FileNotFoundError(f"{root}: no query/gallery images (data.target needs both splits)")
        rows = table.select(["key", "dataset", "split", "source_pid", "source_camid", "shard", "offset",
                             "size"]).to_pylist()
        labeled = [bool(r["source_pid"]) for r in rows]  # "" (or None) = unlabeled
        pid_map = IdentityMap((r["dataset"], r["source_pid"]) for r, known in zip(rows, labeled) if known)
        cam_map = IdentityMap((r["dataset"], r["source_camid"]) for r in rows)
        from dynamix_core import storage

        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(rows):  # one read per shard (ranged GETs on an object store), not per image
            by_shard.setdefault(r["shard"], []).append(i)
        data: list[bytes] = [b""] * len(rows)
        for shard, idx in by_shard.items():
            blobs = read_members(storage.join(root, shard), [rows[i]["offset"] for i in idx],
                                 [rows[i]["size"] for i in idx], [rows[i]["key"] for i in idx])
            for i, blob in zip(idx, blobs):
                data[i] = blob
        split = np.array([r["split"] for r in rows])
        pid = np.array([pid_map[(r["dataset"], r["source_pid"])] if known else -1
                        for r, known in zip(rows, labeled)], dtype=np.int64)
        # An unlabeled image matches no one: each gets an id of its own, so an unlabeled query has no
        # positive (skipped and counted, SPEC 3) and an unlabeled gallery image is only a negative.
        unlabeled = pid == -1
        pid[unlabeled] = len(pid_map) + np.arange(int(unlabeled.sum()))
        cam = np.array([cam_map[(r["dataset"], r["source_camid"])] for r in rows], dtype=np.int64)
        q, g = split == "query", split == "gallery"
        if not q.any() or not g.any():
            raise FileNotFoundError(f"{root}: needs both a query and a gallery split (found {sorted(set(split))})")
        return cls([d for d, m in zip(data, q) if m], [d for d, m in zip(data, g) if m],
                   pid[q], pid[g], cam[q], cam[g], transform, str(root))

    def images(self, which: str) -> list[bytes]:
        return self.q_data if which == "query" else self.g_data


@torch.no_grad()
def embed_images(encoder, data: list[bytes], transform: TransformConfig, device, batch_size: int = 128) -> torch.Tensor:
    view = ViewTransform(transform, "test")
    size = (transform.height, transform.width)
    out = []
    for start in range(0, len(data), batch_size):
        imgs = torch.stack([view(decode_image(b, size)) for b in data[start:start + batch_size]]).to(device)
        out.append(torch.nn.functional.normalize(encoder(imgs).float(), dim=1).cpu())
    return torch.cat(out)


def evaluate_target(encoder, target: TargetSet, cfg: EvalConfig, device, return_features: bool = False):
    q = embed_images(encoder, target.q_data, target.transform, device)
    g = embed_images(encoder, target.g_data, target.transform, device)
    res = evaluate(cfg, q, g, target.q_pid, target.g_pid, target.q_cam, target.g_cam)
    metrics = {"mAP": float(res["mAP"]), "mINP": float(res["mINP"]), "rank1": float(res["cmc"][0]),
               "rank5": float(res["cmc"][min(4, len(res["cmc"]) - 1)]),
               "rank10": float(res["cmc"][min(9, len(res["cmc"]) - 1)]),
               "valid_queries": float(res["num_valid_queries"])}
    return (metrics, q, g) if return_features else metrics


def colour_baseline(target: TargetSet, size: tuple[int, int] | None = None) -> dict:
    """The colour histogram's retrieval metrics on ``target`` (the bar a learned model must clear;
    :mod:`dynamix_core.evaluation.baselines`), images decoded at ``size`` (H, W; None: as stored)."""
    from dynamix_core.evaluation.baselines import colour_histogram
    from dynamix_core.evaluation.features import evaluate_features

    q, g = ([decode_image(b, size) for b in data] for data in (target.q_data, target.g_data))
    return evaluate_features(colour_histogram(q), colour_histogram(g), target.q_pid, target.g_pid,
                             target.q_cam, target.g_cam)
