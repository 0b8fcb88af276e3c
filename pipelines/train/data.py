"""Training data of a Ray Train worker beyond the shared sets (:mod:`dynamix_core.data.train_sets`):
the single-camera stream read ahead by Ray Data tasks, and a background thread that turns sampler
plans into augmented tensors (identities as bank ids, see :mod:`dynamix_core.data.train_sets`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from dynamix_core.data.images import decode_image
from dynamix_core.engine import Prefetcher
from dynamix_core.data.train_sets import MultiCameraSet, RankVideos, VideoFeed
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator
from dynamix_core.sampling import BatchPlan
from dynamix_core.training import StepBatch
from pipelines.train.stream import read_video_batch


#: what a training worker does with an image that does not decode (``data.bad_images``)
BAD_IMAGE_POLICIES = ("stop", "skip")


def ray_video_stream(videos: RankVideos, position: int, window: int = 64, concurrency: int = 2,
                     videos_per_task: int = 8) -> Iterator[tuple[int, list[str], list[bytes]]]:
    """``(position, keys, images)`` from ``position`` on, read by Ray Data tasks ahead of the consumer.

    Positions go out in windows of ``window`` videos, each one Ray Data dataset (``from_items`` of
    per-video items carrying only the row range and shard, then ``map_batches`` read tasks); while
    one window is consumed the next one is already running, so the trainer holds and the tasks
    read at most two windows ahead, whatever the consumer's pace (a bound in videos, not bytes:
    a read-ahead of thousands of videos would take the CPUs the training needs). Rows are handed
    out in position order whatever order the tasks finish in (Ray Data's own ``preserve_order``
    made the stream 2.7x slower on this 2-core box). The tasks ask for no CPU (the trainers hold
    the cluster's CPUs; reading is I/O), and at most ``concurrency`` run at once per window."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    n = len(videos)

    def start(first: int):
        """Start the window from position ``first``: its iterator and first row (the execution
        runs on in Ray Data's own thread once the first row is asked for)."""
        pos = np.arange(first, first + window, dtype=np.int64)
        i = pos % n
        ds = ray.data.from_items([{"pos": int(p), "video": int(videos.video[k]), "row_start": int(videos.row_start[k]),
                                   "count": int(videos.count[k]), "tar": videos.tar[k]} for p, k in zip(pos, i)],
                                 override_num_blocks=max(1, window // videos_per_task))
        ds = ds.map_batches(read_video_batch, fn_kwargs={"index_path": videos.index_path}, batch_size=videos_per_task,
                            batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=concurrency))
        rows = iter(ds.iter_rows())
        return rows, next(rows, None)

    helper = ThreadPoolExecutor(1, thread_name_prefix="video-stream")
    rows = None
    upcoming = None
    try:
        first = position
        upcoming = helper.submit(start, first)
        while True:
            rows, row = upcoming.result()
            upcoming = helper.submit(start, first + window)  # the next window reads while this one is used
            pending: dict[int, bytes] = {}
            expect = first
            while row is not None:
                pending[int(row["pos"])] = row["data"]
                while expect in pending:
                    keys, images = pickle.loads(pending.pop(expect))
                    yield expect, keys, images
                    expect += 1
                row = next(rows, None)
            if expect != first + window:
                raise RuntimeError(f"single-camera stream: Ray Data returned {expect - first} of {window} videos")
            first += window
    finally:
        # stop both windows' executions now (left to the garbage collector, an execution waiting
        # for its consumer can keep the process from exiting, and one still running when Ray shuts
        # down makes Ray's core worker abort). The next window may be starting in the helper thread
        # right now: wait for it (its first row: seconds at most), then close it too.
        helper.shutdown(wait=True, cancel_futures=True)
        windows = [rows]
        if upcoming is not None and upcoming.done() and not upcoming.cancelled() and upcoming.exception() is None:
            windows.append(upcoming.result()[0])
        for it in windows:
            if hasattr(it, "close"):
                it.close()


class BadImageError(ValueError):
    """An image of a shard that does not decode; the message names the shard and the key."""


class BatchProducer(Prefetcher):
    """The mixing recipes' prefetcher (:class:`~dynamix_core.engine.Prefetcher`): a sampler plan ->
    standard and strong views of every image, identities as bank ids, cameras, videos.

    An image that does not decode stops the run with a :class:`BadImageError` naming its shard and
    key (``bad_images="stop"``), or is left out of its batch, printed in one line and counted in
    ``bad_images_skipped`` (``"skip"``)."""

    def __init__(self, sampler, multi: MultiCameraSet, feed: VideoFeed | None, transform: TransformConfig,
                 seed: int, prefetch: int = 2, threads: int = 2, snapshot_at: Callable[[int], bool] = lambda s: False,
                 bad_images: str = "stop", before_plan: Callable[[int], None] | None = None, lock=None):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images: {bad_images!r} is not one of {list(BAD_IMAGE_POLICIES)}")
        super().__init__(sampler, feed=feed, prefetch=prefetch, threads=threads, snapshot_at=snapshot_at,
                         before_plan=before_plan, lock=lock)
        self.bad_images = bad_images
        self.bad_images_skipped = 0
        self.multi = multi
        self.multi_index = {k: i for i, k in enumerate(multi.keys)}
        self.standard = ViewTransform(transform, "standard")
        self.strong = ViewTransform(transform, "strong")
        self.size = (transform.height, transform.width)
        self.seed = seed
        self.start()

    def _decode_one(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        data, key, step_seed, shard = item
        try:
            img = decode_image(data, self.size)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's unidentified/truncated/corrupt-stream errors
            text = f"{shard}: image {key} does not decode ({exc})"
            if self.bad_images == "stop":
                raise BadImageError(f"{text}; re-run `dynamix ingest` on its source to rewrite the shard, "
                                    f"check the set with `dynamix inspect --verify`, or set data.bad_images: skip") from None
            with self.lock:
                self.bad_images_skipped += 1
            print(f"[data] skipped: {text} ({self.bad_images_skipped} skipped so far)", flush=True)
            return None
        return (self.standard(img, sample_generator(step_seed, key, "standard")),
                self.strong(img, sample_generator(step_seed, key, "strong")))

    def materialise(self, plan: BatchPlan, step: int) -> StepBatch:
        """Decode + augment; views are seeded by (seed, step, key), so a resumed run sees the same."""
        items, camid = [], []
        step_seed = self.seed + 7919 * step
        for ref in plan.multi_refs:
            i = self.multi_index[ref]
            items.append((self.multi.data[i], ref, step_seed, self.multi.shards[i] if self.multi.shards else "?"))
            camid.append(int(self.multi.camid[i]))
        wanted = [(int(vid), ref) for ref, vid in zip(plan.single_refs, plan.single_video_ids)]
        for (vid, ref), data in zip(wanted, self.feed.read_images(wanted) if wanted else []):
            items.append((data, ref, step_seed, self.feed.shard_of(vid)))
            camid.append(-1 - vid)  # single-camera images: one camera per video, never a multi camera
        views = list(self.pool.map(self._decode_one, items))
        num_multi = len(plan.multi_refs)
        video = np.concatenate([np.full(num_multi, -1), np.asarray(plan.single_video_ids, dtype=np.int64)])
        pid = np.concatenate([plan.multi_pids, plan.single_pids]).astype(np.int64)
        kept = np.array([v is not None for v in views], dtype=bool)  # all but skipped bad images
        views = [v for v in views if v is not None]
        return StepBatch(
            standard_BCHW=torch.stack([v[0] for v in views]),
            strong_BCHW=torch.stack([v[1] for v in views]),
            pid_B=torch.as_tensor(pid[kept]),
            camid_B=torch.as_tensor(np.asarray(camid, dtype=np.int64)[kept]),
            is_single_B=torch.as_tensor(video[kept] >= 0),
            video_B=torch.as_tensor(video[kept]),
        )

    def failure(self, error: BaseException) -> BaseException:
        if isinstance(error, BadImageError):
            return BadImageError(str(error))
        return super().failure(error)
