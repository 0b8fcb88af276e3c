"""Memory of ingest planning on a LUPerson-NL store, per image, against the input list itself.

    .venv/bin/python benchmarks/bench_ingest_memory.py --rows 100000 400000 --json bench_results/ingest_memory.json
    .venv/bin/python benchmarks/bench_ingest_memory.py --quick        # 20K and 100K rows (run_all.py --quick)

Ingest planning must hold memory that grows with the identities and videos, not with a list of
Python objects per image; LUPerson-NL is the set where that matters, being large (10M images). For each size a real LUPerson-NL store is written (``keys.pkl`` with keys and tracker
pids, an LMDB whose values are 32-byte stand-ins for the JPEGs: planning reads their sizes, never
their bytes), with ``rows / 480`` videos and ~23 images per tracklet, the shape of the real set
(10.7M images, 21K videos, 433K identities). Then, each in a fresh Python process, so that the peak
resident memory (``VmHWM``) is that of the measured work:

* **plan**: what ``dynamix ingest`` does before it writes any shard, with the project's functions:
  :func:`pipelines.ingest.plan_ingest` (parse, identity maps, shard plans) and :func:`write_plan`
  (the ``plan.parquet`` of a fresh output folder), with the default shard limits;
* **reference** (``keys``): only loading ``keys.pkl`` with ``pickle`` (the Python lists of keys and
  pids), what a planner that unpickles this format holds at least. The planner streams the file
  instead (``dynamix_core/data/pickle_stream.py``), so this is a yardstick, not a floor.

Reported: peak RSS above the process's RSS after its imports, in MB and bytes per image, the plan's
ratio to the reference, and the time of each. The planner is columnar (Arrow tables, numpy codes)
but still O(images): the unpickled keys while they are read, the sample table and the plan table.
Bytes per image is therefore the figure to watch, and ``at 10M`` extrapolates it linearly. Then, in
the same process, the Ray Data item of every shard (``ShardPlan.to_item``), which ``_run_ray`` builds
and holds while the shards are written (it builds them a window of shards at a time; all of them
here, an upper bound). Then **re-plan**: the same planning again into that folder, which now holds
``plan.parquet`` (a scheduled re-ingest of a source: the earlier plan is read and matched by key).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

IMAGES_PER_VIDEO = 480
IMAGES_PER_TRACKLET = 23
VALUE = b"\xff\xd8" + b"\0" * 28 + b"\xff\xd9"  # 32 bytes; planning reads the length only


def write_store(root: Path, rows: int) -> None:
    """A LUPerson-NL store of ``rows`` images (SPEC 1.2: keys.pkl {"keys", "pids"} + lmdb/)."""
    import lmdb

    keys, pids = [], []
    for i in range(rows):
        video, frame = divmod(i, IMAGES_PER_VIDEO)
        tracklet = frame // IMAGES_PER_TRACKLET
        keys.append(f"{video:05d}_{tracklet:06d}_{frame:07d}_00")
        pids.append(video * 100 + tracklet)
    (root / "lmdb").mkdir(parents=True)
    env = lmdb.open(str(root / "lmdb"), map_size=rows * 256 + (64 << 20))
    with env.begin(write=True) as txn:
        for key in keys:
            txn.put(key.encode(), VALUE)
    env.close()
    with open(root / "keys.pkl", "wb") as fh:
        pickle.dump({"keys": keys, "pids": pids}, fh, protocol=4)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(role: str, store: str, out: str) -> dict:
    """One role in this (fresh) process: peak RSS above the RSS after imports, and seconds."""
    import pyarrow  # noqa: F401  (imported before the baseline, as the planner imports it)

    from dynamix_core.data.parsers.luperson import load_keys_pickle
    from dynamix_core.data.records import InputReport
    from pipelines.ingest import PLAN_NAME, IngestConfig, plan_ingest, write_plan

    base = _rss_mb()
    t0 = time.perf_counter()
    if role == "keys":
        held = load_keys_pickle(Path(store) / "keys.pkl")
        rows = len(held["keys"])
    else:
        cfg = IngestConfig(root=Path(store), out=out, format="luperson_nl", dataset="lupnl")
        _, _, previous, plans = plan_ingest(cfg, InputReport(strict=False))  # what run_ingest does first
        Path(out).mkdir(parents=True, exist_ok=True)
        write_plan(plans, Path(out) / PLAN_NAME, previous, **cfg.shard_limits)
        rows = sum(len(p) for p in plans)
    seconds = time.perf_counter() - t0
    peak = _peak_mb()
    result = {"role": role, "rows": rows, "peak_mb": round(peak - base, 1), "seconds": round(seconds, 2)}
    if role == "plan":  # then the Ray Data items of every shard, which _run_ray builds and holds while writing
        items = [p.to_item() for p in plans]
        result["items_mb"] = round(sum(len(i["plan"]) for i in items) / 2**20, 1)
        result["with_items_peak_mb"] = round(_peak_mb() - base, 1)
    return result


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: a child keeps the ru_maxrss of the process it was forked from
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 1024


def run_role(role: str, store: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--store", str(store), "--plan-out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if done.returncode != 0:
        raise SystemExit(f"bench_ingest_memory: {role} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 400_000], help="store sizes (images)")
    ap.add_argument("--quick", action="store_true", help="20K and 100K rows")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--role", choices=["keys", "plan"], help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--plan-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        print(json.dumps(measure(args.role, args.store, args.plan_out)))
        return 0

    sizes = [20_000, 100_000] if args.quick else args.rows
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ingest_memory_") as tmp:
        for rows in sizes:
            store = Path(tmp) / f"store{rows}"
            t0 = time.perf_counter()
            write_store(store, rows)
            print(f"[bench] {rows:,} rows: store written in {time.perf_counter() - t0:.0f} s", flush=True)
            ref = run_role("keys", store, Path(tmp) / f"out{rows}")
            plan = run_role("plan", store, Path(tmp) / f"out{rows}")
            replan = run_role("plan", store, Path(tmp) / f"out{rows}")  # the folder now holds plan.parquet
            if plan["rows"] != rows:
                raise SystemExit(f"bench_ingest_memory: planned {plan['rows']} of {rows} rows")
            results.append({"rows": rows, "keys_mb": ref["peak_mb"], "plan_mb": plan["peak_mb"],
                            "keys_bytes_per_row": round(ref["peak_mb"] * 2**20 / rows),
                            "plan_bytes_per_row": round(plan["peak_mb"] * 2**20 / rows),
                            "plan_over_keys": round(plan["peak_mb"] / max(ref["peak_mb"], 1e-9), 2),
                            "items_mb": plan["items_mb"], "with_items_mb": plan["with_items_peak_mb"],
                            "replan_mb": replan["peak_mb"], "replan_s": replan["seconds"],
                            "keys_s": ref["seconds"], "plan_s": plan["seconds"]})
            print(f"[bench] {results[-1]}", flush=True)
            for p in Path(tmp).glob(f"*{rows}"):
                shutil.rmtree(p)
    lines = ["# Ingest planning memory on a LUPerson-NL store (peak RSS above the process's start)", "",
             "| rows | reference: keys.pkl loaded, MB (B/row) | plan, MB (B/row) | plan / reference | at 10M rows | "
             "plan s | + Ray items, MB (items' bytes) | re-plan, MB (s) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['keys_mb']:.0f} ({r['keys_bytes_per_row']}) | {r['plan_mb']:.0f} "
                     f"({r['plan_bytes_per_row']}) | {r['plan_over_keys']:.2f}x | "
                     f"{r['plan_bytes_per_row'] * 10_000_000 / 2**30:.1f} GB | {r['plan_s']:.1f} | "
                     f"{r['with_items_mb']:.0f} ({r['items_mb']:.0f}) | {r['replan_mb']:.0f} ({r['replan_s']:.1f}) |")
    lines += ["", "plan = plan_ingest + write_plan (pipelines/ingest.py), each role in a fresh process; "
              "+ Ray items = the peak after also building every shard's Ray Data item (ShardPlan.to_item) "
              "(the driver builds them SHARDS_PER_WORKER x workers shards at a time; all of them here); "
              "re-plan = the same into the folder that now holds plan.parquet (a scheduled re-ingest)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
