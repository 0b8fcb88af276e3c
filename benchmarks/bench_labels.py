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

Figures (JSON; the label store is meant for 10M rows, the scale the goals are set at):

* ``commit_s``: median seconds of ``commit`` of one 256-video relabel, called from the driver;
* ``switch_s``: median seconds for a trainer to fetch the delta and apply it;
* ``trainer_label_mb``: a trainer's label state (one int32 per row);
* ``version_disk_mb``: label bytes a version adds on disk (its delta, plus the periodic snapshot
  amortised over ``snapshot_every`` versions); ``centroid_disk_mb``: the centroid file of a version;
* ``store_rss_mb``: the store actor's resident memory at the end (Ray worker baseline included);
* ``reference_*``: the design this replaces, one full parquet table (key, pid, version) per
  version, written and read once here at the same size.

At the identity scale (``--ids``, e.g. ``--rows 10000000 --ids 1000000``) a base of
``--ids`` published identities (ids 0 .. ids-1, ``--dim`` floats each) is written and merged into
the centroid base before the store actor starts (in a child process, through ``LabelTable``), and
the JSON also has:

* ``merge_commit_s``: median seconds of a commit that retires a centroid file (merges it into the base);
* ``lagging_switch_s``: a trainer 9 versions behind (rank 0 of a sharded bank over 8) moving to the latest;
* ``restart_s``: a trainer's start from a checkpoint that pinned a version 5 versions back: the
  checkpoint version's whole table (labels only: the bank comes from the checkpoint), then the
  labels and centroids newer than it (rank 0 of 8); ``full_start_s``: a trainer with no checkpoint
  (the whole table and its eighth of every published centroid), measured after the peaks below;
* ``store_peak_mb``: the store actor's peak RSS after the base is published (it starts on it);
* ``trainer_peak_mb``: the peak RSS of a trainer process (spawned with torch and Ray imported, joined
  to the benchmark's cluster as a driver) after its restart and its lagging switch; ``full_start_trainer_peak_mb``
  the same after a start without a checkpoint;
* ``centroid_disk_mb_per_version``: the centroid file a version adds plus the base's growth per
  version; ``centroid_written_mb_per_version``: bytes written for centroids per version (file,
  rewritten partitions and manifest);
* ``reference_merge_commit_s``: the replaced design's merge (read the whole K x D
  ``centroids-base.npz``, merge one retired file into it, write it whole) at
  ``reference_ids = min(--ids, --reference-ids)`` identities, in a child process
  (``reference_merge_peak_mb``: its peak RSS).
"""

from __future__ import annotations

import argparse
import hashlib
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
#: the identity-scale goals at --rows 10000000 --ids 1000000 (LUPerson-NL: 433K ids; 1M for headroom)
ID_TARGETS = {"merge_commit_s": 2.0, "lagging_switch_s": 2.0, "restart_s": 5.0, "store_peak_mb": 2000.0,
              "trainer_peak_mb": 1000.0, "centroid_disk_mb_per_version": 20.0}
SEED_CHUNK = 65_536  # identities per seeding version


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_base(root: str, pids: np.ndarray, ids: int, dim: int, out) -> None:
    """Version 0 (tracker labels) and ``ids`` identities published and merged into the centroid base
    (child process: the trainer's peak RSS stays its own)."""
    from dynamix_core.labeling import LabelTable

    rng = np.random.default_rng(1)
    table = LabelTable(root, keep_versions=1)
    table.write(0, rows=np.zeros(0, np.int64), pids_after=pids, parent=None, step=0,
                record={"num_identities": max(ids, int(pids.max()) + 1)})
    version = 0
    t0 = time.perf_counter()
    for lo in range(0, ids, SEED_CHUNK):
        chunk = np.arange(lo, min(ids, lo + SEED_CHUNK), dtype=np.int64)
        version += 1
        table.write(version, rows=np.zeros(0, np.int64), pids_after=pids, parent=version - 1, step=version,
                    centroids=(chunk, rng.normal(size=(len(chunk), dim)).astype(np.float32), chunk // IDS_PER_VIDEO),
                    record={"num_identities": max(ids, int(pids.max()) + 1)})
    version += 1  # one version without centroids, so that every seeding file is merged
    table.write(version, rows=np.zeros(0, np.int64), pids_after=pids, parent=version - 1, step=version,
                record={"num_identities": max(ids, int(pids.max()) + 1)})
    table.collect(version)
    out.put({"seed_s": time.perf_counter() - t0, "seed_versions": version, "seed_peak_mb": peak_rss_mb()})


def reference_merge(ids: int, dim: int, retired: int, tmp: str, out) -> None:
    """The replaced design (child process): one whole ``centroids-base.npz`` of ``ids`` identities;
    a commit that retires a centroid file of ``retired`` identities reads it, merges, writes it whole."""
    import io

    from dynamix_core import storage
    from dynamix_core.labeling.label_table import merge_newest

    rng = np.random.default_rng(2)
    path = str(Path(tmp) / "reference-centroids-base.npz")
    np.savez(path, ids=np.arange(ids, dtype=np.int64), centroids=rng.normal(size=(ids, dim)).astype(np.float32),
             videos=np.arange(ids) // IDS_PER_VIDEO, version=np.zeros(ids, np.int64), base_version=np.array(0))
    new_ids = np.sort(rng.choice(ids, size=min(ids, retired), replace=False))
    new = (new_ids, rng.normal(size=(len(new_ids), dim)).astype(np.float32), new_ids // IDS_PER_VIDEO)
    t0 = time.perf_counter()
    base = np.load(path)
    base = {k: base[k] for k in base.files}
    merged = merge_newest(np.concatenate([base["ids"], new[0]]), np.concatenate([base["centroids"], new[1]]),
                          np.concatenate([base["videos"], new[2]]),
                          np.concatenate([base["version"], np.ones(len(new_ids), np.int64)]))
    buf = io.BytesIO()
    np.savez(buf, ids=merged[0], centroids=merged[1].astype(np.float32), videos=merged[2], version=merged[3],
             base_version=np.array(1))
    storage.write_bytes_atomic(path, buf.getvalue())
    out.put({"reference_merge_commit_s": time.perf_counter() - t0, "reference_merge_peak_mb": peak_rss_mb(),
             "reference_ids": ids})
    Path(path).unlink()


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (``VmHWM``; a spawned child's own, unlike ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trainer_child(address: str, store_name: str, lag_at: int, ckpt_at: int, latest: int, out) -> None:
    """Rank 0 of 8 (sharded bank) as a training worker meets the store: a restart from a checkpoint
    that pinned ``ckpt_at`` (``LabelClient.resume``, then its first poll up to ``latest``), and a
    trainer holding ``lag_at`` switching to ``latest``; then a start without a checkpoint (every
    published centroid of its shard). Reports the times, the peak RSS before and after that full
    start, and digests of the label arrays (checked against the benchmark's own)."""
    import torch  # noqa: F401  (a trainer's process holds torch)
    import ray

    from services.label_store import store_actor_name

    ray.init(address=address, logging_level="ERROR", configure_logging=False)
    store = ray.get_actor(store_actor_name(store_name), namespace="dynamix")
    shard = {"rank": 0, "world_size": 8, "sharded": True}
    t0 = time.perf_counter()
    restarted = ray.get(store.changes_since.remote(None, until=ckpt_at, with_centroids=False)).apply(None)
    d = ray.get(store.changes_since.remote(ckpt_at, until=latest, **shard))
    restarted = d.apply(restarted)
    result = {"restart_s": time.perf_counter() - t0, "restart_centroids": int(len(d.centroid_ids)),
              "restarted_sha": hashlib.sha256(restarted.tobytes()).hexdigest()}
    del restarted, d
    lagged = ray.get(store.changes_since.remote(None, until=lag_at, with_centroids=False)).apply(None)
    t0 = time.perf_counter()
    d = ray.get(store.changes_since.remote(lag_at, until=latest, **shard))
    lagged = d.apply(lagged)
    result.update(lagging_switch_s=time.perf_counter() - t0, lagging_full=bool(d.full),
                  lagged_sha=hashlib.sha256(lagged.tobytes()).hexdigest())
    del lagged, d
    result["trainer_peak_mb"] = vm_hwm_mb()
    result["store_peak_mb"] = ray.get(store.resources.remote())["peak_rss_mb"]
    t0 = time.perf_counter()
    d = ray.get(store.changes_since.remote(None, **shard))
    d.apply(None)
    result.update(full_start_s=time.perf_counter() - t0, full_start_centroids=int(len(d.centroid_ids)),
                  full_start_trainer_peak_mb=vm_hwm_mb(),
                  full_start_store_peak_mb=ray.get(store.resources.remote())["peak_rss_mb"])
    ray.shutdown()
    out.put(result)


def in_child(target, *args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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


def base_bytes(root: Path) -> int:
    folder = root / "centroids-base"
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def run(rows: int, rounds: int, dim: int, seed: int = 0, ids: int = 0, reference_ids: int = 200_000) -> dict:
    import ray

    from services.label_store import get_or_create_store

    rng = np.random.default_rng(seed)
    video, pids = tracker_labels(rows)
    num_videos = int(video[-1]) + 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    root = tmp / "labels"
    seeded = {}
    if ids:
        t0 = time.perf_counter()
        seeded = in_child(seed_base, str(root), pids, ids, dim)
        seeded["seed_total_s"] = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    store_name = f"bench-{uuid.uuid4().hex[:8]}"
    store = get_or_create_store(store_name, str(root))
    try:
        t0 = time.perf_counter()
        ray.get(store.initialise.remote(pids))  # a no-op on a seeded store
        init_s = time.perf_counter() - t0
        delta = ray.get(store.changes_since.remote(None, with_centroids=not ids))  # a trainer's start: the whole table
        labels = delta.apply(None)
        held_version = first_version = delta.version
        next_id = max(int(pids.max()) + 1, ids)
        commit_s, switch_s, other_rank_s, delta_mb, cent_mb, snap_mb = [], [], [], [], [], []
        merge_s, base_growth, written_mb, published = [], [], [], []
        lag_at, ckpt_at = None, None
        for r in range(rounds):
            chosen = rng.choice(num_videos, size=min(RELABEL_VIDEOS, num_videos), replace=False)
            sel = np.concatenate([np.arange(v * IMAGES_PER_VIDEO, min(rows, (v + 1) * IMAGES_PER_VIDEO)) for v in chosen])
            new = labels[sel].copy()
            moved = rng.random(len(sel)) < 1 / 3  # split off into 2 new identities per video
            local = np.searchsorted(chosen[np.argsort(chosen)], video[sel])  # 0..255 per chosen video
            new[moved] = next_id + 2 * local[moved] + rng.integers(0, 2, size=int(moved.sum()))
            next_id += 2 * len(chosen)
            ids_v, first = np.unique(new, return_index=True)
            cents = rng.normal(size=(len(ids_v), dim)).astype(np.float32)
            published.append(len(ids_v))
            base_before = base_bytes(root)
            files_before = {p.name: p.stat().st_mtime_ns for p in (root / "centroids-base").glob("*")} \
                if (root / "centroids-base").is_dir() else {}
            t0 = time.perf_counter()
            version = ray.get(store.commit.remote(sel, new, step=100 * (r + 1), centroid_ids=ids_v, centroids=cents,
                                                  centroid_videos=video[sel][first]))
            took = time.perf_counter() - t0
            commit_s.append(took)
            base_growth.append(base_bytes(root) - base_before)
            rewritten = sum(p.stat().st_size for p in (root / "centroids-base").glob("*")
                            if files_before.get(p.name) != p.stat().st_mtime_ns) if (root / "centroids-base").is_dir() else 0
            if rewritten:  # this commit merged a retired centroid file into the base
                merge_s.append(took)
            delta_mb.append((root / f"v{version:08d}.delta.npz").stat().st_size / 2**20)
            snap = root / f"v{version:08d}.snap.npy"
            snap_mb.append(snap.stat().st_size / 2**20 if snap.is_file() else 0.0)
            cent = root / f"v{version:08d}.centroids.npz"
            cent_mb.append(cent.stat().st_size / 2**20 if cent.is_file() else 0.0)
            written_mb.append(cent_mb[-1] + rewritten / 2**20)
            t0 = time.perf_counter()
            delta = ray.get(store.changes_since.remote(held_version, until=version, rank=0, world_size=8, sharded=True))
            labels = delta.apply(labels)
            switch_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # a second rank asking for the same versions (served from the shared copy)
            ray.get(store.changes_since.remote(held_version, until=version, rank=1, world_size=8, sharded=True)).labels()
            other_rank_s.append(time.perf_counter() - t0)
            held_version = version
            if r == rounds - 10:  # a trainer that stops moving here: 9 versions behind at the end
                lag_at = version
            if r == rounds - 6:  # a checkpoint written here pins its version
                ckpt_at = version
                ray.get(store.pin.remote(version, 2))
        ident = {}
        if ids:
            # the trainer is a process of its own (spawned, torch and Ray imported, joined to this
            # cluster): the peak RSS of this one includes the benchmark's own arrays
            ident = in_child(trainer_child, ray.get_runtime_context().gcs_address, store_name, lag_at, ckpt_at,
                             held_version)
            want = hashlib.sha256(labels.tobytes()).hexdigest()
            assert ident.pop("lagged_sha") == want and ident.pop("restarted_sha") == want, "a trainer's labels differ"
        resources = ray.get(store.resources.remote())
        truth = pids.copy()
        final = ray.get(store.changes_since.remote(None, with_centroids=not ids)).apply(None)
        np.testing.assert_array_equal(final, labels)  # the trainer's array equals the store's table
        snapshot_every = 32
        out = {**seeded, **ident, "ids": ids, "first_version": first_version,
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
            "merge_commits": len(merge_s),
            "merge_commit_s": statistics.median(merge_s) if merge_s else None,
            "merge_commit_s_max": max(merge_s) if merge_s else None,
            "centroid_disk_mb_per_version": statistics.mean(cent_mb) + statistics.mean(base_growth) / 2**20,
            "centroid_written_mb_per_version": statistics.mean(written_mb),
        }
    finally:
        ray.kill(store, no_restart=True)
        ray.shutdown()
    out.update(reference_full_table(rows, tmp))
    if ids and reference_ids:
        out.update(in_child(reference_merge, min(ids, reference_ids), dim, int(statistics.median(published)), str(tmp)))
    out["targets_at_10M"] = TARGETS
    out["meets_targets"] = {k: out[k] <= v for k, v in TARGETS.items()}
    if ids:
        out["id_targets_at_10M_1M"] = ID_TARGETS
        out["meets_id_targets"] = {k: out.get(k) is not None and out[k] <= v for k, v in ID_TARGETS.items()}
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
    if r.get("ids"):
        lines += ["", f"Identity scale: a base of {r['ids']:,} published identities (seeded in {r['seed_s']:.1f} s, "
                  f"{r['seed_versions']} versions)", "", "| key | value | goal at 10M rows, 1M ids |", "|---|---:|---:|"]
        for key, goal in ID_TARGETS.items():
            value = r.get(key)
            lines.append(f"| {key} | {'n/a' if value is None else f'{value:.3f}'} | {goal} |")
        for key in ("full_start_s", "full_start_store_peak_mb", "full_start_trainer_peak_mb",
                    "centroid_written_mb_per_version", "reference_merge_commit_s", "reference_merge_peak_mb",
                    "reference_ids"):
            if key in r:
                lines.append(f"| {key} | {r[key]:.3f} | |")
    lines += ["", f"centroid file per version: {r['centroid_disk_mb']:.2f} MB; a second rank's switch "
              f"(shared delta): {r['switch_second_rank_s']:.4f} s; folder at the end (retention on): "
              f"{r['store_disk_mb_end']:.1f} MB; initialise {r['initialise_s']:.2f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="single-camera rows (default 1M; the store is meant for 10M)")
    ap.add_argument("--rounds", type=int, default=12, help="relabel commits measured")
    ap.add_argument("--dim", type=int, default=768, help="centroid width (ViT-B: 768)")
    ap.add_argument("--ids", type=int, default=0, help="identities published before the measured commits "
                    "(the identity-scale goals are set at 1000000); 0: none")
    ap.add_argument("--reference-ids", type=int, default=200_000,
                    help="identities of the replaced whole-base merge measured for reference (capped at --ids; 0: skip)")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="200K rows, 4 commits")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds = 200_000, 4
    if args.ids and args.rounds < 12:
        ap.error("--ids needs --rounds >= 12 (a trainer 9 versions behind, merges after keep_versions=8)")
    result = run(args.rows, args.rounds, args.dim, ids=args.ids, reference_ids=args.reference_ids)
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
