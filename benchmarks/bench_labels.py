"""The label store at the mission's scale: what a relabel round costs to commit, what a trainer pays to
switch to it, and what the store holds, against the old full-table-per-version design in the same run.

    .venv/bin/python benchmarks/bench_labels.py --rows 10000000 --json bench_results/labels_10M.json
    .venv/bin/python benchmarks/bench_labels.py --quick            # 200K rows (make bench uses 1M)

Through the public API, on a real local Ray: the label store actor (``get_or_create_store``) is
initialised with ``--rows`` rows over ``rows / 480`` videos (tracker labels: ~20 identities per video),
then ``--rounds`` DynaMix-sized commits of a 256-video relabel (every row of those videos re-set, a
third of them split off into 2 new identities per video; the centroids of every identity of those
videos published, ``--dim`` floats each). After each
commit a trainer moves to the new version as ``LabelClient.poll`` does (``changes_since`` + apply to
its int32 array; the sampler and bank updates of poll are not included).

Figures (JSON, with the targets of issue 13 at 10M rows):

* ``commit_s``: median seconds of ``commit`` of one 256-video relabel, called from the driver;
* ``switch_s``: median seconds for a trainer to fetch the delta and apply it;
* ``trainer_label_mb``: a trainer's label state (one int32 per row);
* ``version_disk_mb``: label bytes a version adds on disk (its delta, plus the periodic snapshot
  amortised over ``snapshot_every`` versions); ``centroid_disk_mb``: the centroid file of a version;
* ``store_rss_mb``: the store actor's resident memory at the end (Ray worker baseline included);
* ``reference_*``: the design this replaces, one full parquet table (key, pid, version) per
  version, written and read once here at the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

IMAGES_PER_VIDEO = 480
IDS_PER_VIDEO = 20
RELABEL_VIDEOS = 256
TARGETS = {"commit_s": 1.0, "switch_s": 0.2, "trainer_label_mb": 100.0, "version_disk_mb": 5.0, "store_rss_mb": 1536.0}


def tracker_labels(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Video of every row (contiguous) and its tracker identity (~20 per video, unique overall)."""
    video = np.arange(rows, dtype=np.int64) // IMAGES_PER_VIDEO
    within = (np.arange(rows) % IMAGES_PER_VIDEO) * IDS_PER_VIDEO // IMAGES_PER_VIDEO
    return video, (video * IDS_PER_VIDEO + within).astype(np.int32)


def reference_full_table(rows: int, tmp: Path) -> dict:
    """The replaced design: every version one parquet of key (str), pid, version for all rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, pids = tracker_labels(rows)
    keys = pa.array(np.char.add("luperson_nl_train_", np.arange(rows).astype("U9")))
    table = pa.table({"key": keys, "pid": pa.array(pids.astype(np.int64)), "version": pa.array(np.zeros(rows, np.int64))})
    path = tmp / "reference.parquet"
    t0 = time.perf_counter()
    pq.write_table(table, path)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = pq.read_table(path)
    read_s = time.perf_counter() - t0
    held = dict(zip(back["key"].to_pylist()[:200_000], back["pid"].to_pylist()[:200_000]))  # a key->pid dict, sampled
    dict_mb = (sys.getsizeof(held) + sum(sys.getsizeof(k) + 28 for k in held)) / 2**20 * rows / len(held)
    return {"reference_commit_s": write_s, "reference_switch_s": read_s, "reference_version_disk_mb": path.stat().st_size / 2**20,
            "reference_trainer_label_mb": dict_mb}


def run(rows: int, rounds: int, dim: int, seed: int = 0) -> dict:
    import ray

    from services.label_store import get_or_create_store

    rng = np.random.default_rng(seed)
    video, pids = tracker_labels(rows)
    num_videos = int(video[-1]) + 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    store = get_or_create_store(f"bench-{uuid.uuid4().hex[:8]}", str(tmp / "labels"))
    try:
        t0 = time.perf_counter()
        ray.get(store.initialise.remote(pids))
        init_s = time.perf_counter() - t0
        delta = ray.get(store.changes_since.remote(None))  # a trainer's start: the whole table
        labels = delta.apply(None)
        held_version = delta.version
        next_id = int(pids.max()) + 1
        commit_s, switch_s, other_rank_s, delta_mb, cent_mb, snap_mb = [], [], [], [], [], []
        for r in range(rounds):
            chosen = rng.choice(num_videos, size=min(RELABEL_VIDEOS, num_videos), replace=False)
            sel = np.concatenate([np.arange(v * IMAGES_PER_VIDEO, min(rows, (v + 1) * IMAGES_PER_VIDEO)) for v in chosen])
            new = labels[sel].copy()
            moved = rng.random(len(sel)) < 1 / 3  # split off into 2 new identities per video
            local = np.searchsorted(chosen[np.argsort(chosen)], video[sel])  # 0..255 per chosen video
            new[moved] = next_id + 2 * local[moved] + rng.integers(0, 2, size=int(moved.sum()))
            next_id += 2 * len(chosen)
            ids, first = np.unique(new, return_index=True)
            cents = rng.normal(size=(len(ids), dim)).astype(np.float32)
            t0 = time.perf_counter()
            version = ray.get(store.commit.remote(sel, new, step=100 * (r + 1), centroid_ids=ids, centroids=cents,
                                                  centroid_videos=video[sel][first]))
            commit_s.append(time.perf_counter() - t0)
            root = tmp / "labels"
            delta_mb.append((root / f"v{version:08d}.delta.npz").stat().st_size / 2**20)
            snap = root / f"v{version:08d}.snap.npy"
            snap_mb.append(snap.stat().st_size / 2**20 if snap.is_file() else 0.0)
            cent = root / f"v{version:08d}.centroids.npz"
            cent_mb.append(cent.stat().st_size / 2**20 if cent.is_file() else 0.0)
            t0 = time.perf_counter()
            delta = ray.get(store.changes_since.remote(held_version, until=version, rank=0, world_size=8, sharded=True))
            labels = delta.apply(labels)
            switch_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # a second rank asking for the same versions (served from the shared copy)
            ray.get(store.changes_since.remote(held_version, until=version, rank=1, world_size=8, sharded=True)).labels()
            other_rank_s.append(time.perf_counter() - t0)
            held_version = version
        resources = ray.get(store.resources.remote())
        truth = pids.copy()
        final = ray.get(store.changes_since.remote(None)).apply(None)
        np.testing.assert_array_equal(final, labels)  # the trainer's array equals the store's table
        snapshot_every = 32
        out = {
            "rows": rows, "videos": num_videos, "rounds": rounds, "dim": dim, "relabel_videos": RELABEL_VIDEOS,
            "rows_per_commit": int(len(sel)), "initialise_s": init_s,
            "commit_s": statistics.median(commit_s), "commit_s_max": max(commit_s),
            "switch_s": statistics.median(switch_s), "switch_s_max": max(switch_s),
            "switch_second_rank_s": statistics.median(other_rank_s),
            "trainer_label_mb": labels.nbytes / 2**20,
            "version_disk_mb": statistics.mean(delta_mb) + 4 * rows / 2**20 / snapshot_every,
            "delta_disk_mb": statistics.mean(delta_mb), "snapshot_mb": 4 * rows / 2**20,
            "centroid_disk_mb": statistics.mean(cent_mb),
            "store_rss_mb": resources["rss_mb"], "store_disk_mb_end": resources["disk_mb"],
            "labels_changed_from_tracker": float((final != truth).mean()),
        }
    finally:
        ray.kill(store, no_restart=True)
        ray.shutdown()
    out.update(reference_full_table(rows, tmp))
    out["targets_at_10M"] = TARGETS
    out["meets_targets"] = {k: out[k] <= v for k, v in TARGETS.items()}
    return out


def to_markdown(r: dict) -> str:
    lines = [f"# Label store, {r['rows']:,} rows, {r['videos']:,} videos, {r['rounds']} commits of "
             f"{r['relabel_videos']} videos ({r['rows_per_commit']:,} rows each), centroids of {r['dim']} floats", "",
             "| figure | row-addressed store | full table per version (reference) | target at 10M |",
             "|---|---:|---:|---:|"]
    pairs = [("commit_s", "reference_commit_s"), ("switch_s", "reference_switch_s"),
             ("trainer_label_mb", "reference_trainer_label_mb"), ("version_disk_mb", "reference_version_disk_mb"),
             ("store_rss_mb", None)]
    for key, ref in pairs:
        lines.append(f"| {key} | {r[key]:.3f} | {'' if ref is None else f'{r[ref]:.3f}'} | {TARGETS[key]} |")
    lines += ["", f"centroid file per version: {r['centroid_disk_mb']:.2f} MB; a second rank's switch "
              f"(shared delta): {r['switch_second_rank_s']:.4f} s; folder at the end (retention on): "
              f"{r['store_disk_mb_end']:.1f} MB; initialise {r['initialise_s']:.2f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="single-camera rows (default 1M; issue 13 targets 10M)")
    ap.add_argument("--rounds", type=int, default=12, help="relabel commits measured")
    ap.add_argument("--dim", type=int, default=768, help="centroid width (ViT-B: 768)")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="200K rows, 4 commits")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds = 200_000, 4
    result = run(args.rows, args.rounds, args.dim)
    text = to_markdown(result)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
