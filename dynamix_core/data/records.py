"""Sample records (SPEC 1.1), deterministic identity/camera maps, and the bad-input report.

Two levels:

* :class:`RawSample` - what a parser yields: the dataset's *own* identity and camera names
  (strings, namespaced inside the dataset where the dataset needs it, e.g. MSMT17 ``train:0002``)
  and where the image bytes live (:class:`ImageRef`).
* :class:`Record` - one row of the manifest: global integer ``pid``/``camid``/``video_id`` from
  :class:`IdentityMap`, built from **sorted** ``(dataset, source_id)`` pairs so that every worker and
  every run computes the same map from the same inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

Domain = Literal["multi", "single", "synthetic"]
Split = Literal["train", "query", "gallery"]
DOMAINS = ("multi", "single", "synthetic")
SPLITS = ("train", "query", "gallery")

#: Manifest columns, in order (SPEC 1.1 plus the source ids the global maps are built from).
RECORD_FIELDS = (
    "key", "dataset", "split", "pid", "camid", "video_id", "tracklet_id", "frame", "domain",
    "source_pid", "source_camid",
)

_KEY_ESCAPED = re.compile(r"[^A-Za-z0-9_]")

#: the global identity of an image without one (unlabeled, or a data set's distractor)
NO_IDENTITY = -1


def _escape(match: re.Match) -> str:
    return "".join(f"-{b:02x}" for b in match.group().encode())


def make_key(*parts: object) -> str:
    """A dot-free sample key: the parts joined by ``_``, every character outside ``[A-Za-z0-9_]``
    written as ``-`` and the hex of its UTF-8 bytes (WebDataset splits keys at the first dot).
    ``make_key("market1501", "train", "0002_c1s1_000451_03")`` is ``market1501_train_0002_c1s1_000451_03``;
    ``a/x_1`` gives ``a-2fx_1`` and ``a_x/1`` gives ``a_x-2f1``: two names never share a key, so no
    image of a data set is dropped as a duplicate of another."""
    return _KEY_ESCAPED.sub(_escape, "_".join(str(p) for p in parts if p is not None and str(p) != ""))


def global_identity(dataset: str, source_pid: str) -> int:
    """The identity of ``(dataset, source_pid)`` across every shard set, however and wherever it was
    ingested: the first 8 bytes of SHA-256 of ``"{dataset}/{source_pid}"`` (UTF-8) as a big-endian
    integer, shifted right by 12 bits. 52 bits: non-negative, exact in int64, float64 and JSON, and
    two of a million identities share one with probability about 1e-4 (ingest checks its own set).
    This is the ``.cls`` member of a shard sample (SPEC 1.3); ``pid`` stays the set's own 0..N-1."""
    digest = hashlib.sha256(f"{dataset}/{source_pid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 12


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where one image's encoded bytes live: a file (``member is None``) or an LMDB entry."""

    container: str  # file path, or the LMDB environment directory
    member: str | None = None  # LMDB key (decoded str); None for plain files
    ext: str = "jpg"  # encoded format as stored: "jpg" or "png"

    def read_bytes(self) -> bytes:
        if self.member is None:
            return Path(self.container).read_bytes()
        from dynamix_core.data.lmdb_io import read_lmdb_value

        return read_lmdb_value(self.container, self.member)


@dataclass(frozen=True, slots=True)
class RawSample:
    """One image as a parser sees it, before global ids are assigned."""

    dataset: str
    split: str
    source_pid: str | None  # None = unlabeled (LUPerson)
    source_camid: str
    image: ImageRef
    key: str
    domain: str = "multi"
    source_video: str | None = None  # single-camera data only
    source_tracklet: str | None = None  # single-camera data only (video-local)
    frame: int = -1


@dataclass(slots=True)
class Record:
    """One manifest row (SPEC 1.1). ``pid == -1`` = unlabeled."""

    key: str
    dataset: str
    split: str
    pid: int
    camid: int
    video_id: int = -1
    tracklet_id: int = -1
    frame: int = -1
    domain: str = "multi"
    source_pid: str = ""
    source_camid: str = ""

    def to_row(self) -> dict:
        return dataclasses.asdict(self)


class IdentityMap:
    """Deterministic map ``(dataset, source_id) -> int`` built from the sorted unique pairs.

    ``fixed`` keeps earlier ids (a re-ingest of a grown source into the same folder): pairs found
    there keep their id, the other pairs get new ids after the largest earlier one, in sorted
    order. It must be one-to-one; without it the ids are the ranks of the sorted pairs."""

    def __init__(self, pairs: Iterable[tuple[str, str]], fixed: Mapping[tuple[str, str], int] | None = None):
        self.pairs: list[tuple[str, str]] = sorted(set(pairs))
        fixed = fixed or {}
        next_id = max(fixed.values(), default=-1) + 1
        self._index: dict[tuple[str, str], int] = {}
        for p in self.pairs:
            if p in fixed:
                self._index[p] = fixed[p]
            else:
                self._index[p], next_id = next_id, next_id + 1

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, pair: tuple[str, str]) -> int:
        return self._index[pair]

    def get(self, pair: tuple[str, str], default: int = -1) -> int:
        return self._index.get(pair, default)


@dataclass(slots=True)
class IdentityMaps:
    """The three global maps of one source set."""

    pid: IdentityMap
    camid: IdentityMap
    video: IdentityMap
    tracklet: IdentityMap
    #: (dataset, video, tracklet) -> index of the tracklet among its video's sorted tracklets
    tracklet_local: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        per_video: dict[tuple[str, str], list[str]] = {}
        for ds, name in self.tracklet.pairs:
            vid, trk = name.split("/", 1)
            per_video.setdefault((ds, vid), []).append(trk)
        self.tracklet_local = {
            (ds, vid, trk): i
            for (ds, vid), names in per_video.items()
            for i, trk in enumerate(sorted(names))
        }

    @classmethod
    def build(cls, samples: Iterable[RawSample], fixed: Mapping[str, Mapping] | None = None) -> "IdentityMaps":
        """The maps of ``samples``; ``fixed`` (``{"pid"|"camid"|"video": {(dataset, source id): id}}``)
        keeps the ids of an earlier ingest, see :class:`IdentityMap`."""
        samples = list(samples)
        fixed = fixed or {}
        return cls(
            pid=IdentityMap(((s.dataset, s.source_pid) for s in samples if s.source_pid is not None), fixed.get("pid")),
            camid=IdentityMap(((s.dataset, s.source_camid) for s in samples), fixed.get("camid")),
            video=IdentityMap(((s.dataset, s.source_video) for s in samples if s.source_video is not None),
                              fixed.get("video")),
            tracklet=IdentityMap(
                (s.dataset, f"{s.source_video}/{s.source_tracklet}")
                for s in samples if s.source_tracklet is not None
            ),
        )

    def record(self, s: RawSample) -> Record:
        """Global-id :class:`Record` of ``s``. ``tracklet_id`` is video-local (SPEC 1.1): the
        index of the tracklet among its video's sorted tracklet names."""
        video_id = self.video[(s.dataset, s.source_video)] if s.source_video is not None else -1
        tracklet_id = -1
        if s.source_tracklet is not None:
            tracklet_id = self._local_tracklet(s.dataset, s.source_video, s.source_tracklet)
        return Record(
            key=s.key,
            dataset=s.dataset,
            split=s.split,
            pid=self.pid[(s.dataset, s.source_pid)] if s.source_pid is not None else -1,
            camid=self.camid[(s.dataset, s.source_camid)],
            video_id=video_id,
            tracklet_id=tracklet_id,
            frame=s.frame,
            domain=s.domain,
            source_pid=s.source_pid or "",
            source_camid=s.source_camid,
        )

    def _local_tracklet(self, dataset: str, video: str | None, tracklet: str) -> int:
        return self.tracklet_local[(dataset, str(video), tracklet)]


@dataclass(frozen=True, slots=True)
class Problem:
    """One rejected input: the offending path, and why."""

    path: str
    reason: str


class InputReport:
    """Bad input is counted, reported with its path and reason, and skipped - or, with
    ``strict=True``, raises :class:`BadInputError` at the first problem. Never a silent drop."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.problems: list[Problem] = []

    def reject(self, path: str | Path, reason: str) -> None:
        problem = Problem(str(path), reason)
        if self.strict:
            raise BadInputError(f"{problem.path}: {reason} (strict mode; drop --strict to skip and report instead)")
        self.problems.append(problem)

    def note(self, path: str | Path, reason: str) -> None:
        """Count a drop that the dataset's own rules require (Market-1501 junk, pid -1): reported
        like a rejection, but never fatal in strict mode, since every real copy contains such images."""
        self.problems.append(Problem(str(path), reason))

    def extend(self, other: "InputReport") -> None:
        self.problems.extend(other.problems)

    def counts(self) -> Counter:
        """Problems counted by reason category (the text before the first ':')."""
        return Counter(p.reason.split(":", 1)[0] for p in self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def summary(self, limit: int = 20) -> str:
        if not self.problems:
            return "skipped: 0"
        lines = [f"skipped: {len(self.problems)}"]
        for reason, n in sorted(self.counts().items()):
            lines.append(f"  {n:>7}  {reason}")
        for p in self.problems[:limit]:
            lines.append(f"    {p.path}: {p.reason}")
        if len(self.problems) > limit:
            lines.append(f"    ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


class BadInputError(ValueError):
    """Input data is malformed (raised in strict mode, or when nothing usable is left)."""
