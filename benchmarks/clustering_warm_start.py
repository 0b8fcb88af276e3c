"""The clustering recipes from a warm start (docs/learning.md section 9; not part of ``make bench``:
it trains for an hour on the 2-core box).

Cluster-Contrast, DomainMix and CALR begin by clustering the features of their encoder. From a
random encoder those clusters are noise (from scratch they stay near chance on SynthReID,
docs/learning.md section 5); their papers start from ImageNet weights. Here, per seed, the
warm start is the multi-camera baseline trained by the local runner (``--base-steps``, its
recipe as shipped), and each clustering recipe is fine-tuned from its momentum encoder
(``model.weights``, ``--steps``, the papers' Adam learning rate 3.5e-4) on the engine the service
runs (:func:`pipelines.train.local.train_local`). Reported per seed, all on the held-out target of
the same data: the colour histogram (the bar a learned model must clear), the warm start, and
every recipe. Each row is written to ``--out`` as it finishes; a re-run skips finished rows.

    .venv/bin/python benchmarks/clustering_warm_start.py --shards /path/to/demo/shards --seeds 3 --out runs/warm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

MULTI = ("synth_m0", "synth_m1", "synth_m2")
RECIPES = {"cluster_contrast": "cluster_contrast_demo.yaml", "domainmix": "domainmix_demo.yaml",
           "calr": "calr_demo.yaml"}
#: the papers' optimiser setting for a pre-trained start (Adam, 3.5e-4)
FINE_TUNE = ["optim.lr=3.5e-4"]


def _config(recipe: Path, shards: Path, steps: int, seed: int, extra: list[str]):
    from dynamix_core.config import load_config
    from pipelines.train.config import TrainConfig

    return load_config(TrainConfig, recipe, [
        f"run.max_steps={steps}", f"run.log_every={max(1, steps // 4)}", f"run.checkpoint_every={steps}",
        "run.eval_every=0", f"run.seed={seed}", f"sampler.seed={seed}", "scaling.num_workers=1",
        f"data.multi=[{','.join(str(shards / s) for s in MULTI)}]", f"data.single=[{shards / 'synth_video'}]",
        "data.target=null", *extra])


def target_map(encoder, shards: Path, cfg) -> float:
    import torch

    from dynamix_core.evaluation.target import TargetSet, evaluate_target

    target = TargetSet.load(str(shards / "synth_target"), cfg.data.transform)
    return float(evaluate_target(encoder, target, cfg.eval, torch.device("cpu"))["mAP"])


def colour_map(shards: Path, transform) -> float:
    from dynamix_core.evaluation.target import TargetSet, colour_baseline

    target = TargetSet.load(str(shards / "synth_target"), transform)
    return float(colour_baseline(target, (transform.height, transform.width))["mAP"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="runs/demo/shards", help="the shard folder of a `dynamix demo` run (SynthReID)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (init and data order of every run)")
    ap.add_argument("--base-steps", type=int, default=600, help="steps of the multi-camera warm start")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each clustering recipe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/clustering-warm-start", help="folder of the warm starts and rows.jsonl")
    args = ap.parse_args()

    import torch

    from dynamix_core.model import save_weights
    from pipelines.train.local import train_local

    torch.set_num_threads(args.threads)
    shards, out = Path(args.shards).resolve(), Path(args.out).resolve()
    if not (shards / MULTI[0]).is_dir():
        print(f"clustering_warm_start: {shards / MULTI[0]} not found: run `make demo` first or pass --shards",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["seed"], r["row"]): r for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.is_file() else {}

    def record(row: dict) -> None:
        done[(row["seed"], row["row"])] = row
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[warm-start] seed {row['seed']} {row['row']}: target mAP {100 * row['target_mAP']:.1f} "
              f"({row.get('train_seconds', 0)} s)", flush=True)

    recipes = REPO / "recipes"
    for seed in range(args.seeds):
        base_cfg = _config(recipes / "multicam_baseline_demo.yaml", shards, args.base_steps, seed, [])
        weights = out / f"multicam-s{seed}-{args.base_steps}.safetensors"
        if (seed, "colour") not in done:
            record({"seed": seed, "row": "colour", "target_mAP": colour_map(shards, base_cfg.data.transform)})
        if not weights.is_file() or (seed, "warm_start") not in done:
            t0 = time.perf_counter()
            run = train_local(base_cfg)
            save_weights(getattr(run.encoder, "model", run.encoder), weights)  # the momentum encoder f~ itself
            record({"seed": seed, "row": "warm_start", "steps": args.base_steps,
                    "train_seconds": round(time.perf_counter() - t0),
                    "target_mAP": target_map(run.encoder, shards, base_cfg)})
        for name, recipe in RECIPES.items():
            if (seed, name) in done:
                continue
            cfg = _config(recipes / recipe, shards, args.steps, seed,
                          [f"model.weights={weights}", "model.weights_scope=encoder", *FINE_TUNE])
            t0 = time.perf_counter()
            run = train_local(cfg)
            record({"seed": seed, "row": name, "steps": args.steps, "train_seconds": round(time.perf_counter() - t0),
                    "target_mAP": target_map(run.encoder, shards, cfg)})
    rows = ["colour", "warm_start", *RECIPES]
    print(f"| seed | {' | '.join(rows)} |")
    print("|---|" + "---:|" * len(rows))
    for seed in range(args.seeds):
        cells = [f"{100 * done[(seed, r)]['target_mAP']:.1f}" if (seed, r) in done else "-" for r in rows]
        print(f"| {seed} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
