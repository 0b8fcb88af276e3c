"""The trainers' side of the labeling service: publish momentum weights, request the videos about to
be sampled, and switch to newer label versions between steps without ever waiting for a round."""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from dynamix_core.centroids import CentroidBank


class LabelClient:
    """A trainer's view of the run's label store (the actor of :class:`services.label_store.LabelStore`):
    polls it with ``ray.wait(timeout=0)``; applies deltas to the local label map, the sampler's
    buffered videos and this rank's centroid rows."""

    def __init__(self, store, coordinator, *, rank: int, world_size: int, sharded: bool, bank_offset: int,
                 version: int | None):
        self.store, self.coordinator = store, coordinator
        self.rank, self.world_size, self.sharded = rank, world_size, sharded
        self.bank_offset = bank_offset
        self.version = version
        self._pending: ray.ObjectRef | None = None
        self.wait_s = 0.0  # time spent fetching deltas (the only blocking part)
        self.switches = 0

    def query(self, since: int | None, until: int | None = None) -> dict:
        """Keyword arguments of the store's ``changes_since`` for this rank (its shard of centroids)."""
        return {"since": since, "until": until, "rank": self.rank, "world_size": self.world_size,
                "sharded": self.sharded, "bank_offset": self.bank_offset}

    def initial_labels(self, bank: CentroidBank, step: int) -> np.ndarray:
        """The whole current table (int32, one label per row of the run's index), and every centroid
        published so far (for this rank's rows)."""
        delta = ray.get(self.store.changes_since.remote(**self.query(None)))
        self.version = delta.version
        self.apply_centroids(bank, delta, step)
        return delta.apply(None)

    def resume(self, checkpoint_version: int | None, step: int | None = None) -> np.ndarray:
        """After a restart: the whole table of the checkpoint's version, the one its sampler state
        was planned with (the restored bank already holds that version's centroids, updated since);
        the next :meth:`poll` brings in the newer versions, their labels and centroids. Rank 0 also
        tells the coordinator the group restarted at ``step`` (it drops the dead group's weights,
        step and requests)."""
        if step is not None and self.rank == 0 and self.coordinator is not None:
            ray.get(self.coordinator.trainers_restarted.remote(step))
        delta = ray.get(self.store.changes_since.remote(None, until=checkpoint_version, with_centroids=False))
        self.version = delta.version
        return delta.apply(None)

    def pin(self, keep: int) -> None:
        """A checkpoint is being written with this rank's label version: the store keeps it readable
        while it is one of the newest ``keep`` checkpoints (rank 0 only; waits for the store, so the
        pin is on disk before the checkpoint exists)."""
        if self.rank == 0 and self.version is not None:
            ray.get(self.store.pin.remote(self.version, keep))

    def apply_centroids(self, bank: CentroidBank, delta, step: int) -> None:
        """Grow the bank to every identity of the delta's version (the same size on every rank, so
        any rank can sample any identity) and write the published rows this rank holds."""
        needed = self.bank_offset + delta.num_identities
        if needed > bank.num_identities:
            bank.resize(needed)
        if len(delta.centroid_ids):
            device = bank.centroids.device
            bank.load_rows(torch.as_tensor(delta.centroid_ids + self.bank_offset, device=device),
                           torch.tensor(delta.centroids, device=device), step=step,
                           video_M=torch.tensor(delta.centroid_videos, device=device))

    def publish(self, step: int, momentum_state: dict, video_ids: list[int]) -> None:
        if self.rank == 0:
            cpu_state = {k: v.detach().cpu() for k, v in momentum_state.items()}
            self.coordinator.publish_weights.remote(step, [ray.put(cpu_state)])
        self.coordinator.request.remote(self.rank, step, [int(v) for v in video_ids])

    def _latest_ready(self) -> int | None:
        """The store's latest version if its answer is already there (never waits)."""
        if self._pending is None:
            self._pending = self.store.latest.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            return None
        version, _ = ray.get(self._pending)
        self._pending = None
        return version

    def poll(self, sampler, feed, bank: CentroidBank, lock, step: int) -> bool:
        """Switch to a newer version if one is ready: ``feed.labels`` (int32 per row), the labels of
        the sampler's buffered videos and this rank's centroid rows. With several ranks, rank 0
        decides and every rank switches to that same version at this same step (one tiny broadcast
        per step), so the replicated centroid banks stay identical."""
        target = self._latest_ready() if self.rank == 0 else None
        if self.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor([-1 if target is None else target], dtype=torch.int64, device=bank.centroids.device)
            dist.broadcast(t, src=0)
            target = None if int(t) < 0 else int(t)
        if target is None or (self.version is not None and target <= self.version):
            return False
        t0 = time.perf_counter()
        delta = ray.get(self.store.changes_since.remote(**self.query(self.version, until=target)))
        delta.labels()  # fetched before taking the lock: the producer thread keeps going meanwhile
        with lock:
            feed.labels = delta.apply(feed.labels)
            for vid in sampler.buffered_video_ids():
                rows = feed.video_rows(vid)
                if rows is None:
                    continue
                pids = feed.labels[rows].astype(np.int64)
                sampler.update_labels(vid, np.where(pids >= 0, pids + self.bank_offset, -1))
            self.apply_centroids(bank, delta, step)
        self.version = delta.version
        self.switches += 1
        self.wait_s += time.perf_counter() - t0
        return True
