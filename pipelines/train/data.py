"""Training data on one worker: the multi-camera set in memory, the single-camera stream of whole
videos, the identity space of the centroid bank, and a background thread that turns sampler plans
into augmented tensors.

Identity space (rows of the centroid bank): multi-camera identities ``0 .. M-1`` (sorted
``(dataset, source_pid)`` of every multi-camera train set), then single-camera identities
``M + label`` where ``label`` is the pid of the current label table (tracker ids at version 0 for
DynaMix, DBSCAN pseudo-labels for ReMix).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dynamix_core.data.images import decode_image
from dynamix_core.data.reader import read_dataset_manifest
from dynamix_core.data.records import IdentityMap
from dynamix_core.data.shards import read_members  # validates each tar header before reading
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator
from dynamix_core.sampling import BatchPlan, VideoSamples
from dynamix_core.training import StepBatch


@dataclass
class MultiCameraSet:
    """Every multi-camera train image in memory (encoded bytes) with global bank ids and cameras."""

    keys: list[str]
    data: list[bytes]
    pid: np.ndarray  # bank id 0..M-1
    camid: np.ndarray  # global camera id
    dataset: np.ndarray  # dataset name per image
    num_identities: int

    @classmethod
    def load(cls, roots: list[str]) -> "MultiCameraSet":
        from dynamix_core import storage

        tables = []
        for root in roots:
            t = read_dataset_manifest(root).filter(pc.equal(pc.field("split"), "train"))
            if t.num_rows == 0:
                raise FileNotFoundError(f"{root}: no train-split images in this shard set (data.multi needs a train split)")
            tables.append(t.append_column("root", pa.array([str(root)] * t.num_rows)))
        table = pa.concat_tables(tables)
        names: dict[str, str] = {}
        for root, t in zip(roots, tables):
            for ds in set(t["dataset"].to_pylist()):
                if names.setdefault(ds, root) != root:
                    raise ValueError(
                        f"data.multi: {names[ds]} and {root} both hold dataset {ds!r}; identities would be merged. "
                        "Ingest each set under its own name (dynamix ingest --dataset NAME)")
        rows = table.select(["key", "dataset", "source_pid", "source_camid", "shard", "offset", "size", "root"]).to_pylist()
        pid_map = IdentityMap((r["dataset"], r["source_pid"]) for r in rows)
        cam_map = IdentityMap((r["dataset"], r["source_camid"]) for r in rows)
        data: list[bytes] = []
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(rows):  # a root may be a URI (s3://...): its shards are read by ranged GETs
            by_shard.setdefault(storage.join(r["root"], r["shard"]), []).append(i)
        data = [b""] * len(rows)
        for tar, idx in by_shard.items():
            for i, blob in zip(idx, read_members(tar, [rows[i]["offset"] for i in idx], [rows[i]["size"] for i in idx])):
                data[i] = blob
        return cls(
            keys=[r["key"] for r in rows], data=data,
            pid=np.array([pid_map[(r["dataset"], r["source_pid"])] for r in rows], dtype=np.int64),
            camid=np.array([cam_map[(r["dataset"], r["source_camid"])] for r in rows], dtype=np.int64),
            dataset=np.array([r["dataset"] for r in rows]),
            num_identities=len(pid_map),
        )


def single_camera_index(roots: list[str]) -> pa.Table:
    """One row per single-camera image of every set in ``roots``: key, global ``video`` (sorted
    ``(dataset, video_id)``), initial ``label`` (sorted ``(dataset, source_pid)``; -1 unlabeled),
    frame, and where its bytes are (``tar``: an absolute path, or a URI for a shard set on an object
    store; ``offset``, ``size``). Rows are grouped by video."""
    from dynamix_core import storage

    tables = []
    for root in roots:
        t = read_dataset_manifest(root)
        t = t.filter(pc.equal(pc.field("domain"), "single"))
        if t.num_rows == 0:
            raise FileNotFoundError(f"{root}: no single-camera images (domain=single) in this shard set")
        base = root.rstrip("/") if storage.is_remote(root) else str(Path(root).resolve())
        tar = pc.binary_join_element_wise(pa.array([base] * t.num_rows), t["shard"], "/")
        tables.append(t.append_column("tar", tar))
    t = pa.concat_tables(tables)
    cols = t.select(["key", "dataset", "video_id", "source_pid", "frame", "tar", "offset", "size"]).to_pydict()
    video_map = IdentityMap(zip(cols["dataset"], map(str, cols["video_id"])))
    labeled = [(d, p) for d, p in zip(cols["dataset"], cols["source_pid"]) if p]
    label_map = IdentityMap(labeled)
    video = np.array([video_map[(d, str(v))] for d, v in zip(cols["dataset"], cols["video_id"])], dtype=np.int64)
    label = np.array([label_map.get((d, p)) if p else -1 for d, p in zip(cols["dataset"], cols["source_pid"])],
                     dtype=np.int64)
    out = pa.table({"key": cols["key"], "video": video, "label": label, "frame": cols["frame"],
                    "tar": cols["tar"], "offset": cols["offset"], "size": cols["size"]})
    return out.take(pc.sort_indices(out, [("video", "ascending"), ("frame", "ascending"), ("key", "ascending")]))


def video_rows(index: pa.Table, row_ids: np.ndarray | None = None) -> list[dict]:
    """Group the index into one row per video (the unit the stream hands out); ``rows`` are each
    image's row numbers in the run's index (the address of its label), default ``0..n-1``."""
    video = index["video"].to_numpy()
    row_ids = np.arange(len(video), dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    bounds = np.flatnonzero(np.diff(video)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(video)]
    cols = index.select(["key", "frame", "offset", "size", "tar"]).to_pydict()
    rows = []
    for s, e in zip(starts, ends):
        rows.append({"video": int(video[s]), "keys": cols["key"][s:e], "frames": cols["frame"][s:e],
                     "offsets": cols["offset"][s:e], "sizes": cols["size"][s:e], "tars": cols["tar"][s:e],
                     "rows": row_ids[s:e]})
    return rows


def load_video_images(row: dict) -> list[bytes]:
    """The encoded images of one video row, in the row's order (read by offset from its shard)."""
    tars = row["tars"]
    if len(set(tars)) == 1:
        return read_members(tars[0], row["offsets"], row["sizes"])
    # a video spanning shard sets cannot happen (ingest keeps videos whole); stay correct anyway
    return [read_members(t, [o], [s])[0] for t, o, s in zip(tars, row["offsets"], row["sizes"])]


def rank_video_rows(index_path: str | Path, rank: int, world_size: int) -> list[dict]:
    """This rank's videos (``video % world_size == rank``) of the run's single-camera index (a file,
    or an object of a run on an object store)."""
    from dynamix_core import storage

    index = storage.read_table(index_path, columns=["key", "video", "label", "frame", "tar", "offset", "size"])
    mask = index["video"].to_numpy() % world_size == rank
    mine = index.filter(pa.array(mask))
    return video_rows(mine, np.flatnonzero(mask)) if mine.num_rows else []


class VideoFeed:
    """This rank's single-camera stream (the sampler's ``VideoStream``), seekable.

    Position ``p`` is the video ``rows[p % n]`` of pass ``p // n``: opening the stream at a
    checkpoint's position reads nothing that came before it. Labels come from ``labels`` (int32,
    the single identity of every row of the run's index, -1 = none; None = no labels at all) when a
    video enters the stream. Images are read from the shards
    when a batch first needs them and kept in an LRU cache of ``cache_videos`` videos; a video that
    left the cache (or was restored from a checkpoint into the sampler's buffer) is simply read
    again, so no eviction can lose a buffered video."""

    #: videos handed out in a row without a batch being planned, in passes over this rank's videos,
    #: before the feed gives up: labels cannot change meanwhile (they are applied between steps,
    #: and the step is waiting for this batch)
    max_idle_passes = 3

    def __init__(self, rows: list[dict], labels: np.ndarray | None, bank_offset: int, cache_videos: int = 256,
                 read: Callable[[dict], list[bytes]] = load_video_images):
        self.rows = rows
        self.row_of = {int(r["video"]): r for r in rows}
        self.labels = labels
        self.bank_offset = bank_offset
        self.cache_videos = cache_videos
        self.read = read
        self.images: OrderedDict[int, dict[str, bytes]] = OrderedDict()
        self.lock = threading.Lock()
        self.videos_read = 0  # videos read from storage so far (a resume must not re-read the past)
        self.progress = 0  # batches planned so far (see max_idle_passes)

    def note_progress(self) -> None:
        """Called when a batch was planned: the stream is not stuck."""
        self.progress += 1

    def __call__(self, position: int) -> Iterator[VideoSamples]:
        num_rows = len(self.rows)
        idle, seen_progress = 0, self.progress
        for pos in itertools.count(position):
            if num_rows == 0:
                return
            if self.progress != seen_progress:
                idle, seen_progress = 0, self.progress
            elif idle >= self.max_idle_passes * num_rows:
                labeled = sum(bool((self._labels_of(r) >= 0).any()) for r in self.rows)
                raise RuntimeError(
                    f"single-camera stream: {self.max_idle_passes} full passes over this rank's {num_rows} videos "
                    f"({labeled} of them labelled) did not fill a batch; the sampler needs more labelled videos "
                    "per rank than exist: lower sampler.num_videos / sampler.ids_per_video, or use fewer workers")
            idle += 1
            row = self.rows[pos % num_rows]
            labels = self._labels_of(row)
            pids = np.where(labels >= 0, labels + self.bank_offset, -1)
            yield VideoSamples(video_id=int(row["video"]), refs=np.array(row["keys"]), pids=pids)

    def _labels_of(self, row: dict) -> np.ndarray:
        """Labels of one video's images (all -1 without labels: pre-training)."""
        if self.labels is None:
            return np.full(len(row["rows"]), -1, dtype=np.int64)
        return self.labels[row["rows"]].astype(np.int64)

    def video_rows(self, video: int) -> np.ndarray | None:
        """Index rows (label addresses) of one of this rank's videos in stream order (None for a
        video of another rank)."""
        row = self.row_of.get(int(video))
        return None if row is None else row["rows"]

    def image(self, video: int, key: str) -> bytes:
        """Encoded bytes of image ``key`` of ``video`` (read with its whole video on a cache miss)."""
        with self.lock:
            images = self.images.get(video)
            if images is None:
                row = self.row_of[video]
                images = dict(zip(row["keys"], self.read(row)))
                self.videos_read += 1
                self.images[video] = images
                while len(self.images) > self.cache_videos:
                    self.images.popitem(last=False)
            else:
                self.images.move_to_end(video)
            return images[key]


class BatchProducer:
    """A background thread that asks the sampler for the next plan and decodes + augments it, so
    the training step does not wait for JPEG decoding; ``get()`` reports the time it blocked."""

    def __init__(self, sampler, multi: MultiCameraSet, feed: VideoFeed | None, transform: TransformConfig,
                 seed: int, prefetch: int = 2, threads: int = 2, snapshot_at: Callable[[int], bool] = lambda s: False):
        self.sampler = sampler  # a MixedBatchSampler (or anything with next_batch/state_dict/step)
        self.snapshot_at = snapshot_at
        self.snapshots: dict[int, dict] = {}
        self.multi = multi
        self.multi_index = {k: i for i, k in enumerate(multi.keys)}
        self.feed = feed
        self.standard = ViewTransform(transform, "standard")
        self.strong = ViewTransform(transform, "strong")
        self.size = (transform.height, transform.width)
        self.seed = seed
        self.lock = threading.Lock()  # guards the sampler (label updates arrive from the main thread)
        self.pool = ThreadPoolExecutor(threads)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-producer", daemon=True)
        self.thread.start()

    def _decode_one(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        data, key, step_seed = item
        img = decode_image(data, self.size)
        return (self.standard(img, sample_generator(step_seed, key, "standard")),
                self.strong(img, sample_generator(step_seed, key, "strong")))

    def _materialise(self, plan: BatchPlan, step: int) -> StepBatch:
        """Decode + augment; views are seeded by (seed, step, key), so a resumed run sees the same."""
        items, camid = [], []
        step_seed = self.seed + 7919 * step
        for ref in plan.multi_refs:
            i = self.multi_index[ref]
            items.append((self.multi.data[i], ref, step_seed))
            camid.append(int(self.multi.camid[i]))
        for ref, vid in zip(plan.single_refs, plan.single_video_ids):
            items.append((self.feed.image(int(vid), ref), ref, step_seed))
            camid.append(-1 - int(vid))  # single-camera images: one camera per video, never a multi camera
        views = list(self.pool.map(self._decode_one, items))
        num_multi = len(plan.multi_refs)
        video = np.concatenate([np.full(num_multi, -1), np.asarray(plan.single_video_ids, dtype=np.int64)])
        return StepBatch(
            standard_BCHW=torch.stack([v[0] for v in views]),
            strong_BCHW=torch.stack([v[1] for v in views]),
            pid_B=torch.as_tensor(np.concatenate([plan.multi_pids, plan.single_pids]).astype(np.int64)),
            camid_B=torch.as_tensor(camid, dtype=torch.int64),
            is_single_B=torch.as_tensor(video >= 0),
            video_B=torch.as_tensor(video),
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    if self.snapshot_at(self.sampler.step):
                        # prefetching runs ahead of training: keep the sampler state as it was before
                        # planning this step, so a checkpoint at this step resumes exactly here
                        self.snapshots[self.sampler.step] = self.sampler.state_dict()
                    plan = self.sampler.next_batch()
                if self.feed is not None:
                    self.feed.note_progress()
                batch = self._materialise(plan, plan.step)
                while not self._stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the training loop by get()
            self.error = exc
            self.queue.put(None)

    def state_at(self, step: int) -> dict:
        """Sampler state from just before ``step``'s batch was planned (a checkpoint step)."""
        state = self.snapshots.pop(step)
        for old in [s for s in self.snapshots if s < step]:
            del self.snapshots[old]
        return state

    def get(self) -> tuple[StepBatch, float]:
        t0 = time.perf_counter()
        batch = self.queue.get()
        if batch is None:
            raise RuntimeError(f"batch producer failed: {self.error!r}") from self.error
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
