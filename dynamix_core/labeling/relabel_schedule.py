"""When the Relabeling Module may touch a video (SPEC 2.3a): never during warm-up, then each video at
most once per pass; a pass ends when every video has been relabeled once, and the next one begins."""

from __future__ import annotations

import numpy as np


class RelabelScheduler:
    """Tracks the pass number and the videos already relabeled in the current pass.

    The trainer (or the label service) asks :meth:`due` for the videos it is about to sample, relabels
    those, then calls :meth:`mark_done`. ``state_dict`` makes it resumable from a checkpoint."""

    def __init__(self, video_ids: np.ndarray, total_iterations: int, warmup_fraction: float = 0.1):
        self.video_ids = np.unique(np.asarray(video_ids))
        if not len(self.video_ids):
            raise ValueError("RelabelScheduler needs at least one video id")
        if total_iterations < 1 or not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"total_iterations {total_iterations} must be >= 1 and warmup_fraction {warmup_fraction} in [0, 1)"
            )
        self.warmup_iterations = int(np.ceil(warmup_fraction * total_iterations))
        self.pass_index = 0
        self._done: set[int] = set()

    def in_warmup(self, iteration: int) -> bool:
        return iteration < self.warmup_iterations

    def due(self, iteration: int, video_ids: np.ndarray) -> np.ndarray:
        """Distinct videos among ``video_ids`` to relabel now (empty during warm-up)."""
        if self.in_warmup(iteration):
            return np.empty(0, dtype=self.video_ids.dtype)
        candidates = self._known(video_ids)
        return np.array([v for v in candidates.tolist() if v not in self._done], dtype=self.video_ids.dtype)

    def mark_done(self, video_ids: np.ndarray) -> None:
        """Record relabeled videos; once every video is done, the next pass starts."""
        self._done.update(self._known(video_ids).tolist())
        if len(self._done) == len(self.video_ids):
            self.pass_index += 1
            self._done.clear()

    def _known(self, video_ids: np.ndarray) -> np.ndarray:
        candidates = np.unique(np.asarray(video_ids))
        unknown = np.setdiff1d(candidates, self.video_ids)
        if len(unknown):
            raise ValueError(f"unknown video ids {unknown[:10].tolist()}: not in the scheduler's video list")
        return candidates

    def state_dict(self) -> dict:
        return {"pass_index": self.pass_index, "done": sorted(self._done)}

    def load_state_dict(self, state: dict) -> None:
        self.pass_index = int(state["pass_index"])
        self._done = set(state["done"])
