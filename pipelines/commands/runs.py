"""List the training runs under a storage root: status, last step, checkpoints, label versions, metrics.

    dynamix runs                          # runs under ./runs (the default run.storage)
    dynamix runs --storage s3://bucket/dynamix/runs
    dynamix runs --storage runs/demo/runs --json
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--storage", default="runs", help="the runs' root: run.storage of the training config, a folder "
                                                     "or an object-store URI (default: runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")


def run(args) -> int:
    import dataclasses
    import json

    from pipelines.runs import format_runs, list_runs

    runs = list_runs(args.storage)
    if args.json:
        for r in runs:
            print(json.dumps(dataclasses.asdict(r)))
    else:
        print(format_runs(runs, args.storage))
    return 0
