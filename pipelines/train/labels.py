"""The trainers' side of the labeling service: publish momentum weights, request the videos about to
be sampled, and switch to newer label versions between steps without ever waiting for a round."""

from __future__ import annotations

import time
from typing import Callable

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

    def pin(self, keep: int, version: int | None = None) -> None:
        """A checkpoint is being written with this rank's label version (or ``version``): the store
        keeps it readable while it is one of the newest ``keep`` checkpoints (rank 0 only; waits for
        the store, so the pin is on disk before the checkpoint exists)."""
        version = self.version if version is None else version
        if self.rank == 0 and version is not None:
            ray.get(self.store.pin.remote(version, keep))

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

    def apply_labels(self, delta, sampler, feed) -> None:
        """``feed.labels`` and the labels of the sampler's buffered videos to the delta's version
        (the caller holds the sampler's lock)."""
        feed.labels = delta.apply(feed.labels)
        for vid in sampler.buffered_video_ids():
            rows = feed.video_rows(vid)
            if rows is None:
                continue
            pids = feed.labels[rows].astype(np.int64)
            sampler.update_labels(vid, np.where(pids >= 0, pids + self.bank_offset, -1))

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
            self.apply_labels(delta, sampler, feed)
            self.apply_centroids(bank, delta, step)
        self.version = delta.version
        self.switches += 1
        self.wait_s += time.perf_counter() - t0
        return True


class StepLockedLabels:
    """``labeling.deterministic``: a label version reaches the trainers at a fixed step, so that a run
    is a function of its seed and a resumed run equals an uninterrupted one step by step.

    At every publish step ``p`` (``p % publish_every == 0``) each rank sends the weights of ``p``
    (rank 0) and the videos its sampler held when it planned the batch of ``p``; the coordinator runs
    one round on exactly those and commits one version tagged ``p`` (``_pick_step_round``). That
    version is applied when the batch of step ``p + apply_after`` is planned: the prefetch thread
    waits for it (:meth:`before_plan`), changes the feed's and the sampler's labels, and the training
    thread writes its centroids into the bank before that step (:meth:`before_step`). A checkpoint
    after step ``c`` first waits for the rounds of publish steps ``c - apply_after .. c - 1``, which
    a resumed run applies but does not publish again, and records the version the sampler state it
    saves was planned with. The price: the trainers wait whenever a round takes longer than
    ``apply_after`` steps."""

    #: seconds a trainer waits for one round before the run stops
    wait_s = 3600.0

    def __init__(self, client: LabelClient, sampler, feed, producer_lock, *, publish_every: int, apply_after: int):
        import threading

        self.client, self.sampler, self.feed, self.lock = client, sampler, feed, producer_lock
        self.publish_every, self.apply_after = publish_every, apply_after
        self.cond = threading.Condition()
        self.planned = -1  # the newest step whose batch the prefetch thread planned
        self.deltas: dict[int, object] = {}  # plan step -> the delta applied there (its centroids: the bank)
        self.requests: dict[int, list[int]] = {}  # publish step -> buffered videos when it was planned
        self.applied: list[tuple[int, int]] = []  # (plan step, version) of every version applied, in order
        self.start_version = client.version

    def publishes(self, step: int) -> bool:
        return step % self.publish_every == 0

    def applies(self, step: int) -> bool:
        return step >= self.apply_after and self.publishes(step - self.apply_after)

    def version_of_round(self, step: int) -> int:
        """The version committed for publish step ``step``, waited for (the run stops when the
        labelling service reports a failed round or none comes within :attr:`wait_s`)."""
        from dynamix_core.errors import StopRun

        deadline = time.monotonic() + self.wait_s
        errors = None
        while True:
            version = ray.get(self.client.store.version_for_step.remote(step))
            if version is not None:
                return version
            stats = ray.get(self.client.coordinator.stats.remote())
            if errors is None:
                errors = stats["counters"].get("round_errors", 0)
            elif stats["counters"].get("round_errors", 0) > errors:
                raise StopRun(f"labeling.deterministic: the labelling round of step {step} failed: "
                              f"{(stats['errors'] or ['see the labeling actors log'])[-1]}")
            if time.monotonic() > deadline:
                raise StopRun(f"labeling.deterministic: no label version for step {step} within {self.wait_s:.0f} s")
            time.sleep(0.1)

    # --- the prefetch thread ----------------------------------------------------------------------

    def before_plan(self, step: int) -> None:
        """Before the batch of ``step`` is planned: apply the version due at ``step`` and, at a
        publish step, note the videos the sampler holds (what this rank asks to be relabelled)."""
        if self.applies(step):
            version = self.version_of_round(step - self.apply_after)
            delta = ray.get(self.client.store.changes_since.remote(**self.client.query(self.client.version,
                                                                                         until=version)))
            with self.lock:
                self.client.apply_labels(delta, self.sampler, self.feed)
            self.client.version = version
            with self.cond:
                self.deltas[step] = delta
                self.applied.append((step, version))
        if self.publishes(step):
            with self.lock:
                videos = self.sampler.buffered_video_ids()
            with self.cond:
                self.requests[step] = videos
        with self.cond:
            self.planned = step
            self.cond.notify_all()

    # --- the training thread ----------------------------------------------------------------------

    def _wait_planned(self, step: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.planned >= step, timeout=self.wait_s):
                raise RuntimeError(f"labeling.deterministic: the batch of step {step} was not planned in time")

    def before_step(self, step: int, bank, momentum_state: Callable[[], dict]) -> None:
        """Before training ``step``: the centroids of a version applied at this step into the bank;
        at a publish step, the weights and this rank's request."""
        self._wait_planned(step)
        with self.cond:
            delta = self.deltas.pop(step, None)
            videos = self.requests.pop(step, None)
        if delta is not None:
            self.client.apply_centroids(bank, delta, step)
        if videos is not None:
            self.client.publish(step, momentum_state(), videos)

    def before_checkpoint(self, done: int) -> None:
        """A checkpoint after ``done`` steps: the rounds a resumed run applies but does not publish
        again must be in the store (published at ``done - apply_after .. done - 1``)."""
        for p in range(max(0, done - self.apply_after), done):
            if self.publishes(p):
                self.version_of_round(p)

    def checkpoint_version(self, done: int) -> int | None:
        """The label version steps ``0 .. done - 1`` ended with: what the sampler state of a checkpoint
        after ``done`` steps was planned with, and what a report of ``done`` names."""
        with self.cond:
            before = [v for s, v in self.applied if s < done]
        return before[-1] if before else self.start_version
