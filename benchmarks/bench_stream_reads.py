"""Bytes read from the single-camera shards per byte of image a batch uses: whole videos (``data.single_reads:
videos``) against the planned images alone (``planned``), in the same run, on an S3 API on loopback.

    .venv/bin/python benchmarks/bench_stream_reads.py --json bench_results/stream_reads.json
    .venv/bin/python benchmarks/bench_stream_reads.py --quick       # fewer videos and steps

The data is shaped like LUPerson-NL: videos of ``--images-per-video`` (480) images with about 20 tracker
identities each, about 20 videos per shard, real JPEGs of 128x64 pixels (a few kB each, as the
crops are), written with the project's ``ShardWriter`` and uploaded to moto's S3 server. A trainer's
real data path then plans and materialises ``--steps`` batches of the DynaMix recipe's single-camera
shape (8 videos x 2 identities x 4 images, a 32-video buffer, 4 uses per video) with the real
sampler, ``VideoFeed`` and ``BatchProducer`` (decode and augmentation included), once per mode.

What is counted, at the storage layer, is what a ranged GET fetches: the spans of
:func:`dynamix_core.storage.read_ranges` after coalescing (tar headers and any gaps included), plus
for ``planned`` the index's row groups a trainer decodes to learn where images lie (their compressed
column chunks, from the parquet metadata). The ``videos`` mode reads in-process with
:func:`dynamix_core.data.train_sets.local_video_stream`, the same ``read_video`` a Ray Data read
task runs in a training worker; Ray Data itself is not started (its tasks read the same bytes, in
other processes). ``used`` is the bytes of the images the batches hold, an image counted each time
a batch holds it. Goal: planned <= 1.5 bytes read per byte used.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

IDS_PER_VIDEO = 20
VIDEOS_PER_SHARD = 20


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 128x64 JPEGs of smooth random colour fields (a few kB each, like person crops)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((64, 128), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(128, 64, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_sets(root: Path, videos: int, images_per_video: int) -> None:
    """A single-camera shard set (``single``) and a small multi-camera one (``multi``) in the ingest's format."""
    import pyarrow as pa

    from dynamix_core.data.records import Record
    from dynamix_core.data.shards import (DATASET_SCHEMA, MANIFEST_NAME, ShardWriter, read_shard_manifest, shard_name,
                                          write_table_atomic)

    blobs = _jpegs(64)

    def write(folder: Path, records) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tables = []
        for shard, chunk in enumerate(records):
            path = folder / shard_name(shard)
            with ShardWriter(path) as writer:
                for rec, blob in chunk:
                    writer.add(rec, blob, "jpg")
                writer.commit({})
            t = read_shard_manifest(path)
            tables.append(t.append_column("shard", pa.array([shard_name(shard)] * t.num_rows)))
        write_table_atomic(pa.concat_tables(tables).cast(DATASET_SCHEMA), folder / MANIFEST_NAME)

    def single_shards():
        row = 0
        for first in range(0, videos, VIDEOS_PER_SHARD):
            chunk = []
            for video in range(first, min(videos, first + VIDEOS_PER_SHARD)):
                for frame in range(images_per_video):
                    person = video * IDS_PER_VIDEO + frame * IDS_PER_VIDEO // images_per_video
                    rec = Record(key=f"lupnl_train_{row:09d}", dataset="lupnl", split="train", pid=person, camid=video,
                                 video_id=video, frame=frame, domain="single", source_pid=f"p{person}")
                    chunk.append((rec, blobs[row % len(blobs)]))
                    row += 1
            yield chunk

    write(root / "single", single_shards())
    multi = [(Record(key=f"mkt_train_{i:06d}", dataset="mkt", split="train", pid=i // 8, camid=i % 4, video_id=0,
                     frame=i, domain="multi", source_pid=f"m{i // 8}", source_camid=f"c{i % 4}"), blobs[i % len(blobs)])
             for i in range(32 * 8)]
    write(root / "multi", [multi])


class Counter:
    """Bytes and requests of the single-camera shards and of the index, counted where they are fetched."""

    def __init__(self):
        import pyarrow.parquet as pq

        from dynamix_core import storage

        self.shard_bytes = self.gets = self.index_bytes = 0
        self._real_coalesce, self._real_group = storage._coalesce, pq.ParquetFile.read_row_group
        counter = self

        def coalesce(ranges, *args, **kw):
            spans = counter._real_coalesce(ranges, *args, **kw)
            counter.gets += len(spans)
            counter.shard_bytes += sum(end - start for start, end, _ in spans)
            return spans

        def read_row_group(pf, i, columns=None, **kw):
            meta = pf.metadata.row_group(i)
            names = [meta.column(c).path_in_schema for c in range(meta.num_columns)]
            counter.index_bytes += sum(meta.column(c).total_compressed_size for c, name in enumerate(names)
                                       if columns is None or name in columns)
            return counter._real_group(pf, i, columns=columns, **kw)

        storage._coalesce = coalesce
        pq.ParquetFile.read_row_group = read_row_group

    def close(self) -> None:
        import pyarrow.parquet as pq

        from dynamix_core import storage

        storage._coalesce, pq.ParquetFile.read_row_group = self._real_coalesce, self._real_group


def measure(mode: str, index_uri: str, multi_uri: str, steps: int, threads: int, gap: int = 0) -> dict:
    """Plan and materialise ``steps`` batches with the real sampler, feed and producer in ``mode``."""
    from dynamix_core.config import load_config
    from dynamix_core.data import run_index
    from dynamix_core.data.train_sets import MultiCameraSet, RankVideos, VideoFeed
    from dynamix_core.data.transforms import TransformConfig
    from dynamix_core.sampling import MixedBatchSampler, SamplerConfig
    from pipelines.train import data

    run_index._GROUPS.clear()
    multi = MultiCameraSet.load([multi_uri])
    videos = RankVideos.load(index_uri, 0, 1)
    labels = np.asarray(__import__("dynamix_core.storage", fromlist=["read_table"]).read_table(
        index_uri, columns=["label"])["label"].to_numpy(), dtype=np.int32)
    cfg = load_config(SamplerConfig, None, ["videos=add", "num_multi_ids=4", "multi_images_per_id=4", "num_videos=8",
                                            "ids_per_video=2", "single_images_per_id=4", "video_buffer_size=32",
                                            "max_video_uses=4"])
    size = {}
    used = []
    real = data.BatchProducer.materialise

    def noting(self, plan, step):
        used.extend(zip(plan.single_video_ids.tolist(), plan.single_refs))
        return real(self, plan, step)

    data.BatchProducer.materialise = noting
    counter = Counter()
    try:
        feed = VideoFeed(videos, labels, multi.num_identities, cache_videos=4 * 32, reads=mode, read_threads=threads,
                         read_gap=gap)
        sampler = MixedBatchSampler(cfg, refs=multi.keys, pids=multi.pid, camids=multi.camid, datasets=multi.dataset,
                                    video_stream=feed, total_steps=steps)
        producer = data.BatchProducer(sampler, multi, feed, TransformConfig(height=128, width=64), seed=1, prefetch=2,
                                      threads=2)
        t0 = time.perf_counter()
        try:
            for _ in range(steps):
                producer.get()
        finally:
            producer.close()
            feed.close()
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
        data.BatchProducer.materialise = real
    from dynamix_core.data.run_index import read_index_rows

    whole = read_index_rows(index_uri, 0, len(labels), ["key", "size"])
    size = dict(zip(whole["key"].to_pylist(), whole["size"].to_pylist()))
    used_bytes = sum(size[k] for _, k in used)
    read = counter.shard_bytes + counter.index_bytes
    return {"mode": mode if mode == "videos" else f"{mode} (gap {gap // 1024} KB)", "gap": gap, "steps": steps, "images_used": len(used), "used_mb": used_bytes / 2**20,
            "shard_mb": counter.shard_bytes / 2**20, "index_mb": counter.index_bytes / 2**20, "gets": counter.gets,
            "bytes_per_used_byte": read / used_bytes, "seconds_per_batch": seconds / steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=200, help="videos of the single-camera set (default 200)")
    ap.add_argument("--images-per-video", type=int, default=480, help="images per video (default 480, LUPerson-like)")
    ap.add_argument("--steps", type=int, default=100, help="batches planned and materialised per mode (default 100)")
    ap.add_argument("--threads", type=int, default=8, help="planned reads: ranged GETs at once (default 8)")
    ap.add_argument("--gaps", type=int, nargs="+", default=[0, 16384, 65536],
                    help="planned reads: bytes between two planned images up to which one GET fetches both (default 0 16384 65536)")
    ap.add_argument("--quick", action="store_true", help="40 videos, 30 steps")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.steps = 40, 30

    import boto3
    import pyarrow.fs as pafs

    from dynamix_core.data.run_index_writer import write_single_camera_index

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # moto's server in a process of its own: in this one it would take the GIL from the reads it serves
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_sets(Path(tmp), args.videos, args.images_per_video)
            fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")
            for name in ("single", "multi"):
                pafs.copy_files(str(Path(tmp) / name), f"bench/{name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
            write_single_camera_index(["s3://bench/single"], "s3://bench/run/index.parquet")
            print(f"[bench] {args.videos} videos x {args.images_per_video} images on loopback S3 "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = [measure("videos", "s3://bench/run/index.parquet", "s3://bench/multi", args.steps, args.threads)]
        rows += [measure("planned", "s3://bench/run/index.parquet", "s3://bench/multi", args.steps, args.threads, gap)
                 for gap in args.gaps]
    finally:
        server.terminate()
        server.wait()
    lines = [f"Single-camera reads, {args.videos} videos x {args.images_per_video} images (128x64 JPEGs), "
             f"{args.steps} batches of 8 videos x 2 ids x 4 images, moto S3 on loopback",
             "", "| reads | images used | used MB | shard MB | index MB | GETs | bytes read / byte used | s / batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['images_used']} | {r['used_mb']:.1f} | {r['shard_mb']:.1f} | "
                     f"{r['index_mb']:.2f} | {r['gets']} | {r['bytes_per_used_byte']:.2f} | {r['seconds_per_batch']:.3f} |")
    lines.append("")
    for r in rows[1:]:
        lines.append(f"{r['mode']}: {rows[0]['bytes_per_used_byte'] / r['bytes_per_used_byte']:.1f}x fewer bytes than "
                     f"whole videos, {r['seconds_per_batch'] / rows[0]['seconds_per_batch']:.2f}x the time per batch")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"videos": args.videos, "images_per_video": args.images_per_video,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
