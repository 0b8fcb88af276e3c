"""The run's single-camera index, built in bounded memory.

One row per single-camera image of every shard set in ``data.single``: ``key``, global ``video``
(the rank of ``(dataset, str(video_id))`` among the sorted pairs), initial ``label`` (rank of
``(dataset, source_pid)``; -1 unlabeled), ``frame``, where its bytes are (``tar``: an absolute path or
a URI, ``offset``, ``size``) and, with ground truth configured, ``truth``. Rows come shard by shard in
manifest order, sorted by ``(video, frame, key)`` inside a shard; ingest keeps a video in one shard,
so each video's rows are contiguous. A row's number is the address of its label (see
:mod:`dynamix_core.labeling.label_table`).

Beside it, ``index.videos.parquet`` has one row per video (``video, row_start, count, tar``): all a
trainer needs to stream its videos (:class:`dynamix_core.data.train_sets.RankVideos`).

The builder reads each manifest twice in record batches (the distinct videos and identities, then
the rows) and writes the index one shard at a time; what it holds grows with the number of
videos and identities, not of images. Ground truth (``labeling.ground_truth``, a monitor for
synthetic data) is the exception: its key column is held as one Arrow array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamix_core import storage
from dynamix_core.data.run_index import videos_path
from dynamix_core.data.shards import MANIFEST_NAME, no_manifest_error

#: rows per parquet row group of the index: a trainer reading one video reads about this many rows
INDEX_ROW_GROUP = 4096
_BATCH_ROWS = 65536
_MANIFEST_COLUMNS = ["key", "dataset", "domain", "video_id", "source_pid", "frame", "offset", "size", "shard"]
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("video", pa.int64()), ("label", pa.int64()), ("frame", pa.int64()),
                          ("tar", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
VIDEOS_SCHEMA = pa.schema([("video", pa.int64()), ("row_start", pa.int64()), ("count", pa.int64()),
                           ("tar", pa.string())])


@dataclass
class IndexInfo:
    """What the driver keeps of the index it wrote: per-video, not per-image."""

    num_rows: int
    videos: np.ndarray  # int64 video id of every video, in index order
    num_labels: int  # initial identities (max label + 1)

    def videos_per_rank(self, world_size: int) -> np.ndarray:
        """How many videos each rank streams (``video % world_size == rank``)."""
        return np.bincount(self.videos % world_size, minlength=world_size)


def _manifest_batches(root: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    path = storage.join(root, MANIFEST_NAME)
    if not storage.exists(path):
        raise no_manifest_error(root)
    with storage.open_random(path) as fh:
        pf = pq.ParquetFile(fh)
        missing = sorted(set(columns) - set(pf.schema_arrow.names))
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; re-ingest this shard set with this version")
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            mask = pc.equal(batch.column(columns.index("domain")), "single")
            yield batch.filter(mask)


class _Maps:
    """``(dataset, video_id)`` and labelled ``(dataset, source_pid)`` -> global ids, vectorised per
    dataset (the ids of one dataset are contiguous: pairs sort by dataset first)."""

    def __init__(self, videos: set[tuple[str, int]], labels: set[tuple[str, str]]):
        self.video: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for gid, (ds, vid) in enumerate(sorted(videos, key=lambda p: (p[0], str(p[1])))):
            self.video.setdefault(ds, ([], []))
            self.video[ds][0].append(vid), self.video[ds][1].append(gid)
        for ds, (vids, gids) in list(self.video.items()):
            order = np.argsort(np.asarray(vids, dtype=np.int64), kind="stable")
            self.video[ds] = (np.asarray(vids, dtype=np.int64)[order], np.asarray(gids, dtype=np.int64)[order])
        self.label: dict[str, tuple[np.ndarray, int]] = {}  # sorted names (searched, never rehashed)
        first = 0
        for ds in sorted({d for d, _ in labels}):
            names = np.array(sorted(p for d, p in labels if d == ds), dtype=object)
            self.label[ds] = (names, first)
            first += len(names)
        self.num_labels = first
        self.num_videos = len(videos)

    def apply(self, dataset: pa.Array, video_id: pa.Array, source_pid: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        ds_np = np.asarray(dataset.to_numpy(zero_copy_only=False))
        vid_np = video_id.to_numpy(zero_copy_only=False).astype(np.int64)
        video = np.full(len(ds_np), -1, dtype=np.int64)
        label = np.full(len(ds_np), -1, dtype=np.int64)
        for ds in np.unique(ds_np):
            mask = ds_np == ds
            vids, gids = self.video[ds]
            video[mask] = gids[np.searchsorted(vids, vid_np[mask])]
            if ds in self.label:
                names, first = self.label[ds]
                pids = np.array(source_pid.filter(pa.array(mask)).fill_null("").to_pylist(), dtype=object)
                pos = np.minimum(np.searchsorted(names, pids), len(names) - 1)
                label[mask] = np.where(names[pos] == pids, pos + first, -1)
        return video, label


class _Truth:
    """Ground-truth identities of SynthReID video sets (``key, true_pid`` files), looked up by key."""

    def __init__(self, paths: list[str], shard_datasets: set[str]):
        from dynamix_core.data.records import make_key

        keys, pids, offset = [], [], 0
        for path in paths:
            t = storage.read_table(path, columns=["key", "true_pid"])
            raw = t["key"].to_pylist()
            # shard keys are make_key(dataset, "train", source key) (the LUPerson-NL parser's rule)
            for ds in sorted(shard_datasets):
                keys.append(pa.array([make_key(ds, "train", k) for k in raw], pa.string()))
                pids.append(pc.add(t["true_pid"].combine_chunks(), offset))
            offset += int(pc.max(t["true_pid"]).as_py() if t.num_rows else -1) + 1
        self.paths = paths
        self.keys = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        self.pids = pa.concat_arrays(pids) if pids else pa.array([], pa.int64())

    def apply(self, keys: pa.Array) -> np.ndarray:
        pos = pc.index_in(keys, value_set=self.keys)
        if pos.null_count:
            missing = keys.filter(pc.is_null(pos)).to_pylist()
            raise FileNotFoundError(f"labeling.ground_truth {self.paths}: no ground truth for {len(missing)} keys "
                                    f"of a shard, e.g. {missing[:3]}")
        return self.pids.take(pos).to_numpy(zero_copy_only=False).astype(np.int64)


def _base(root: str) -> str:
    return root.rstrip("/") if storage.is_remote(root) else str(Path(root).resolve())


def _shard_tables(roots: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """Each shard's single-camera manifest rows, one shard at a time (a manifest lists its shards
    in order; a shard seen again later means the manifest is not an ingest's)."""
    for root in roots:
        pending: list[pa.Table] = []
        done: set[str] = set()
        found = False
        for batch in _manifest_batches(root, _MANIFEST_COLUMNS):
            if batch.num_rows == 0:
                continue
            found = True
            table = pa.Table.from_batches([batch])
            shard = table["shard"].to_numpy(zero_copy_only=False)
            cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
            for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(shard)]):
                name = shard[start]
                if pending and pending[0]["shard"][0].as_py() != name:
                    yield from _finish(root, pending, done)
                    pending = []
                pending.append(table.slice(start, end - start))
        if pending:
            yield from _finish(root, pending, done)
        if not found:
            raise FileNotFoundError(f"{root}: no single-camera images (domain=single) in this shard set")


def _finish(root: str, pending: list[pa.Table], done: set[str]) -> Iterator[tuple[str, pa.Table]]:
    name = pending[0]["shard"][0].as_py()
    if name in done:
        raise ValueError(f"{storage.join(root, MANIFEST_NAME)}: the rows of {name} are not contiguous; "
                         "this manifest was not written by `dynamix ingest` (re-ingest the shard set)")
    done.add(name)
    yield storage.join(_base(root), name), pa.concat_tables(pending)


def _distinct(roots: list[str]) -> tuple[set[tuple[str, int]], set[tuple[str, str]], set[str]]:
    videos: set[tuple[str, int]] = set()
    labels: set[tuple[str, str]] = set()
    datasets: set[str] = set()
    for root in roots:
        for batch in _manifest_batches(root, ["dataset", "domain", "video_id", "source_pid"]):
            if batch.num_rows == 0:
                continue
            t = pa.Table.from_batches([batch])
            pairs = t.group_by(["dataset", "video_id"]).aggregate([]).to_pydict()
            videos.update(zip(pairs["dataset"], pairs["video_id"]))
            named = t.filter(pc.and_(pc.is_valid(t["source_pid"]), pc.not_equal(t["source_pid"], "")))
            pairs = named.group_by(["dataset", "source_pid"]).aggregate([]).to_pydict()
            labels.update(zip(pairs["dataset"], pairs["source_pid"]))
            datasets.update(pc.unique(t["dataset"]).to_pylist())
    return videos, labels, datasets


def iter_index(roots: list[str], truth_paths: list[str] | None = None) -> Iterator[pa.Table]:
    """The index, one shard's rows per table (see the module docstring)."""
    if not roots:
        raise ValueError("data.single: no shard sets")
    videos, labels, datasets = _distinct(roots)
    maps = _Maps(videos, labels)
    truth = None
    if truth_paths:
        truth = _Truth(list(truth_paths), {k.split("_train_", 1)[0] for k in _sample_keys(roots)})
    seen: set[int] = set()
    for tar, t in _shard_tables(roots):
        video, label = maps.apply(t["dataset"].combine_chunks(), t["video_id"].combine_chunks(),
                                  t["source_pid"].combine_chunks())
        out = pa.table({"key": t["key"], "video": video, "label": label, "frame": t["frame"],
                        "tar": pa.array([tar] * t.num_rows, pa.string()), "offset": t["offset"], "size": t["size"]},
                       schema=INDEX_SCHEMA)
        out = out.take(pc.sort_indices(out, [("video", "ascending"), ("frame", "ascending"), ("key", "ascending")]))
        here = set(np.unique(out["video"].to_numpy()).tolist())
        split = here & seen
        if split:
            raise ValueError(f"{tar}: video {min(split)} also has images in an earlier shard; a video must lie in "
                             "one shard (re-ingest with `dynamix ingest`, which keeps videos whole)")
        seen |= here
        if truth is not None:
            out = out.append_column("truth", pa.array(truth.apply(out["key"].combine_chunks())))
        yield out


def _sample_keys(roots: list[str], n: int = 1000) -> list[str]:
    for batch in _manifest_batches(roots[0], ["key", "domain"]):
        if batch.num_rows:
            return batch.column(0).to_pylist()[:n]
    return []


def _publish(local: str, uri: str | Path) -> None:
    """Move the finished local file to ``uri`` in one step (rename, or one upload)."""
    import os

    if storage.is_remote(uri):
        storage.upload_file(local, uri)
        os.unlink(local)
    else:
        os.replace(local, storage.local_path(uri))


def write_single_camera_index(roots: list[str], index_path: str | Path,
                              truth_paths: list[str] | None = None) -> IndexInfo:
    """Write the run's index and its per-video table, streaming one shard at a time into temporary
    files that are then renamed (or uploaded) whole: a killed driver leaves neither half-written.
    Returns the per-video summary."""
    import os
    import tempfile

    if storage.is_remote(index_path):
        tmp_dir = tempfile.mkdtemp(prefix="dynamix-index-")
    else:
        tmp_dir = os.path.dirname(os.path.abspath(storage.local_path(index_path)))
        os.makedirs(tmp_dir, exist_ok=True)
    tmp_index = os.path.join(tmp_dir, f".index.parquet.tmp-{os.getpid()}")
    tmp_videos = os.path.join(tmp_dir, f".index.videos.parquet.tmp-{os.getpid()}")
    writer = videos_writer = None
    num_rows, num_labels, video_ids = 0, 0, []
    try:
        for table in iter_index(roots, truth_paths):
            if writer is None:
                writer = pq.ParquetWriter(tmp_index, table.schema)
                videos_writer = pq.ParquetWriter(tmp_videos, VIDEOS_SCHEMA)
            writer.write_table(table, row_group_size=INDEX_ROW_GROUP)
            video = table["video"].to_numpy()
            cuts = np.r_[0, np.flatnonzero(np.diff(video)) + 1]
            counts = np.diff(np.r_[cuts, len(video)])
            videos_writer.write_table(pa.table({"video": video[cuts], "row_start": cuts + num_rows, "count": counts,
                                                "tar": table["tar"].take(pa.array(cuts))}, schema=VIDEOS_SCHEMA))
            video_ids.append(video[cuts])
            num_rows += table.num_rows
            num_labels = max(num_labels, int(pc.max(table["label"]).as_py()) + 1)
        writer.close(), videos_writer.close()
        writer = videos_writer = None
        # the videos table first: a reader finding index.parquet finds its videos table too
        _publish(tmp_videos, videos_path(index_path))
        _publish(tmp_index, index_path)
    finally:
        for w in (writer, videos_writer):
            if w is not None:
                w.close()
        for leftover in (tmp_index, tmp_videos):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if storage.is_remote(index_path):
            os.rmdir(tmp_dir)
    return IndexInfo(num_rows=num_rows, videos=np.concatenate(video_ids), num_labels=num_labels)
