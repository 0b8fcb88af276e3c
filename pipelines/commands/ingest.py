"""Convert a source data set into WebDataset shards + parquet manifests, with Ray Data.

    dynamix ingest --format auto --root data/synthreid/multi/synth_m0 --out data/shards/synth_m0
    dynamix ingest --format cuhk03np --option variant=detected --root data/cuhk03-np --out data/shards/cuhk03
    dynamix ingest --root data/market --out s3://bucket/shards/market   # AWS_ENDPOINT_URL etc. for MinIO
    dynamix ingest --root data/market --dataset market   # --out $DYNAMIX_STORAGE_URI/shards/market (the chart's pods)

Re-running the same command resumes an interrupted ingest (finished shards are skipped), retries
shards whose inputs were rejected, and leaves a finished ingest unchanged.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--format", default="auto",
                   help="source format (market1501, dukemtmc, msmt17, cuhk03np, luperson, luperson_nl, randperson, "
                        "manifest) or auto to detect it from the layout")
    p.add_argument("--root", required=True, help="the source data set: its folder (a local path, or an object-store "
                   "URI, copied to a local cache first), or the manifest file")
    p.add_argument("--out", default=None,
                   help="output folder or object-store URI (s3://bucket/prefix, gs://...) for shards and manifests "
                        "(default with --dataset: $DYNAMIX_STORAGE_URI/shards/DATASET where that variable is set)")
    p.add_argument("--dataset", default=None, help="dataset name written into every record (default: the format's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a format-specific parser option, e.g. variant=detected (cuhk03np); repeatable")
    p.add_argument("--strict", action="store_true", help="fail at the first bad input instead of skipping it")
    # defaults live in IngestConfig (not repeated here): None = not given
    p.add_argument("--shard-max-bytes", type=int, default=None, help="target shard size in bytes (default 512 MiB)")
    p.add_argument("--shard-max-count", type=int, default=None, help="maximum images per shard (default 100000)")
    p.add_argument("--workers", type=int, default=None,
                   help="shard writers running at once (Ray tasks; default 2); 0 = write in this process without Ray")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args) -> int:
    from dynamix_core.config import ConfigError
    from pipelines.ingest import IngestConfig, format_result, run_ingest
    from pipelines.runs.listing import storage_root

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. variant=detected")
        options[key] = value
    out = args.out
    if out is None:
        if not (storage_root() and args.dataset):
            raise ConfigError("--out is required, unless DYNAMIX_STORAGE_URI is set and --dataset is given (the "
                              "shards then go to $DYNAMIX_STORAGE_URI/shards/DATASET)")
        out = f"{storage_root()}/shards/{args.dataset}"
        print(f"[ingest] --out {out} (from DYNAMIX_STORAGE_URI)", flush=True)
    given = {name: getattr(args, name) for name in ("shard_max_bytes", "shard_max_count", "workers")}
    cfg = IngestConfig(
        root=args.root, out=out, format=args.format, dataset=args.dataset, options=options,
        strict=args.strict, address=args.address, **{k: v for k, v in given.items() if v is not None},
    )
    result = run_ingest(cfg, progress=not args.no_progress)
    print(format_result(result))
    return 0
