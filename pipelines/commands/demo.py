"""The main job on embedded defaults: generate SynthReID, ingest it, train DynaMix on a local Ray
instance with 2 CPU workers, evaluate on the held-out target domain, log to MLflow (SQLite under
the run folder), register + promote the momentum encoder, and write an HTML report.

    dynamix demo --out runs/demo                        # what `make demo` runs (~17 minutes on 2 cores)
    dynamix demo --out runs/demo --set run.max_steps=1000 --recipe recipes/remix_demo.yaml
    dynamix demo --out runs/demo --address ray://head:10001   # join an existing Ray cluster

Re-running resumes every stage (finished data is kept, the training run continues).
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for data, shards, runs and the report")
    p.add_argument("--recipe", default=None, help="training recipe (default recipes/dynamix_demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value (repeatable)")
    p.add_argument("--synth-set", dest="synth_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a SynthReID generator value (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    p.add_argument("--no-register", action="store_true", help="skip MLflow model registration and promotion")


def run(args) -> int:
    from pipelines.demo import run_demo

    run_demo(Path(args.out), recipe=args.recipe, overrides=args.overrides, address=args.address,
             register=not args.no_register, synth_overrides=args.synth_overrides)
    return 0
