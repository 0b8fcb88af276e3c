"""On-disk formats: Market-1501 folders of JPEG files, and the LUPerson-NL store (``keys.pkl`` +
``lmdb/`` + the SynthReID ``ground_truth.parquet``). Every set is written into a temporary sibling
folder and renamed into place when complete, so a crash never leaves a half-written set behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

GROUND_TRUTH_SCHEMA = pa.schema([
    ("key", pa.string()), ("true_pid", pa.int64()), ("video", pa.int64()), ("tracklet", pa.int64()),
    ("frame", pa.int64()),
])
#: Ground-truth rows buffered before a parquet row group is written.
GT_ROW_GROUP = 1 << 16
#: LMDB reserve per image beyond the expected JPEG size (page and B-tree overhead).
LMDB_OVERHEAD_BYTES = 2048


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A fresh ``.<name>.tmp-<pid>`` folder next to ``final``, renamed to ``final`` on success and
    removed on failure. Leftovers of earlier crashed runs are removed first."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, final)


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class VideoStoreWriter:
    """Writes a LUPerson-NL store under ``root``: JPEGs into ``lmdb/``, then ``keys.pkl`` and
    ``ground_truth.parquet`` on :meth:`close`. Videos stream through; only the key list is kept.

    The LMDB map starts at the expected size (``num_images`` JPEGs of at most half the raw pixel
    bytes each) and doubles whenever it fills, so any scale works without a huge sparse file."""

    def __init__(self, root: Path, num_images: int, height: int, width: int):
        import lmdb  # here, so the synth plans import where lmdb is not installed (the GPU image)

        self._map_full = lmdb.MapFullError
        self.root = root
        map_size = num_images * (height * width * 3 // 2 + LMDB_OVERHEAD_BYTES) + (16 << 20)
        # lock=False: the folder is private to this process until it is renamed into place, and a
        # lock file would hold run-specific bytes.
        self.env = lmdb.open(str(root / "lmdb"), map_size=map_size, subdir=True, lock=False)
        self.keys: list[str] = []
        self.pids: list[int] = []
        self._gt_rows: dict[str, list] = {name: [] for name in GROUND_TRUTH_SCHEMA.names}
        self._gt = pq.ParquetWriter(root / "ground_truth.parquet", GROUND_TRUTH_SCHEMA)

    def add_video(self, video: int, rows: list[tuple[str, int, int, int, int]], jpegs: list[bytes]) -> None:
        """One video: ``rows`` are ``(key, tracker_pid, true_pid, tracklet, frame)`` aligned with ``jpegs``."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for (key, *_), data in zip(rows, jpegs):
                        txn.put(key.encode(), data)
                break
            except self._map_full:
                self.env.set_mapsize(2 * self.env.info()["map_size"])
        for key, tracker_pid, true_pid, tracklet, frame in rows:
            self.keys.append(key)
            self.pids.append(tracker_pid)
            for name, value in zip(GROUND_TRUTH_SCHEMA.names, (key, true_pid, video, tracklet, frame)):
                self._gt_rows[name].append(value)
        if len(self._gt_rows["key"]) >= GT_ROW_GROUP:
            self._flush_ground_truth()

    def _flush_ground_truth(self) -> None:
        self._gt.write_table(pa.table(self._gt_rows, schema=GROUND_TRUTH_SCHEMA))
        self._gt_rows = {name: [] for name in GROUND_TRUTH_SCHEMA.names}

    def close(self) -> None:
        if self._gt_rows["key"]:
            self._flush_ground_truth()
        self._gt.close()
        self.env.sync()
        self.env.close()
        with open(self.root / "keys.pkl", "wb") as fh:
            pickle.dump({"keys": self.keys, "pids": self.pids}, fh, protocol=4)
