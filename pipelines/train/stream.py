"""The Ray Data task behind a trainer's single-camera stream (:func:`pipelines.train.data.ray_video_stream`):
it reads videos of the run's index from their shards (:func:`dynamix_core.data.run_index.read_video`).
Kept apart from :mod:`pipelines.train.data` so that a read task's worker process imports only this
(pyarrow, the shard reader), not the model and training code."""

from __future__ import annotations

import numpy as np

from dynamix_core.data.run_index import read_video


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
