"""In-process reader over an ingested shard set (no Ray): samples and whole videos.

    reader = ShardReader("data/shards/synth_video")
    for video in reader.iter_videos():          # single-camera sets: one list per video, in frame order
        ...

The shard set is what ``dynamix ingest`` wrote: ``manifest.parquet`` (one row per image, with its
``shard``, e.g. ``train/shard-000000.tar``, relative to the set) and the tars, read sequentially,
from a folder or an object-store URI (``s3://bucket/prefix``, see :mod:`dynamix_core.storage`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from dynamix_core import storage
from dynamix_core.data.records import BadInputError, InputReport, Record
from dynamix_core.data.shards import DATASET_SCHEMA, MANIFEST_NAME, iter_tar_samples, no_manifest_error


@dataclass(slots=True)
class Sample:
    """One image read from a shard: its record and encoded bytes."""

    record: Record
    data: bytes
    ext: str

    @property
    def key(self) -> str:
        return self.record.key


def read_dataset_manifest(root: str | Path) -> pa.Table:
    """``root/manifest.parquet`` (``root`` a folder or a URI), or a :class:`FileNotFoundError`
    (:func:`no_manifest_error`; a :class:`~dynamix_core.storage.StorageError` when the bucket is missing)."""
    path = storage.join(root, MANIFEST_NAME)
    if not storage.exists(path):
        raise no_manifest_error(root)
    return storage.read_table(path, schema=DATASET_SCHEMA)


def check_dataset_manifest(root: str | Path) -> int:
    """The number of images of the finished ingest at ``root``, from its manifest's footer alone (a
    few kilobytes whatever the set's size): a :class:`FileNotFoundError` when there is no manifest, a
    :class:`BadInputError` naming the file when it is not a readable manifest of this project."""
    import pyarrow.lib

    path = storage.join(root, MANIFEST_NAME)
    if not storage.exists(path):
        raise no_manifest_error(root)
    try:
        meta = storage.read_parquet_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pyarrow.lib.ArrowException) as exc:
        raise BadInputError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]}): re-run "
                         f"`dynamix ingest --out {root}`") from None
    missing = [name for name in DATASET_SCHEMA.names if name not in schema.names]
    if missing:
        raise BadInputError(f"{path} lacks the columns {missing} of a shard set's manifest: re-run "
                         f"`dynamix ingest --out {root}`")
    return meta.num_rows


class ShardReader:
    """Reads a shard set in manifest order. Bad shard content (see
    :func:`~dynamix_core.data.shards.iter_tar_samples`) goes to ``report``: skipped and reported, or
    raised in strict mode."""

    def __init__(self, root: str | Path, *, report: InputReport | None = None):
        self.root = root if storage.is_remote(root) else Path(root)
        self.manifest = read_dataset_manifest(self.root)
        shard_col = self.manifest.column("shard").to_pylist()
        self.shards: list[str] = list(dict.fromkeys(shard_col))  # manifest (= write) order
        self._shard_sizes = Counter(shard_col)
        self.report = report if report is not None else InputReport()

    def __len__(self) -> int:
        return self.manifest.num_rows

    def iter_samples(self, shards: Iterable[str] | None = None) -> Iterator[Sample]:
        """Every valid sample of ``shards`` (default: all), in tar order."""
        for name in self.shards if shards is None else shards:
            tar_path = storage.join(self.root, name) if storage.is_remote(self.root) else self.root / name
            before, count = len(self.report), 0
            for record, data, ext in iter_tar_samples(tar_path, self.report):
                count += 1
                yield Sample(record, data, ext)
            # a tar cut exactly at a member boundary reads as a valid, shorter archive
            if count != self._shard_sizes[name] and len(self.report) == before:
                self.report.reject(
                    tar_path, f"truncated tar: {count} valid samples, the manifest lists {self._shard_sizes[name]}"
                )

    def iter_videos(self, shards: Iterable[str] | None = None) -> Iterator[list[Sample]]:
        """Whole videos of a single-camera set: ingest keeps each video contiguous inside one shard,
        so consecutive samples with the same ``(dataset, video_id)`` are the whole video."""
        video: list[Sample] = []
        for sample in self.iter_samples(shards):
            if sample.record.video_id < 0:
                raise BadInputError(
                    f"{self.root}: sample {sample.key} has no video (video_id -1); "
                    "iter_videos reads single-camera sets only, use iter_samples"
                )
            if video and _video_of(video[-1]) != _video_of(sample):
                yield video
                video = []
            video.append(sample)
        if video:
            yield video


def _video_of(sample: Sample) -> tuple[str, int]:
    return sample.record.dataset, sample.record.video_id
