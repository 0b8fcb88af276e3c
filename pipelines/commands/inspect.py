"""Summarise an ingested shard set: images per dataset/split/domain, identities, cameras, videos,
shard count and sizes, the ingest's skipped inputs, and any label tables.

    dynamix inspect data/shards/synth_m0
    dynamix inspect data/shards/synth_video --labels runs/r1/labels.parquet --json
    dynamix inspect s3://bucket/shards/synth_m0
    dynamix inspect data/shards/synth_m0 --verify

``--verify`` re-reads every shard: its size and SHA-256 against its manifest, the tar structure
(a truncated tar is named), and a full, strict decode of every image; each problem is one line
naming the shard (and key), and the command exits 1 when there is any.

Label tables are read from DIR/labels/*.parquet and from each --labels file.
"""

from __future__ import annotations

import json
from pathlib import Path

LABELS_DIR = "labels"


def add_arguments(p) -> None:
    p.add_argument("dir", help="an ingest output folder or object-store URI (holding manifest.parquet)")
    p.add_argument("--labels", action="append", default=[], metavar="FILE",
                   help="a label table (parquet key, pid, version) to summarise too; repeatable")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true",
                   help="re-read every shard: size and SHA-256 against its manifest, tar structure, a strict full decode "
                        "of every image; one line per problem, exit status 1 when there is any")


def verify_shard_set(root: str | Path) -> list[str]:
    """One line per problem found by re-reading every shard of the set at ``root``."""
    from dynamix_core import storage
    from dynamix_core.data.images import image_problem
    from dynamix_core.data.reader import read_dataset_manifest
    from dynamix_core.data.records import InputReport
    from dynamix_core.data.shards import iter_tar_samples, set_shard_paths, shard_damage

    problems = []
    manifest = read_dataset_manifest(root)
    for shard in dict.fromkeys(manifest.column("shard").to_pylist()):
        tar, shard_manifest = set_shard_paths(root, shard)
        if not storage.exists(tar):
            problems.append(f"{tar}: missing; re-run `dynamix ingest` on the set's source")
            continue
        raw = storage.read_schema(shard_manifest).metadata or {} if storage.exists(shard_manifest) else {}
        meta = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}
        damage = shard_damage(tar, meta)
        if damage is not None:
            problems.append(f"{tar}: damaged: {damage}; re-run `dynamix ingest` on the set's source to rewrite it")
        report = InputReport()
        for record, data, _ in iter_tar_samples(tar, report):
            reason = image_problem(data)
            if reason is not None:
                problems.append(f"{tar}: image {record.key}: {reason}")
        problems += [f"{p.path}: {p.reason}" for p in report.problems]
    return problems


def inspect_shard_set(root: str | Path, label_files: list[str | Path]) -> dict:
    """The summary of the shard set at ``root`` (a folder or a URI) as plain data."""
    import pyarrow.compute as pc

    from dynamix_core import storage
    from dynamix_core.data.reader import read_dataset_manifest
    from dynamix_core.data.shards import SUMMARY_NAME, shard_sizes

    manifest = read_dataset_manifest(root)

    def distinct(table, column: str) -> int:  # distinct (dataset, id) pairs, -1 (none) excluded
        return table.filter(pc.field(column) != -1).group_by(["dataset", column]).aggregate([]).num_rows

    groups = []
    for key in manifest.group_by(["dataset", "split", "domain"]).aggregate([]).sort_by(
        [("dataset", "ascending"), ("split", "ascending"), ("domain", "ascending")]
    ).to_pylist():
        part = manifest.filter(
            (pc.field("dataset") == key["dataset"]) & (pc.field("split") == key["split"])
            & (pc.field("domain") == key["domain"])
        )
        groups.append({**key, "images": part.num_rows, "identities": distinct(part, "pid"),
                       "cameras": distinct(part, "camid"), "videos": distinct(part, "video_id")})

    shard_names = list(dict.fromkeys(manifest.column("shard").to_pylist()))
    sizes = shard_sizes(root, shard_names)  # a listing per split folder, not a request per shard on an object store
    missing = [name for name in shard_names if name not in sizes]
    if missing:
        raise FileNotFoundError(f"{root}: shards {missing[:3]} of its manifest are missing; re-run the ingest")
    shard_bytes = sorted(sizes[name] for name in shard_names)
    summary_path = storage.join(root, SUMMARY_NAME)
    ingest = json.loads(storage.read_bytes(summary_path)) if storage.exists(summary_path) else {}

    label_dir = storage.join(root, LABELS_DIR)
    tables = [storage.join(label_dir, n) for n in sorted(storage.listdir(label_dir)) if n.endswith(".parquet")]
    tables += list(label_files)
    keys = manifest.column("key")
    labels = []
    for path in tables:
        table = storage.read_table(path, columns=["key", "pid", "version"])
        labels.append({
            "path": str(path), "rows": table.num_rows,
            "versions": pc.count_distinct(table.column("version")).as_py(),
            "latest_version": pc.max(table.column("version")).as_py(),
            "identities": pc.count_distinct(table.filter(pc.field("pid") != -1).column("pid")).as_py(),
            "keys_in_set": pc.sum(pc.is_in(keys, value_set=pc.unique(table.column("key")))).as_py() or 0,
        })

    return {
        "dir": str(root),
        "format": ingest.get("format"),
        "images": manifest.num_rows,
        "identities": distinct(manifest, "pid"),
        "cameras": distinct(manifest, "camid"),
        "videos": distinct(manifest, "video_id"),
        "groups": groups,
        "shards": {
            "count": len(shard_names), "total_bytes": sum(shard_bytes),
            "min_bytes": shard_bytes[0] if shard_bytes else 0,
            "median_bytes": shard_bytes[len(shard_bytes) // 2] if shard_bytes else 0,
            "max_bytes": shard_bytes[-1] if shard_bytes else 0,
        },
        "skipped": ingest.get("skipped"),
        "skipped_by_reason": ingest.get("skipped_by_reason", {}),
        "label_tables": labels,
    }


def format_summary(s: dict) -> str:
    mib = 2**20
    lines = [
        f"{s['dir']}  ({s['format'] or 'format unknown'})",
        f"images: {s['images']}  identities: {s['identities']}  cameras: {s['cameras']}  videos: {s['videos']}",
        "",
        f"{'dataset':<20} {'split':<8} {'domain':<10} {'images':>9} {'ids':>7} {'cams':>5} {'videos':>7}",
    ]
    for g in s["groups"]:
        lines.append(f"{g['dataset']:<20} {g['split']:<8} {g['domain']:<10} {g['images']:>9} "
                     f"{g['identities']:>7} {g['cameras']:>5} {g['videos']:>7}")
    sh = s["shards"]
    lines += ["", f"shards: {sh['count']}, {sh['total_bytes'] / mib:.1f} MiB (min {sh['min_bytes'] / mib:.1f}, "
                  f"median {sh['median_bytes'] / mib:.1f}, max {sh['max_bytes'] / mib:.1f} MiB)"]
    if s["skipped"] is not None:
        lines.append(f"skipped at ingest: {s['skipped']}")
        lines += [f"  {n:>7}  {reason}" for reason, n in s["skipped_by_reason"].items()]
    for t in s["label_tables"]:
        lines.append(f"label table {t['path']}: {t['rows']} rows, {t['identities']} identities, "
                     f"versions {t['versions']} (latest {t['latest_version']}), {t['keys_in_set']} images of this set")
    return "\n".join(lines)


def run(args) -> int:
    from dynamix_core import storage

    root = args.dir if storage.is_remote(args.dir) else Path(args.dir)
    summary = inspect_shard_set(root, args.labels)
    if args.verify:
        summary["verify_problems"] = verify_shard_set(root)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.verify and not args.json:
        problems = summary["verify_problems"]
        print("\n".join(problems) if problems else "verify: every shard matches its manifest and every image decodes")
    return 1 if args.verify and summary["verify_problems"] else 0
