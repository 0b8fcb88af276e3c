"""Train several recipes under one budget on SynthReID and compare them on the held-out target domain.

    dynamix experiment mixing --steps 800        # multicam, ReMix, DynaMix (what single-camera data adds)
    dynamix experiment recipes --steps 800       # + Cluster-Contrast, DomainMix, CALR (reuses mixing's runs)
    dynamix experiment pretraining --steps 800   # ReMix's pre-training ablation (a)-(f), 3 seeds, mean/std + plot
    dynamix experiment mixing --preset real --seeds 5 --steps 800 --json docs/measurements/mixing-real.json

Each recipe runs with --seeds seeds (default 3; seed k sets run.seed and sampler.seed to k: the same
init and data order in every arm); prints one markdown row per recipe (mean ± std of mAP and Rank-1)
and saves the table and a bar plot under OUT/experiments/. The mixing suite adds the paired per-seed
differences (DynaMix and ReMix against multi-camera only, DynaMix against ReMix) with 95 %
t-intervals, and --json writes them with the per-seed mAPs. --preset picks the SynthReID data.
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
                   "800; about 11 min per multi-camera-only run and seed on 2 idle cores, ~1.5x that for the mixing recipes, "
                   "which add 32 video images to the 64 multi-camera ones)")
    from dynamix_core.data.synth.presets import PRESETS

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="SynthReID settings to train and evaluate on (dynamix_core/data/synth/presets.py): demo, or "
                        "real (one 60-identity labelled set, 600 world videos, a 200-identity target)")
    p.add_argument("--out", default=None, help="folder of the data; runs and tables go to OUT/experiments "
                   "(default runs/PRESET, i.e. runs/demo for the demo data)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                   help="mixing suite: also write {preset, steps, seeds, target_mAP per arm in seed order, "
                        "paired_differences} to FILE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value of every recipe (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    experiment_pretraining.add_arguments(p)  # adds --seeds (shared) and the pre-training options


def run(args) -> int:
    from pipelines.experiment import run_suite

    out = Path(args.out or f"runs/{args.preset}")
    if args.suite == "pretraining":
        from pipelines.experiment_pretraining import run_ablation

        run_ablation(out, steps=args.steps, seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                     overrides=args.overrides, pretrain_overrides=args.pretrain_overrides, address=args.address,
                     preset=args.preset)
        return 0

    run_suite(args.suite, out, steps=args.steps, seeds=args.seeds, overrides=args.overrides,
              address=args.address, preset=args.preset, json_path=args.json_path)
    return 0
