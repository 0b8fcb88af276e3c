"""Reading one video of the run's index from its shard: the work of the Ray Data tasks behind a
trainer's single-camera stream (:func:`pipelines.train.data.ray_video_stream`) and of a trainer's cache
miss. Kept apart from :mod:`pipelines.train.data` so that a read task's worker process imports
only this (pyarrow, the shard reader), not the model and training code."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.parquet as pq

from dynamix_core.data.shards import read_members  # validates each tar header before reading


def _index_file(index_path: str):
    """An open ``pq.ParquetFile`` of the run's index with its row-group starts, cached per process (a
    trainer and a read task's worker open it once; the newest few indexes stay open)."""
    from dynamix_core import storage

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


_INDEX_FILES: dict[str, tuple] = {}
_CACHE_LOCK = threading.Lock()
_OPEN_INDEXES = 4


def read_index_rows(index_path: str, start: int, stop: int, columns: list[str]):
    """Rows ``start .. stop - 1`` of the run's index (``columns`` of them, as a ``pa.Table``), read from
    the row groups holding them only; None or fewer rows when the file does not hold them."""
    pf, starts, lock = _index_file(index_path)
    first = int(np.searchsorted(starts, start, side="right") - 1)
    last = int(np.searchsorted(starts, stop - 1, side="right") - 1)
    if not 0 <= first <= last < pf.metadata.num_row_groups:
        return None
    with lock:  # one file handle: row-group reads do not interleave
        t = pf.read_row_groups(list(range(first, last + 1)), columns=columns)
    return t.slice(start - int(starts[first]), stop - start)


def read_video_rows(index_path: str, video: int, start: int, stop: int, columns: list[str], _retry: bool = True):
    """``columns`` (plus ``video``) of one video's index rows ``start .. stop - 1``, checked to be that
    video. A mismatch is retried once on a freshly opened file (an index rewritten under the same
    name since this process opened it), then fails naming the rows."""
    t = read_index_rows(index_path, start, stop, sorted(set(columns) | {"video"}))
    if t is None or t.num_rows != stop - start or not (t["video"].to_numpy() == video).all():
        if _retry:
            with _CACHE_LOCK:
                _forget(index_path)
            return read_video_rows(index_path, video, start, stop, columns, _retry=False)
        raise RuntimeError(f"{index_path}: rows {start}..{stop - 1} are not video {video}; the index and its "
                           f"videos table disagree (the run's labels/ folder was modified): start a new run.name")
    return t


def read_video(index_path: str, item: dict) -> tuple[list[str], list[bytes]]:
    """Keys and encoded images of one video (``item``: video, row_start, count, tar) in index order:
    its index rows from the row groups holding them, then its members from the shard."""
    s = item["row_start"]
    t = read_video_rows(index_path, item["video"], s, s + item["count"], ["key", "offset", "size"])
    return t["key"].to_pylist(), read_members(item["tar"], t["offset"].to_pylist(), t["size"].to_pylist())


def read_video_batch(batch: dict, index_path: str):
    """Ray Data task: read the videos of a batch of stream positions; one row per video, its keys
    and images pickled into one binary value (an Arrow binary column travels without conversion)."""
    import pickle

    import pyarrow as pa

    out = []
    for video, row_start, count, tar in zip(batch["video"], batch["row_start"], batch["count"], batch["tar"]):
        item = {"video": int(video), "row_start": int(row_start), "count": int(count), "tar": str(tar)}
        out.append(pickle.dumps(read_video(index_path, item), protocol=5))
    return pa.table({"pos": pa.array(np.asarray(batch["pos"], dtype=np.int64)), "data": pa.array(out, pa.binary())})
