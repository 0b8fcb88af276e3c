"""Shard plans on their way to the writer tasks: the Arrow IPC items of ``ShardPlan.to_item`` against
the JSON rows they replaced, measured in the same run.

    .venv/bin/python benchmarks/bench_ingest_plan.py [--quick] [--rows N] [--out FILE.md]

The ingest driver turns every shard plan into one Ray Data item (``from_items``), so at 10M images
it holds every item at once: bytes per row is the driver's and the object store's cost. Build =
``to_item`` (driver), read = ``from_item`` (writer task). The reference is the former encoding,
written out here: ``json.dumps`` of the plan's rows, and ``json.loads`` back into Records.

Data: LUPerson-NL-like single-camera rows (LMDB members, 480 frames per video) in plans of 100,000
rows, the ingest's default ``shard_max_count``; ``--quick`` is one plan of 20,000 rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_core.data.records import ImageRef, Record  # noqa: E402
from pipelines.ingest import ShardPlan  # noqa: E402


def make_plan(index: int, rows: int) -> ShardPlan:
    samples = []
    for j in range(rows):
        n = index * rows + j
        video, frame = divmod(n, 480)
        samples.append((Record(key=f"lupnl_{video:06d}_{frame:04d}", dataset="luperson_nl", split="train",
                               pid=video * 5 + frame % 5, camid=video, video_id=video, tracklet_id=frame % 5,
                               frame=frame, domain="single", source_pid=f"{video}_{frame % 5}", source_camid=str(video)),
                        ImageRef("/data/luperson_nl/lmdb", f"{video:06d}_{frame:04d}", "jpg"), 20_000 + n % 5000))
    return ShardPlan.from_samples(index, samples)


def json_item(plan: ShardPlan) -> dict:
    """The replaced encoding: the plan's rows as one JSON string."""
    return {"index": plan.index, "plan": json.dumps(plan.to_rows())}


def json_plan(item: dict) -> list:
    """What a writer task got from it: the plan's ``(record, image, size)`` samples."""
    samples = []
    for row in json.loads(item["plan"]):
        image = ImageRef(row.pop("container"), row.pop("member"), row.pop("ext"))
        size = row.pop("bytes")
        samples.append((Record(**row), image, size))
    return samples


def arrow_plan(item: dict) -> list:
    """The same from the Arrow item (``write_planned_shard`` builds them as it writes)."""
    return list(ShardPlan.from_item(item).samples())


def timed(fn, arg):
    t0 = time.perf_counter()
    out = fn(arg)
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one plan of 20,000 rows")
    ap.add_argument("--rows", type=int, default=None, help="rows in all (default 1,000,000 in plans of 100,000)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    per_plan = 20_000 if args.quick else 100_000
    total = args.rows or (per_plan if args.quick else 1_000_000)
    stats = {name: {"bytes": 0, "build": [], "read": []} for name in ("json", "arrow")}
    warm = make_plan(0, 1000)  # first-call costs (pyarrow's IPC and dictionary kernels) outside the timing
    arrow_plan(warm.to_item()), json_plan(json_item(warm))
    for index in range(max(1, total // per_plan)):
        plan = make_plan(index, per_plan)
        for name, build, read in (("json", json_item, json_plan), ("arrow", ShardPlan.to_item, arrow_plan)):
            item, t_build = timed(build, plan)
            back, t_read = timed(read, item)
            if back != list(plan.samples()):
                raise SystemExit(f"{name}: the plan did not round-trip")
            stats[name]["bytes"] += len(item["plan"])
            stats[name]["build"].append(t_build)
            stats[name]["read"].append(t_read)
        print(f"plan {index}: json {stats['json']['build'][-1]:.2f}+{stats['json']['read'][-1]:.2f} s, "
              f"arrow {stats['arrow']['build'][-1]:.2f}+{stats['arrow']['read'][-1]:.2f} s", flush=True)
    rows = len(stats["json"]["build"]) * per_plan
    ref = stats["json"]
    lines = [f"# Shard-plan items: {rows:,} rows in plans of {per_plan:,} (median seconds per plan)", "",
             "| encoding | bytes/row | item MB at 10M rows | build s | read s | bytes vs JSON | build vs JSON | read vs JSON |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("json", "JSON rows (reference, replaced)"), ("arrow", "Arrow IPC (ShardPlan.to_item)")):
        s = stats[name]
        b, r = statistics.median(s["build"]), statistics.median(s["read"])
        lines.append(f"| {label} | {s['bytes'] / rows:.0f} | {s['bytes'] / rows * 1e7 / 1e6:,.0f} | {b:.2f} | {r:.2f} | "
                     f"{s['bytes'] / ref['bytes']:.2f}x | {b / statistics.median(ref['build']):.2f}x | "
                     f"{r / statistics.median(ref['read']):.2f}x |")
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
