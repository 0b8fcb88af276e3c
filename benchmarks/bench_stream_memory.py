"""Driver and trainer memory while streaming the single-camera data, from 100K to 2M rows, against the
replaced design in the same run.

    .venv/bin/python benchmarks/bench_stream_memory.py --rows 100000 500000 2000000 --json bench_results/stream_memory.json
    .venv/bin/python benchmarks/bench_stream_memory.py --quick       # 20K and 100K rows (run_all.py --quick)

``make bench`` runs it at the defaults (100K, 500K and 2M rows: about 15 minutes on 2 cores, 3 GB of
shards in a temporary folder).

For each size a real shard set is written with the project's ``ShardWriter`` (one dataset of
``rows / 480`` videos, ~20 tracker identities per video, 256-byte stand-ins for the JPEGs: the
stream moves bytes and never decodes them; about 21 videos per shard) plus its ``manifest.parquet``.
Then, each in a fresh Python process, so that peak resident memory (``VmHWM``) is that of the
measured work:

* **driver** (``new``): :func:`dynamix_core.data.run_index_writer.write_single_camera_index`, the run's index
  written shard by shard, as ``dynamix train`` does before the workers start;
* **driver** (``reference``): the replaced driver code, the whole manifest turned into Python lists
  and numbered with ``IdentityMap`` (kept here as the reference; it was
  ``pipelines.train.data.single_camera_index`` before the streamed index);
* **trainer** (``new``): rank 0 of 2 as a training worker sets itself up (``RankVideos.load``, its
  int32 label array of every row), then one full pass over its videos through
  :func:`pipelines.train.data.ray_video_stream` (Ray Data tasks on a local Ray reading the tars) into
  a :class:`~dynamix_core.data.train_sets.VideoFeed` with a 64-video cache;
* **trainer** (``reference``): the replaced ``rank_video_rows`` (every image of the rank as Python
  lists) and the same pass read in-process through the same 64-video cache;
* **labeling coordinator** (``new``): its per-video ``VideoTable`` and the chunks of a round over
  every video (ReMix's first round), 64 videos each, built one after another as it sends them;
* **labeling coordinator** (``reference``): the replaced state, the whole index as compact numpy
  columns (~30 bytes a row) plus each video's row array, and the same chunks built from it.
  Neither includes the actors, the label store or the labels read per chunk.

The figures are each process's peak RSS in MB (``VmHWM``) and its peak private memory (sampled
from ``/proc/self/smaps_rollup``; it leaves out the Ray object-store pages the trainer maps while
reading the stream, which are shared memory capped by the stream's ``read_ahead_mb``); ``growth`` is
the largest size's over the smallest's (the goal: within 20 %, memory that does not grow with the images). The Ray Data read tasks run
in Ray's worker processes; their memory is not the trainer's and is not counted.
"""

from __future__ import annotations

import argparse
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

IMAGES_PER_VIDEO = 480
IDS_PER_VIDEO = 20
VIDEOS_PER_SHARD = 21
IMAGE_BYTES = 256


def write_shard_set(root: Path, rows: int) -> None:
    """A single-camera shard set of ``rows`` images in the ingest's format (tars + per-shard manifests +
    ``manifest.parquet``)."""
    import pyarrow as pa

    from dynamix_core.data.records import Record
    from dynamix_core.data.shards import (DATASET_SCHEMA, MANIFEST_NAME, ShardWriter, read_shard_manifest, shard_name,
                                          write_table_atomic)

    root.mkdir(parents=True, exist_ok=True)
    num_videos = -(-rows // IMAGES_PER_VIDEO)
    blob = bytes(range(256)) * (IMAGE_BYTES // 256)
    tables, row = [], 0
    for shard, first in enumerate(range(0, num_videos, VIDEOS_PER_SHARD)):
        path = root / shard_name(shard)
        with ShardWriter(path) as writer:
            for video in range(first, min(num_videos, first + VIDEOS_PER_SHARD)):
                for frame in range(min(IMAGES_PER_VIDEO, rows - row)):
                    person = video * IDS_PER_VIDEO + frame * IDS_PER_VIDEO // IMAGES_PER_VIDEO
                    writer.add(Record(key=f"lupnl_train_{row:09d}", dataset="lupnl", split="train", pid=person,
                                      camid=video, video_id=video, frame=frame, domain="single",
                                      source_pid=f"p{person}"), blob, "jpg")
                    row += 1
            writer.commit({})
        t = read_shard_manifest(path)
        tables.append(t.append_column("shard", pa.array([shard_name(shard)] * t.num_rows)))
    # as the ingest writes it (its row groups bound what a streaming reader decodes at once)
    write_table_atomic(pa.concat_tables(tables).cast(DATASET_SCHEMA), root / MANIFEST_NAME)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    """Resident memory now."""
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``). Not ``ru_maxrss``: on Linux a child keeps the
    ``ru_maxrss`` of the process it was forked from, so every role measured after the benchmark wrote
    a 2M-row shard set reported the benchmark's own ~725 MB."""
    return _status_mb("VmHWM")


class PrivatePeak:
    """Peak private (unshared) resident memory of this process, sampled every 0.2 s from
    ``/proc/self/smaps_rollup``: the trainer maps Ray object-store pages (shared memory) while it
    reads the stream, which the peak RSS counts and this does not."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now_mb() -> float:
        try:
            text = Path("/proc/self/smaps_rollup").read_text()
        except OSError:
            return float("nan")
        kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))
        return kb / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now_mb())
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_mb())


# ------------------------------------------------------------------------------- the measured processes


def driver_new(root: str, out: str) -> dict:
    from dynamix_core.data.run_index_writer import write_single_camera_index

    before = _rss_mb()
    t0 = time.perf_counter()
    info = write_single_camera_index([root], Path(out) / "index.parquet")
    return {"rows": info.num_rows, "seconds": time.perf_counter() - t0, "start_mb": before}


def driver_reference(root: str, out: str) -> dict:
    """The replaced driver: the whole manifest as Python lists, numbered by IdentityMap, sorted, written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import dynamix_core.data.run_index_writer  # noqa: F401  (the same libraries as the new driver loads)
    from dynamix_core.data.reader import read_dataset_manifest
    from dynamix_core.data.records import IdentityMap

    before = _rss_mb()
    t0 = time.perf_counter()
    t = read_dataset_manifest(root).filter(pc.equal(pc.field("domain"), "single"))
    tar = pc.binary_join_element_wise(pa.array([root] * t.num_rows), t["shard"], "/")
    t = t.append_column("tar", tar)
    cols = t.select(["key", "dataset", "video_id", "source_pid", "frame", "tar", "offset", "size"]).to_pydict()
    video_map = IdentityMap(zip(cols["dataset"], map(str, cols["video_id"])))
    label_map = IdentityMap([(d, p) for d, p in zip(cols["dataset"], cols["source_pid"]) if p])
    video = np.array([video_map[(d, str(v))] for d, v in zip(cols["dataset"], cols["video_id"])], dtype=np.int64)
    label = np.array([label_map.get((d, p)) if p else -1 for d, p in zip(cols["dataset"], cols["source_pid"])],
                     dtype=np.int64)
    index = pa.table({"key": cols["key"], "video": video, "label": label, "frame": cols["frame"],
                      "tar": cols["tar"], "offset": cols["offset"], "size": cols["size"]})
    index = index.take(pc.sort_indices(index, [("video", "ascending"), ("frame", "ascending"), ("key", "ascending")]))
    pq.write_table(index, Path(out) / "index.parquet")
    return {"rows": index.num_rows, "seconds": time.perf_counter() - t0, "start_mb": before}


def trainer_new(root: str, out: str) -> dict:
    import itertools

    import pyarrow.parquet as pq
    import ray

    from dynamix_core.data.train_sets import RankVideos, VideoFeed
    from pipelines.train.data import ray_video_stream

    index_path = str(Path(out) / "index.parquet")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    before = _rss_mb()
    t0 = time.perf_counter()
    labels = pq.read_table(index_path, columns=["label"])["label"].to_numpy().astype(np.int32)  # as LabelClient holds
    videos = RankVideos.load(index_path, 0, 2)
    feed = VideoFeed(videos, labels, bank_offset=0, cache_videos=64, stream=ray_video_stream)
    images, first_s = 0, None
    for sample in itertools.islice(feed(0), len(videos)):
        first_s = time.perf_counter() - t0 if first_s is None else first_s
        images += len(feed.images[sample.video_id])
    feed.close()
    ray.shutdown()
    return {"rows": int(len(labels)), "images_read": images, "seconds": time.perf_counter() - t0,
            "first_video_s": first_s, "start_mb": before}


def trainer_reference(root: str, out: str) -> dict:
    """The replaced trainer: every image of the rank as Python lists (``rank_video_rows``), read in-process."""
    from collections import OrderedDict

    import pyarrow as pa
    import pyarrow.parquet as pq

    import ray  # noqa: F401  (the same libraries as the new trainer loads, so the baselines match)

    import pipelines.train.data  # noqa: F401
    from dynamix_core.data.shards import read_members

    index_path = str(Path(out) / "index.parquet")
    before = _rss_mb()
    t0 = time.perf_counter()
    index = pq.read_table(index_path, columns=["key", "video", "label", "frame", "tar", "offset", "size"])
    labels = index["label"].to_numpy().astype(np.int32)
    mask = index["video"].to_numpy() % 2 == 0
    mine = index.filter(pa.array(mask))
    row_ids = np.flatnonzero(mask)
    del index
    video = mine["video"].to_numpy()
    bounds = np.flatnonzero(np.diff(video)) + 1
    cols = mine.select(["key", "frame", "offset", "size", "tar"]).to_pydict()
    rows = [{"video": int(video[s]), "keys": cols["key"][s:e], "frames": cols["frame"][s:e],
             "offsets": cols["offset"][s:e], "sizes": cols["size"][s:e], "tars": cols["tar"][s:e], "rows": row_ids[s:e]}
            for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(video)])]
    cache: OrderedDict = OrderedDict()
    images = 0
    for r in rows:
        cache[r["video"]] = dict(zip(r["keys"], read_members(r["tars"][0], r["offsets"], r["sizes"])))
        images += len(cache[r["video"]])
        while len(cache) > 64:
            cache.popitem(last=False)
    return {"rows": int(len(labels)), "images_read": images, "seconds": time.perf_counter() - t0, "start_mb": before}


def coordinator_new(root: str, out: str) -> dict:
    """The labeling coordinator's index state (``VideoTable``: per video) and the chunks of a round over
    every video (ReMix's first round), 64 videos each, built one after another as the coordinator
    sends them. The actors, the label store and the labels read per chunk are not included."""
    from dynamix_core.data.run_index import VideoTable

    index_path = str(Path(out) / "index.parquet")
    before = _rss_mb()
    t0 = time.perf_counter()
    table = VideoTable(index_path)
    images = 0
    for start in range(0, len(table), 64):
        images += len(table.read_chunk(table.video[start:start + 64])["rows"])
    return {"rows": images, "seconds": time.perf_counter() - t0, "start_mb": before}


def coordinator_reference(root: str, out: str) -> dict:
    """The replaced coordinator: the whole index as compact numpy columns plus each video's row array,
    the same chunks built from them."""
    import pyarrow.parquet as pq

    import dynamix_core.data.run_index_writer  # noqa: F401  (the same libraries as the new coordinator loads)

    index_path = str(Path(out) / "index.parquet")
    before = _rss_mb()
    t0 = time.perf_counter()
    index = pq.read_table(index_path, columns=["video", "frame", "tar", "offset", "size"])
    video = index["video"].to_numpy().astype(np.int64)
    frame = index["frame"].to_numpy().astype(np.int32)
    tar = index["tar"].combine_chunks().dictionary_encode()
    tar_names, tar_code = tar.dictionary.to_pylist(), tar.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    offset, size = index["offset"].to_numpy().astype(np.int64), index["size"].to_numpy().astype(np.int32)
    del index
    order = np.argsort(video, kind="stable")
    bounds = np.flatnonzero(np.diff(video[order])) + 1
    rows_of_video = {int(video[r[0]]): r for r in np.split(order, bounds) if len(r)}
    ids = sorted(rows_of_video)
    images = 0
    for start in range(0, len(ids), 64):
        rows = np.concatenate([rows_of_video[v] for v in ids[start:start + 64]])
        rows = rows[np.argsort(tar_code[rows], kind="stable")]
        chunk = {"frames": frame[rows],  # what the replaced coordinator sent with a chunk
                 "reads": [(tar_names[c], offset[rows[tar_code[rows] == c]].tolist(),
                            size[rows[tar_code[rows] == c]].tolist()) for c in dict.fromkeys(tar_code[rows].tolist())]}
        images += len(chunk["frames"])
    return {"rows": images, "seconds": time.perf_counter() - t0, "start_mb": before}


ROLES = {"driver_new": driver_new, "driver_reference": driver_reference,
         "trainer_new": trainer_new, "trainer_reference": trainer_reference,
         "coordinator_new": coordinator_new, "coordinator_reference": coordinator_reference}


def measure(role: str, root: Path, out: Path) -> dict:
    """Run one role in a fresh process; its figures plus its peak RSS."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--role", role, "--root", str(root), "--work", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} on {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: list[int], work: Path) -> dict:
    results = []
    for rows in sizes:
        root = work / f"shards_{rows}"
        t0 = time.perf_counter()
        write_shard_set(root, rows)
        print(f"[bench] {rows:,} rows: shard set written in {time.perf_counter() - t0:.0f} s", flush=True)
        entry = {"rows": rows}
        for design in ("new", "reference"):
            runs = work / f"run_{rows}_{design}"
            entry[f"driver_{design}"] = measure(f"driver_{design}", root, runs)
            entry[f"trainer_{design}"] = measure(f"trainer_{design}", root, work / f"run_{rows}_new")
            entry[f"coordinator_{design}"] = measure(f"coordinator_{design}", root, work / f"run_{rows}_new")
            print(f"[bench] {rows:,} rows, {design}: driver {entry[f'driver_{design}']['peak_mb']:.0f} MB, "
                  f"trainer {entry[f'trainer_{design}']['peak_mb']:.0f} MB, "
                  f"coordinator {entry[f'coordinator_{design}']['peak_mb']:.0f} MB", flush=True)
        results.append(entry)
    first, last = results[0], results[-1]
    growth = {f"{who}_{design}{suffix}": last[f"{who}_{design}"][key] / first[f"{who}_{design}"][key]
              for who in ("driver", "trainer", "coordinator") for design in ("new", "reference")
              for suffix, key in (("", "peak_mb"), ("_private", "private_peak_mb"))}
    return {"sizes": sizes, "results": results, "growth": growth}


def to_markdown(res: dict) -> str:
    lines = ["Peak RSS (private peak) in MB.", "",
             "| rows | driver (new) | driver (reference) | trainer (new) | trainer (reference) | "
             "driver s (new / ref) | trainer pass s (new, of which to the first video / ref) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]

    def mb(entry: dict) -> str:
        return f"{entry['peak_mb']:.0f} ({entry['private_peak_mb']:.0f})"

    for r in res["results"]:
        lines.append(f"| {r['rows']:,} | {mb(r['driver_new'])} | {mb(r['driver_reference'])} | "
                     f"{mb(r['trainer_new'])} | {mb(r['trainer_reference'])} | "
                     f"{r['driver_new']['seconds']:.1f} / {r['driver_reference']['seconds']:.1f} | "
                     f"{r['trainer_new']['seconds']:.1f}, {r['trainer_new']['first_video_s']:.1f} / "
                     f"{r['trainer_reference']['seconds']:.1f} |")
    g = res["growth"]
    lines.append("")
    lines.append(f"Peak RSS at {res['sizes'][-1]:,} rows over {res['sizes'][0]:,} rows: driver {g['driver_new']:.2f}x "
                 f"(reference {g['driver_reference']:.2f}x), trainer {g['trainer_new']:.2f}x "
                 f"(reference {g['trainer_reference']:.2f}x); private peak: driver {g['driver_new_private']:.2f}x "
                 f"(reference {g['driver_reference_private']:.2f}x), trainer {g['trainer_new_private']:.2f}x "
                 f"(reference {g['trainer_reference_private']:.2f}x). The goal is within 1.20x.")
    lines += ["", "Labeling coordinator (its index state and the chunks of a round over every video, 64 videos "
              "each; actors and store not included), peak RSS (private peak) in MB:", "",
              "| rows | coordinator (new: per video) | coordinator (reference: compact columns per image) | s (new / ref) |",
              "|---:|---:|---:|---:|"]
    for r in res["results"]:
        lines.append(f"| {r['rows']:,} | {mb(r['coordinator_new'])} | {mb(r['coordinator_reference'])} | "
                     f"{r['coordinator_new']['seconds']:.1f} / {r['coordinator_reference']['seconds']:.1f} |")
    lines += ["", f"Coordinator peak RSS growth: {g['coordinator_new']:.2f}x (reference {g['coordinator_reference']:.2f}x); "
              f"private peak {g['coordinator_new_private']:.2f}x (reference {g['coordinator_reference_private']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 500_000, 2_000_000],
                    help="single-camera rows of each shard set (default 100K 500K 2M)")
    ap.add_argument("--quick", action="store_true", help="20K and 100K rows")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:  # one measured process
        private = PrivatePeak()
        figures = ROLES[args.role](args.root, args.work)
        print(json.dumps({**figures, "peak_mb": _peak_rss_mb(), "private_peak_mb": private.stop()}))
        return 0
    sizes = [20_000, 100_000] if args.quick else sorted(args.rows)
    if args.keep:
        result = run(sizes, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
            result = run(sizes, Path(tmp))
    text = to_markdown(result)
    print(text)
    for path, content in ((args.json, json.dumps(result, indent=2)), (args.out, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
