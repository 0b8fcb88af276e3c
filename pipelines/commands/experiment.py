"""Train several recipes under one budget on SynthReID and compare them on the held-out target domain.

    dynamix experiment mixing --steps 800        # multicam, ReMix, DynaMix (what single-camera data adds)
    dynamix experiment recipes --steps 800       # + Cluster-Contrast, DomainMix, CALR (reuses mixing's runs)
    dynamix experiment pretraining --steps 800   # ReMix's pre-training ablation (a)-(f), 3 seeds, mean/std + plot

Each recipe runs with --seeds seeds (default 3); prints one markdown row per recipe (mean ± std of
mAP and Rank-1) and saves the table and a bar plot under OUT/experiments/.
Re-running skips finished recipes and resumes an interrupted one.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    from pipelines import experiment_pretraining
    from pipelines.experiment import SUITES

    p.add_argument("suite", choices=sorted(SUITES) + [experiment_pretraining.SUITE],
                   help="recipes: all six recipes; mixing: multicam, remix, dynamix; pretraining: "
                        "with/without self-supervised pre-training (pipelines/experiment_pretraining.py)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of every recipe (default: the demo budget, "
                   "800; about 11 min per run and seed on 2 idle cores)")
    p.add_argument("--out", default="runs/demo", help="folder of the demo data; runs and tables go to OUT/experiments")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value of every recipe (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    experiment_pretraining.add_arguments(p)  # adds --seeds (shared) and the pre-training options


def run(args) -> int:
    from pipelines.experiment import run_suite

    if args.suite == "pretraining":
        from pipelines.experiment_pretraining import run_ablation

        run_ablation(Path(args.out), steps=args.steps, seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                     overrides=args.overrides, pretrain_overrides=args.pretrain_overrides, address=args.address)
        return 0

    run_suite(args.suite, Path(args.out), steps=args.steps, seeds=args.seeds, overrides=args.overrides,
              address=args.address)
    return 0
