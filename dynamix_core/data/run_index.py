"""The index of a training run's single-camera images, read by row range: each video's rows are
contiguous in ``index.parquet`` (written by :mod:`dynamix_core.data.run_index_writer`), and
``index.videos.parquet`` gives each video's first row, row count and shard. The trainers' Ray Data
read tasks, a trainer's cache misses and the labeling coordinator read only the row groups that hold
the rows they need (ranged reads on an object store). Ray-free: the labeling service uses it too."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dynamix_core import storage
from dynamix_core.data.shards import read_members  # validates each tar header before reading


def videos_path(index_path: str | Path) -> str:
    """``index.videos.parquet`` beside ``index.parquet`` (a path or a URI)."""
    text = str(index_path)
    return (text[: -len(".parquet")] if text.endswith(".parquet") else text) + ".videos.parquet"


def _index_file(index_path: str):
    """An open ``pq.ParquetFile`` of the run's index with its row-group starts, cached per process (a
    trainer and a read task's worker open it once; the newest few indexes stay open)."""
    with _CACHE_LOCK:
        cached = _INDEX_FILES.pop(index_path, None)
        if cached is None:
            pf = pq.ParquetFile(storage.open_random(index_path))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            cached = (pf, np.r_[0, np.cumsum(sizes)], threading.Lock())
        _INDEX_FILES[index_path] = cached  # newest last
        while len(_INDEX_FILES) > _OPEN_INDEXES:
            _forget(next(iter(_INDEX_FILES)))
        return cached


def _forget(index_path: str) -> None:
    cached = _INDEX_FILES.pop(index_path, None)
    if cached is not None:
        cached[0].close()
    for k in [k for k in _GROUPS if k[0] == index_path]:
        del _GROUPS[k]


_INDEX_FILES: dict[str, tuple] = {}
_CACHE_LOCK = threading.Lock()
_OPEN_INDEXES = 4
#: the newest decoded row groups, ``(index_path, group, columns) -> pa.Table``: a stream reads its
#: videos in index order, several to a row group, and reads each group once
_GROUPS: dict[tuple, object] = {}
_KEEP_GROUPS = 8


def read_index_rows(index_path: str, start: int, stop: int, columns: list[str]):
    """Rows ``start .. stop - 1`` of the run's index (``columns`` of them, as a ``pa.Table``), read from
    the row groups holding them only; None or fewer rows when the file does not hold them."""
    pf, starts, lock = _index_file(index_path)
    first = int(np.searchsorted(starts, start, side="right") - 1)
    last = int(np.searchsorted(starts, stop - 1, side="right") - 1)
    if not 0 <= first <= last < pf.metadata.num_row_groups:
        return None
    import pyarrow as pa

    parts = []
    for g in range(first, last + 1):
        key = (index_path, g, tuple(columns))
        with _CACHE_LOCK:
            part = _GROUPS.pop(key, None)
        if part is None:
            with lock:  # one file handle: row-group reads do not interleave
                part = pf.read_row_group(g, columns=columns)
        with _CACHE_LOCK:
            _GROUPS[key] = part  # newest last
            while len(_GROUPS) > _KEEP_GROUPS:
                del _GROUPS[next(iter(_GROUPS))]
        parts.append(part)
    t = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
    return t.slice(start - int(starts[first]), stop - start)


def read_checked_rows(index_path: str, start: int, stop: int, video: np.ndarray, columns: list[str],
                      _retry: bool = True):
    """``columns`` (plus ``video``) of index rows ``start .. stop - 1``, checked to belong to the videos
    ``video`` says (one id per row). A mismatch is retried once on a freshly opened file (an index
    rewritten under the same name since this process opened it), then fails naming the rows."""
    t = read_index_rows(index_path, start, stop, sorted(set(columns) | {"video"}))
    if t is None or t.num_rows != stop - start or not np.array_equal(t["video"].to_numpy(), video):
        if _retry:
            with _CACHE_LOCK:
                _forget(index_path)
            return read_checked_rows(index_path, start, stop, video, columns, _retry=False)
        raise RuntimeError(f"{index_path}: rows {start}..{stop - 1} are not video(s) {np.unique(video)[:5].tolist()}; "
                           "the index and its videos table disagree (the run's labels/ folder was modified): "
                           "start a new run.name")
    return t


def read_video_rows(index_path: str, video: int, start: int, stop: int, columns: list[str]):
    """``columns`` (plus ``video``) of one video's index rows ``start .. stop - 1`` (see :func:`read_checked_rows`)."""
    return read_checked_rows(index_path, start, stop, np.full(stop - start, video, dtype=np.int64), columns)


def read_video(index_path: str, item: dict) -> tuple[list[str], list[bytes]]:
    """Keys and encoded images of one video (``item``: video, row_start, count, tar) in index order:
    its index rows from the row groups holding them, then its members from the shard."""
    s = item["row_start"]
    t = read_video_rows(index_path, item["video"], s, s + item["count"], ["key", "offset", "size"])
    return t["key"].to_pylist(), read_members(item["tar"], t["offset"].to_pylist(), t["size"].to_pylist())


def read_video_addresses(index_path: str, item: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, member offsets and sizes of one video's images (``item`` as for :func:`read_video`),
    from the index alone: nothing of the shard is read."""
    s = item["row_start"]
    t = read_video_rows(index_path, item["video"], s, s + item["count"], ["key", "offset", "size"])
    return t["key"].to_pylist(), t["offset"].to_numpy().astype(np.int64), t["size"].to_numpy().astype(np.int64)


class VideoTable:
    """The run's index per video, what the labeling coordinator holds: each video's first row, row
    count and shard (``index.videos.parquet``), sorted by video id; nothing per image. A chunk of
    videos gets its rows' frames, member offsets and sizes (and ground truth) read from the index by
    row range when it is needed (:meth:`read_chunk`)."""

    def __init__(self, index_path: str | Path):
        self.index_path = str(index_path)
        self.has_truth = "truth" in storage.read_schema(self.index_path).names
        table = storage.read_table(videos_path(self.index_path))
        order = np.argsort(table["video"].to_numpy(), kind="stable")
        self.video = table["video"].to_numpy().astype(np.int64)[order]
        self.row_start = table["row_start"].to_numpy().astype(np.int64)[order]
        self.count = table["count"].to_numpy().astype(np.int64)[order]
        tar = table["tar"].combine_chunks().dictionary_encode()  # far fewer shards than videos
        self.tar_names = tar.dictionary.to_pylist()
        self.tar = tar.indices.to_numpy(zero_copy_only=False).astype(np.int32)[order]

    def __len__(self) -> int:
        return len(self.video)

    def read_chunk(self, videos: np.ndarray) -> dict:
        """``rows`` (label addresses), ``video``, ``frames``, ``truth`` (or None) of these videos' images,
        shard by shard, and ``reads``: ``(tar, offsets, sizes)`` per shard in the same order."""
        ords = np.searchsorted(self.video, np.asarray(videos, dtype=np.int64))
        if len(ords) and (ords.max() >= len(self.video) or (self.video[ords] != videos).any()):
            raise KeyError(f"{self.index_path}: videos {sorted(set(np.asarray(videos).tolist()) - set(self.video.tolist()))[:5]} "
                           "are not in the run's index")
        ords = ords[np.lexsort((self.row_start[ords], self.tar[ords]))]  # read order: shard by shard
        columns = ["frame", "offset", "size"] + (["truth"] if self.has_truth else [])
        # videos whose rows follow each other are read as one range: a row group is read once
        breaks = np.flatnonzero(self.row_start[ords][1:] != (self.row_start[ords] + self.count[ords])[:-1]) + 1
        parts = []
        for run in np.split(ords, breaks) if len(ords) else []:
            start = int(self.row_start[run[0]])
            stop = int(self.row_start[run[-1]] + self.count[run[-1]])
            parts.append(read_checked_rows(self.index_path, start, stop, np.repeat(self.video[run], self.count[run]),
                                           columns))
        col = {c: np.concatenate([p[c].to_numpy() for p in parts]) if parts else np.zeros(0, np.int64)
               for c in columns + ["video"]}
        reads, first = [], 0
        for code in dict.fromkeys(self.tar[ords].tolist()):
            n = int(self.count[ords][self.tar[ords] == code].sum())
            reads.append((self.tar_names[code], col["offset"][first:first + n].tolist(),
                          col["size"][first:first + n].tolist()))
            first += n
        rows = np.concatenate([np.arange(self.row_start[o], self.row_start[o] + self.count[o]) for o in ords]) \
            if len(ords) else np.zeros(0, np.int64)
        return {"rows": rows.astype(np.int64), "video": col["video"].astype(np.int64),
                "frames": col["frame"].astype(np.int32), "reads": reads,
                "truth": col["truth"].astype(np.int64) if self.has_truth else None}
