"""Reading one video of the run's index from its shard: the work of the Ray Data tasks behind a
trainer's single-camera stream (:func:`pipelines.train.data.ray_video_stream`) and of a trainer's cache
miss. Kept apart from :mod:`pipelines.train.data` so that a read task's worker process imports
only this (pyarrow, the shard reader), not the model and training code."""

from __future__ import annotations

import numpy as np

from dynamix_core.data.run_index import read_video_rows
from dynamix_core.data.shards import read_members  # validates each tar header before reading


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
