"""The one prefetcher of the engine: a background thread that plans the next step's batch with the
sampler and materialises it (decode and augment, on a small thread pool) ahead of the training step.

Recipes differ only in :meth:`Prefetcher.materialise` (labelled views for the mixing recipes, two
views per image for pre-training). The sampler is planned under :attr:`Prefetcher.lock`, which the
training thread also takes to change labels between steps. Prefetching runs ahead of training, so
at a checkpoint step the sampler state from just before that step was planned is kept
(:meth:`Prefetcher.state_at`): a resumed run plans the same batches.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Prefetcher:
    """``prefetch`` batches planned by ``sampler`` (``next_batch()``, ``step``, ``state_dict()``) and
    made by :meth:`materialise`, ready before the step asks; :meth:`get` returns one and the time it
    blocked. An exception in the thread is raised by :meth:`get` (see :meth:`failure`). ``feed``:
    the single-camera feed, told after each plan that the sampler may have moved on."""

    name = "batch producer"

    def __init__(self, sampler, *, feed=None, prefetch: int = 2, threads: int = 2,
                 snapshot_at: Callable[[int], bool] = lambda step: False,
                 before_plan: Callable[[int], None] | None = None, lock: threading.Lock | None = None):
        self.sampler, self.feed = sampler, feed
        self.snapshot_at = snapshot_at
        # called in this thread before a step's batch is planned, after its snapshot, without the
        # lock (it may wait; it takes the lock to change labels): step-locked label versions
        self.before_plan = before_plan
        self.snapshots: dict[int, dict] = {}
        # guards the sampler (label updates arrive from the training thread)
        self.lock = lock if lock is not None else threading.Lock()
        self.pool = ThreadPoolExecutor(threads)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=self.name.replace(" ", "-"), daemon=True)

    def start(self) -> "Prefetcher":
        self.thread.start()
        return self

    def materialise(self, plan: Any, step: int) -> Any:
        """The batch of ``plan`` (the sampler's plan of ``step``); runs in the prefetch thread."""
        raise NotImplementedError

    def failure(self, error: BaseException) -> BaseException:
        """What :meth:`get` raises for ``error`` raised in the thread."""
        return RuntimeError(f"{self.name} failed: {error!r}")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    step = self.sampler.step
                    if self.snapshot_at(step):
                        self.snapshots[step] = self.sampler.state_dict()
                    if self.before_plan is None:
                        plan = self.sampler.next_batch()
                if self.before_plan is not None:
                    self.before_plan(step)
                    with self.lock:
                        plan = self.sampler.next_batch()
                if self.feed is not None:
                    self.feed.note_progress()
                batch = self.materialise(plan, step)
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

    def get(self) -> tuple[Any, float]:
        t0 = time.perf_counter()
        batch = self.queue.get()
        if batch is None:
            raise self.failure(self.error) from self.error
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
