"""List the training runs under a storage root: status, last step, checkpoints, label versions, metrics.

    dynamix runs                          # runs under the default run.storage ($DYNAMIX_STORAGE_URI/runs, else ./runs)
    dynamix runs --storage s3://bucket/dynamix/runs
    dynamix runs --storage runs/demo/runs --json
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--storage", default=None, help="the runs' root: run.storage of the training config, a folder "
                                                   "or an object-store URI (default: $DYNAMIX_STORAGE_URI/runs, else runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")


def run(args) -> int:
    import dataclasses
    import json

    from pipelines.runs.listing import default_runs_root, format_runs, list_runs

    storage = args.storage or default_runs_root()
    runs = list_runs(storage)
    if args.json:
        for r in runs:
            print(json.dumps(dataclasses.asdict(r)))
    else:
        print(format_runs(runs, storage))
    return 0
