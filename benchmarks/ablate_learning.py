"""One row of the learning ablations of docs/learning.md (not part of ``make bench``: a row trains
for minutes).

A recipe (default: the multi-camera demo recipe) trained by the local runner
(:mod:`pipelines.train.local`: the engine, step, sampler, prefetching and centroid refreshes of a
Ray Train worker, in one process) on the three multi-camera shard sets of an existing
``dynamix demo`` folder; then the in-domain (synth_m0) and target mAP of the momentum encoder f~
with the project's evaluation, next to the colour histogram on the same images.

    .venv/bin/python benchmarks/ablate_learning.py --steps 1500 \\
        --set data.transform.height=64 --set data.transform.width=32 --set model.img_size=[64,32] \\
        --set model.num_stripes=2 --set model.ibn=true
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

SETS = ("synth_m0", "synth_m1", "synth_m2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="runs/demo/shards", help="the shard folder of a `dynamix demo` run (SynthReID)")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "multicam_baseline_demo.yaml"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="run.seed and sampler.seed (init and data order)")
    args = ap.parse_args()

    import torch

    from dynamix_core.config import load_config
    from pipelines.train.config import TrainConfig
    from dynamix_core.evaluation.target import TargetSet, colour_baseline, evaluate_target
    from pipelines.train.local import train_local

    torch.set_num_threads(args.threads)
    shards = Path(args.shards)
    if not (shards / SETS[0]).is_dir():
        print(f"ablate_learning: {shards / SETS[0]} not found: run `make demo` first or pass --shards", file=sys.stderr)
        return 2
    cfg = load_config(TrainConfig, args.recipe, [
        f"run.max_steps={args.steps}", f"run.log_every={args.steps}", f"run.checkpoint_every={args.steps}",
        "run.eval_every=0", f"run.seed={args.seed}", f"sampler.seed={args.seed}", "scaling.num_workers=1",
        f"data.multi=[{','.join(str(shards / s) for s in SETS)}]", "data.target=null", *args.overrides])
    t0 = time.perf_counter()
    run = train_local(cfg)
    row = {"steps": args.steps, "seed": args.seed, "overrides": args.overrides,
           "train_seconds": round(time.perf_counter() - t0)}
    size = (cfg.data.transform.height, cfg.data.transform.width)
    for name, root in (("in_domain", shards / SETS[0]), ("target", shards / "synth_target")):
        target = TargetSet.load(str(root), cfg.data.transform)
        row[f"{name}_mAP"] = evaluate_target(run.encoder, target, cfg.eval, torch.device("cpu"))["mAP"]
        row[f"{name}_colour_mAP"] = float(colour_baseline(target, size)["mAP"])
    print(json.dumps(row))
    print(f"| {' '.join(args.overrides) or 'recipe'} | {args.steps} | {row['train_seconds']} | "
          f"{100 * row['in_domain_mAP']:.1f} | {100 * row['target_mAP']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
