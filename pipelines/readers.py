"""Ray Data reader over an ingested shard set: decoded, augmented batches with a label-table join.

    ds = read_shards("data/shards/synth_video", labels="labels/v3.parquet", views=("standard", "strong"))
    for batch in ds.iter_batches(batch_size=None):        # numpy: key, pid, camid, ..., image, image_strong
        ...
    for batch in iter_torch_batches(ds, batch_size=64):   # the numeric columns as torch tensors

One read task per shard streams its tar (the same validating reader as
:class:`~dynamix_core.data.reader.ShardReader`), so a single-camera video, contiguous inside one
shard by construction, comes out whole: every output block holds whole videos (images without a
video are cut into blocks of ``block_rows``). Iterate with ``batch_size=None`` to receive the blocks
as produced. Pseudo-labels come from a parquet label table (``key, pid, version``) joined at read
time: its rows override ``pid``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dynamix_core.data.reader import BATCH_FIELDS, Sample, ShardReader, load_image, read_dataset_manifest
from dynamix_core.data.records import InputReport
from dynamix_core.data.transforms import TransformConfig, View, ViewTransform, sample_generator

log = logging.getLogger(__name__)


class _ShardDecoder:
    """Ray Data actor: turns shard names into decoded (and transformed) sample blocks.
    An actor, so the label table is loaded once per worker, not once per shard."""

    def __init__(self, root: str, labels: str | None, views: Sequence[View] | None, transform: TransformConfig,
                 seed: int, block_rows: int, strict: bool):
        import torch

        torch.set_num_threads(1)  # one decode stream per CPU Ray gave us
        self.report = InputReport(strict=strict)
        self.reader = ShardReader(root, labels=labels, report=self.report)
        self.views = [(view, ViewTransform(transform, view)) for view in views] if views else []
        self.size = (transform.height, transform.width)
        self.seed, self.block_rows = seed, block_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for shard in batch["shard"]:
            reported = len(self.report)
            block: list[Sample] = []
            for sample in self.reader.iter_samples([str(shard)]):
                if block and _ends_block(block, sample, self.block_rows):
                    yield self._decode(block)
                    block = []
                block.append(sample)
            if block:
                yield self._decode(block)
            for problem in self.report.problems[reported:]:
                log.warning("skipped %s: %s", problem.path, problem.reason)

    def _decode(self, samples: list[Sample]) -> dict[str, np.ndarray]:
        import torch

        out = {"key": np.array([s.key for s in samples], dtype=object)}
        for name in BATCH_FIELDS:
            out[name] = np.array([getattr(s.record, name) for s in samples], dtype=np.int64)
        images = [load_image(s, self.size) for s in samples]
        if not self.views:
            out["image"] = np.stack(images)  # uint8 (B, H, W, 3)
            return out
        for view, transform in self.views:
            column = "image" if view == self.views[0][0] else f"image_{view}"
            out[column] = torch.stack([
                transform(img, sample_generator(self.seed, s.key, view)) for s, img in zip(samples, images)
            ]).numpy()  # float32 (B, 3, H, W)
        return out


def _ends_block(block: list[Sample], sample: Sample, block_rows: int) -> bool:
    last = block[-1].record
    if sample.record.video_id >= 0 or last.video_id >= 0:  # never split a video
        return (last.dataset, last.video_id) != (sample.record.dataset, sample.record.video_id)
    return len(block) >= block_rows


def read_shards(
    root: str | Path,
    *,
    labels: str | Path | None = None,
    views: Sequence[View] | None = ("standard",),
    transform: TransformConfig | None = None,
    seed: int = 0,
    workers: int = 2,
    block_rows: int = 256,
    strict: bool = False,
):
    """A ``ray.data.Dataset`` of the shard set at ``root``.

    Columns: ``key`` (str), the integer fields of :data:`BATCH_FIELDS` (``pid`` label-joined), and
    ``image`` - float32 ``(3, H, W)`` of the first view in ``views`` - plus ``image_<view>`` for
    each further view; ``views=None`` gives the decoded uint8 ``(H, W, 3)`` image instead. Views are
    seeded by ``(seed, view, key)``: pass ``seed = base + epoch`` for fresh augmentations.
    ``workers`` decoder actors run at once (one CPU each). Bad shard content is logged and
    skipped, or raises with ``strict``."""
    import ray
    from ray.data import ActorPoolStrategy

    shards = list(dict.fromkeys(read_dataset_manifest(root).column("shard").to_pylist()))
    ds = ray.data.from_items([{"shard": name} for name in shards], override_num_blocks=len(shards))
    return ds.map_batches(
        _ShardDecoder,
        fn_constructor_kwargs={
            "root": str(Path(root).resolve()), "labels": str(Path(labels).resolve()) if labels else None,
            "views": tuple(views) if views else None, "transform": transform or TransformConfig(),
            "seed": seed, "block_rows": block_rows, "strict": strict,
        },
        batch_size=1,  # one shard per call: its videos stay whole and in order
        compute=ActorPoolStrategy(size=workers),
        num_cpus=1,
    )


def iter_torch_batches(ds, batch_size: int = 64, **kwargs):
    """``ds.iter_torch_batches`` over the numeric columns only (Ray's torch conversion cannot
    take the string ``key`` column, docs/stack.md)."""
    return ds.drop_columns(["key"]).iter_torch_batches(batch_size=batch_size, **kwargs)
