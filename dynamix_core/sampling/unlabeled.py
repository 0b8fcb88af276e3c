"""Batches of single images for self-supervised pre-training, from a bounded buffer of whole videos.

The data layer hands out whole videos (:data:`~dynamix_core.sampling.singlecam.VideoStream`);
labels are not used. Instance discrimination treats every other image of a batch as a negative,
so two frames of one person in a batch are false negatives: the sampler spreads each batch over
many videos.

Buffer policy:

* The sampler holds ``buffer_size`` videos, pulled in stream order, each with the images it has
  not handed out yet (more when its videos have too few images left to fill a batch). A pulled video that is already buffered (a cycling stream came round)
  is skipped; once a whole buffer's worth of pulls in a row were such repeats, every video of the
  stream is buffered and the sampler stops pulling until a video retires. If the buffered videos
  then have too few images left for a batch, those with fewer than ``max_images_per_video`` left
  retire early (their last images wait for the next pass) and come back whole from the stream.
* A batch takes at most ``max_images_per_video`` images of one video: each buffered video offers
  that many of its remaining images (drawn uniformly), and ``batch_size`` of the offers are drawn
  uniformly without replacement.
* Every image is handed out once per admission of its video; a video retires when it has no
  image left, and the buffer is topped up from the stream. One pass over the stream thus uses
  every image once (an epoch), up to the images of the last videos still buffered.

Data parallelism: give each rank its own shard of videos (``video_id % world_size == rank``), so
no image is in two ranks' batches.

Resume: :meth:`state_dict` holds the random stream, the number of videos pulled and the buffer
(video ids and their remaining refs); after :meth:`load_state_dict` the stream is reopened at that
position. The images of the buffered videos must be made available again by the caller.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dynamix_core.sampling.rng import make_rng, rng_state, set_rng_state
from dynamix_core.sampling.singlecam import VideoSamples, VideoStream

#: stream id under the seed (see :mod:`dynamix_core.sampling.rng`; the labelled samplers use 0-2)
UNLABELED_STREAM = 3


class UnlabeledImageSampler:
    """``next_batch()`` -> ``(refs, video_ids)`` of ``batch_size`` images (policy in the module docstring)."""

    def __init__(self, stream: VideoStream, *, batch_size: int, buffer_size: int, max_images_per_video: int,
                 seed: int = 0, rank: int = 0):
        if min(batch_size, buffer_size, max_images_per_video) < 1:
            raise ValueError(f"batch_size={batch_size}, buffer_size={buffer_size}, max_images_per_video="
                             f"{max_images_per_video}: all must be >= 1")
        if buffer_size * max_images_per_video < batch_size:
            raise ValueError(f"a batch of {batch_size} images with at most {max_images_per_video} per video needs "
                             f">= {-(-batch_size // max_images_per_video)} buffered videos, the buffer holds "
                             f"{buffer_size}; raise data.buffer_videos or data.max_images_per_video")
        self._stream = stream
        self.batch_size, self.buffer_size, self.cap = batch_size, buffer_size, max_images_per_video
        self.rank = rank
        self._rng = make_rng(seed, UNLABELED_STREAM, rank)
        self._buffer: dict[int, list] = {}  # video id -> remaining refs, in arrival order
        self._position = 0  # videos pulled from the stream so far
        self._saturated = False  # every video of the stream is buffered: pull again after a retirement
        self._iter: Iterator[VideoSamples] | None = None
        self.step = 0  # batches planned so far

    def buffered_video_ids(self) -> list[int]:
        """Ids of the buffered videos, oldest first (the videos whose images the next batches use)."""
        return list(self._buffer)

    def next_batch(self) -> tuple[list, np.ndarray]:
        """This rank's next batch: ``batch_size`` refs and the video of each."""
        self._fill()
        if self._offers() < self.batch_size and self._saturated:
            # every video of the stream is buffered and too few images are left: retire the nearly
            # used-up videos so the cycling stream hands them out afresh
            for vid in [v for v, refs in self._buffer.items() if len(refs) < self.cap]:
                del self._buffer[vid]
            self._saturated = False
            self._fill()
        offers = [(vid, pos) for vid, refs in self._buffer.items()
                  for pos in self._rng.permutation(len(refs))[:self.cap]]
        if len(offers) < self.batch_size:
            raise ValueError(
                f"only {len(offers)} images available for a batch of {self.batch_size} (at most {self.cap} per video "
                f"from {len(self._buffer)} buffered videos; the stream holds no more videos): lower data.batch_size, "
                "raise data.max_images_per_video, or use fewer workers")
        chosen = [offers[i] for i in self._rng.choice(len(offers), self.batch_size, replace=False)]
        refs = [self._buffer[vid][pos] for vid, pos in chosen]
        video_ids = np.array([vid for vid, _ in chosen], dtype=np.int64)
        taken: dict[int, set[int]] = {}
        for vid, pos in chosen:
            taken.setdefault(vid, set()).add(int(pos))
        for vid, positions in taken.items():
            left = [r for i, r in enumerate(self._buffer[vid]) if i not in positions]
            if left:
                self._buffer[vid] = left
            else:
                del self._buffer[vid]
                self._saturated = False
        self.step += 1
        return refs, video_ids

    def _offers(self) -> int:
        return sum(min(self.cap, len(refs)) for refs in self._buffer.values())

    def _fill(self) -> None:
        repeats = 0
        while (len(self._buffer) < self.buffer_size or self._offers() < self.batch_size) and not self._saturated:
            if self._iter is None:
                self._iter = self._stream(self._position)
            item = next(self._iter, None)
            if item is None:  # a finite stream ended: nothing more to pull
                if not self._buffer and repeats == 0 and self._position == 0:
                    raise ValueError("the video stream is empty: no single-camera video to pre-train on")
                self._saturated = True
                break
            self._position += 1
            vid = int(item.video_id)
            if vid in self._buffer or len(item.refs) == 0:
                repeats += 1
                self._saturated = repeats > len(self._buffer)
                continue
            repeats = 0
            self._buffer[vid] = list(item.refs)

    def state_dict(self) -> dict:
        """JSON-safe state: random stream, stream position, planned batches and the buffer."""
        return {"rank": self.rank, "rng": rng_state(self._rng), "position": self._position, "step": self.step,
                "saturated": self._saturated,
                "buffer": [{"video_id": vid, "refs": list(refs)} for vid, refs in self._buffer.items()]}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self.rank:
            raise ValueError(f"unlabeled sampler state of rank {state['rank']} cannot resume rank {self.rank}: "
                             "save and load each rank's own sampler state")
        set_rng_state(self._rng, state["rng"])
        self._position, self.step, self._saturated = state["position"], state["step"], state["saturated"]
        self._buffer = {int(v["video_id"]): list(v["refs"]) for v in state["buffer"]}
        self._iter = None  # reopened at the saved position on the next pull
