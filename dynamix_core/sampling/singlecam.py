"""Single-camera part of a batch: V videos x G identities per video x K images (SPEC 2.3c).

The data layer hands out whole videos one at a time (:data:`VideoStream`); identities are
video-local pseudo-labels that the Relabeling Module may change between batches
(:meth:`SingleCameraSampler.update_labels`).

Buffer policy:

* The sampler holds at most ``buffer_size`` videos, pulled in stream order. A pulled video with no
  labeled image, or whose id is already buffered (a cycling stream came round), is skipped.
* A batch picks V distinct videos uniformly among the buffered videos that have at least G
  identities; in each, G distinct identities, those with >= 2 images first (a one-image identity
  has no second image to pair with, it only fills in when a video has too few others).
* A video retires after ``max_video_uses`` batches and the buffer is topped up from the stream at
  once, so :meth:`SingleCameraSampler.buffered_video_ids` names the videos about to be used (the
  ones worth relabeling). A video thus serves at most ``max_video_uses`` batches per pass, and on
  average stays about ``buffer_size / V * max_video_uses`` batches.
* When fewer than V buffered videos have G identities (e.g. the curriculum just raised G), the
  oldest videos that cannot serve are retired to make room and the buffer is refilled; if the
  stream ends first, :meth:`~SingleCameraSampler.sample` raises.

Data parallelism: identities belong to one video, so ranks whose streams hold disjoint videos can
never put the same image in a batch. Give each rank its own shard of videos - a reader sharded by
video, or :func:`partition_stream` over a common stream.

Resume: the state holds the random stream, the buffer (videos, labels, uses) and the number of
videos pulled; after :meth:`~SingleCameraSampler.load_state_dict` the stream is reopened at that
position, so the batches continue exactly as if training had not stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from dynamix_core.sampling.images import draw_images
from dynamix_core.sampling.rng import SINGLE_STREAM, make_rng, rng_state, set_rng_state


@dataclass(frozen=True)
class VideoSamples:
    """One video as the data layer hands it out: its images and their current pseudo-labels."""

    video_id: int
    refs: Sequence  # one sample ref (index or key) per image
    pids: Sequence[int]  # current pseudo-label per image; -1 = unlabeled / dropped

    def __post_init__(self) -> None:
        if len(self.refs) != len(self.pids):
            raise ValueError(f"video {self.video_id}: {len(self.refs)} refs but {len(self.pids)} pids")


#: ``stream(position)`` yields the videos of the stream from index ``position`` on (0 = the start).
#: It must yield the same sequence every time it is opened at the same position.
VideoStream = Callable[[int], Iterator[VideoSamples]]


def partition_stream(stream: VideoStream, rank: int, world_size: int) -> VideoStream:
    """The videos of ``stream`` with ``video_id % world_size == rank``: disjoint shards for the ranks.

    Positions count the videos of the shard; reopening at a position skips through the common
    stream, so a reader that can seek or that is sharded by video itself is cheaper to resume."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")

    def shard(position: int) -> Iterator[VideoSamples]:
        mine = (v for v in stream(0) if v.video_id % world_size == rank)
        for _ in range(position):
            next(mine)
        yield from mine

    return shard


class _BufferedVideo:
    """A buffered video: its labels grouped into identities, and how many batches it served."""

    __slots__ = ("video_id", "refs", "pids", "uses", "groups")

    def __init__(self, video_id: int, refs: np.ndarray, pids: np.ndarray, uses: int = 0):
        self.video_id = video_id
        self.refs = refs
        self.uses = uses
        self.relabel(pids)

    def relabel(self, pids: np.ndarray) -> None:
        self.pids = pids
        labeled = np.flatnonzero(pids >= 0)
        order = labeled[np.argsort(pids[labeled], kind="stable")]
        bounds = np.flatnonzero(np.diff(pids[order])) + 1
        #: positions of each identity's images, identities in pid order (deterministic)
        self.groups: list[np.ndarray] = np.split(order, bounds) if len(order) else []

    @property
    def num_ids(self) -> int:
        return len(self.groups)


class SingleCameraSampler:
    """V x G x K sampler over a bounded buffer of whole videos (policy in the module docstring)."""

    def __init__(
        self,
        stream: VideoStream,
        *,
        images_per_id: int,
        buffer_size: int,
        max_video_uses: int,
        seed: int = 0,
        rank: int = 0,
    ):
        self._stream = stream
        self.images_per_id = images_per_id
        self.buffer_size = buffer_size
        self.max_video_uses = max_video_uses
        self.rank = rank
        self._rng = make_rng(seed, SINGLE_STREAM, rank)
        self._buffer: list[_BufferedVideo] = []  # arrival order
        self._by_id: dict[int, _BufferedVideo] = {}
        self._position = 0  # videos pulled from the stream so far
        self._exhausted = False
        self._iter: Iterator[VideoSamples] | None = None

    def buffered_video_ids(self) -> list[int]:
        """Ids of the buffered videos, oldest first: the videos the next batches draw from."""
        self._fill()
        return [v.video_id for v in self._buffer]

    def update_labels(self, video_id: int, new_pids: Sequence[int]) -> bool:
        """Publish new pseudo-labels for a buffered video (one per image, in the video's order).

        Returns False, changing nothing, when the video is no longer buffered (it retired while it
        was being relabeled); the data layer's label table then gives the new labels next pass."""
        video = self._by_id.get(int(video_id))
        if video is None:
            return False
        new_pids = np.asarray(new_pids, dtype=np.int64)
        if len(new_pids) != len(video.refs):
            raise ValueError(f"video {video_id}: {len(new_pids)} new pids for {len(video.refs)} images")
        video.relabel(new_pids)
        return True

    def sample(self, num_videos: int, ids_per_video: int) -> tuple[list, np.ndarray, np.ndarray]:
        """This rank's ``num_videos`` x ``ids_per_video`` x K images: ``(refs, pids, video_ids)``,
        grouped by video, then identity (K consecutive refs per identity)."""
        if num_videos == 0:
            return [], np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        if num_videos > self.buffer_size:
            raise ValueError(f"a batch of {num_videos} videos cannot come from a buffer of {self.buffer_size}; "
                             "raise buffer_size (sampler.video_buffer_size)")
        eligible = self._eligible(num_videos, ids_per_video)
        chosen = [eligible[i] for i in self._rng.choice(len(eligible), num_videos, replace=False)]
        refs, pids, video_ids = [], [], []
        for video in chosen:
            for group in self._pick_identities(video, ids_per_video):
                positions = draw_images(self._rng, [group], self.images_per_id)
                refs.extend(video.refs[positions].tolist())
                pids.append(video.pids[positions])
            video_ids.append(np.full(ids_per_video * self.images_per_id, video.video_id, dtype=np.int64))
            video.uses += 1
        for video in chosen:
            if video.uses >= self.max_video_uses:
                self._retire(video)
        self._fill()
        return refs, np.concatenate(pids), np.concatenate(video_ids)

    def _pick_identities(self, video: _BufferedVideo, g: int) -> list[np.ndarray]:
        sizes = np.array([len(grp) for grp in video.groups])
        preferred, rest = np.flatnonzero(sizes >= 2), np.flatnonzero(sizes < 2)
        if len(preferred) >= g:
            picked = self._rng.choice(preferred, g, replace=False)
        else:
            picked = np.concatenate([preferred, self._rng.choice(rest, g - len(preferred), replace=False)])
        return [video.groups[i] for i in picked]

    def _eligible(self, num_videos: int, ids_per_video: int) -> list[_BufferedVideo]:
        """Buffered videos with >= G identities, at least ``num_videos`` of them (retiring and refilling)."""
        retired_here: set[int] = set()
        while True:
            self._fill()
            eligible = [v for v in self._buffer if v.num_ids >= ids_per_video]
            if len(eligible) >= num_videos:
                return eligible
            if self._exhausted:
                raise ValueError(
                    f"the video stream ended: only {len(eligible)} buffered videos have >= {ids_per_video} "
                    f"identities and a batch needs {num_videos}; feed a longer (e.g. cycling) stream"
                )
            if any(v.video_id in retired_here for v in self._buffer):
                # a cycling stream came round without yielding enough videos: it would loop forever
                raise ValueError(
                    f"the video stream has fewer than {num_videos} videos with >= {ids_per_video} identities; "
                    "lower the schedule's ids_per_video or num_videos"
                )
            # the buffer is full (else _fill would have pulled more): make room for videos that can serve
            too_small = [v for v in self._buffer if v.num_ids < ids_per_video]
            for video in too_small[: num_videos - len(eligible)]:
                retired_here.add(video.video_id)
                self._retire(video)

    def _retire(self, video: _BufferedVideo) -> None:
        self._buffer.remove(video)
        del self._by_id[video.video_id]

    def _fill(self) -> None:
        while len(self._buffer) < self.buffer_size and not self._exhausted:
            if self._iter is None:
                self._iter = self._stream(self._position)
            item = next(self._iter, None)
            if item is None:
                self._exhausted = True
                break
            self._position += 1
            self._admit(int(item.video_id), np.asarray(item.refs), np.asarray(item.pids, dtype=np.int64))

    def _admit(self, video_id: int, refs: np.ndarray, pids: np.ndarray, uses: int = 0) -> None:
        if video_id in self._by_id or not (pids >= 0).any():
            return
        video = _BufferedVideo(video_id, refs, pids, uses)
        self._buffer.append(video)
        self._by_id[video_id] = video

    def state_dict(self) -> dict:
        """JSON-safe state: random stream, stream position and the buffer (labels and uses included)."""
        return {
            "rank": self.rank,
            "rng": rng_state(self._rng),
            "position": self._position,
            "exhausted": self._exhausted,
            "buffer": [
                {"video_id": v.video_id, "refs": v.refs.tolist(), "pids": v.pids.tolist(), "uses": v.uses}
                for v in self._buffer
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self.rank:
            raise ValueError(
                f"single-camera sampler state of rank {state['rank']} cannot resume rank {self.rank}: "
                "save and load each rank's own sampler state"
            )
        set_rng_state(self._rng, state["rng"])
        self._position = state["position"]
        self._exhausted = state["exhausted"]
        self._iter = None  # reopened at the saved position on the next pull
        self._buffer, self._by_id = [], {}
        for v in state["buffer"]:
            self._admit(v["video_id"], np.asarray(v["refs"]), np.asarray(v["pids"], dtype=np.int64), v["uses"])
