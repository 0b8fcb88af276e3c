"""Evaluate a trained momentum encoder on target-domain query/gallery sets (SPEC 3 semantics).

    dynamix evaluate --run runs/demo/runs/dynamix-demo                       # the run's own target set
    dynamix evaluate --weights w.safetensors --config recipes/dynamix.yaml --target shards/market1501 --target shards/msmt17
    dynamix evaluate --run RUN --target shards/cuhk03np --json results.json  # cross-dataset, saved as JSON

Each --target is an ingested shard set with query and gallery splits (cross-dataset protocol:
train on A, test on B). Prints one row per target: mAP, Rank-1/5/10, mINP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--run", default=None, help="a training run folder or its object-store URI (momentum_encoder.safetensors + config.yaml)")
    p.add_argument("--weights", default=None, help="encoder weights (.safetensors; a path or a URI) when not using --run")
    p.add_argument("--config", default=None, help="training config/recipe giving the model and transform (with --weights)")
    p.add_argument("--target", action="append", default=[], help="ingested query/gallery shard set (repeatable; default: the config's data.target)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (reporting only)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")


def run(args) -> int:
    import torch

    from dynamix_core import storage
    from dynamix_core.config import ConfigError, load_config
    from dynamix_core.model import build_encoder, load_weights
    from pipelines.recipes import resolve_config_path
    from pipelines.train.driver import WEIGHTS_FILE
    from pipelines.train.config import TrainConfig
    from dynamix_core.evaluation.target import TargetSet, evaluate_target

    if args.run:  # a folder or an object-store URI (s3://bucket/runs/NAME)
        weights, config = storage.join(args.run, WEIGHTS_FILE), storage.join(args.run, "config.yaml")
        if not storage.exists(weights):
            raise FileNotFoundError(f"{weights} not found: the run has not finished (its final weights are written at the end)")
    elif args.weights and args.config:
        weights, config = args.weights, args.config
    else:
        raise ConfigError("give --run RUN_DIR, or --weights W together with --config C")
    cfg = load_config(TrainConfig, resolve_config_path(config))
    if args.rerank:
        cfg.eval.rerank.enabled = True
    targets = args.target or ([cfg.data.target] if cfg.data.target else [])
    if not targets:
        raise ConfigError("no target set: pass --target SHARDS (the config has no data.target)")
    model = build_encoder(cfg.model).eval()
    load_weights(model, weights)
    results = {}
    for target in targets:
        ts = TargetSet.load(target, cfg.data.transform)
        results[target] = evaluate_target(model, ts, cfg.eval, torch.device("cpu"))
    print(f"{'target':<40} {'mAP':>7} {'R1':>7} {'R5':>7} {'R10':>7} {'mINP':>7} {'queries':>8}")
    for target, m in results.items():
        print(f"{str(target)[-40:]:<40} {100 * m['mAP']:7.2f} {100 * m['rank1']:7.2f} {100 * m['rank5']:7.2f} "
              f"{100 * m['rank10']:7.2f} {100 * m['mINP']:7.2f} {int(m['valid_queries']):8d}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"weights": str(weights), "results": results}, indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0
