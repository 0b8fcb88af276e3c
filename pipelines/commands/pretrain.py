"""Pre-train a backbone on unlabeled single-camera video crops (MoCo v3, self-supervised) on Ray Train.

    dynamix pretrain --config recipes/pretrain_demo.yaml
    dynamix pretrain --config recipes/pretrain.yaml --run-name lup-vitb --set run.max_steps=200000
    dynamix train --config recipes/dynamix.yaml --set model.weights=runs/lup-vitb/backbone.safetensors

The run folder (STORAGE/NAME) gets backbone.safetensors (load it with model.weights; the default
model.weights_scope=backbone), report.html (loss, instance accuracy, the kNN monitor's mAP of the
bare backbone on data.monitor), history.jsonl and the MLflow store. Re-running the same command
resumes from the last checkpoint. `--print-config` shows the resolved configuration.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="pre-training recipe YAML (recipes/pretrain*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set run.max_steps=500 (repeatable)")
    p.add_argument("--run-name", default=None, help="shorthand for --set run.name=...")
    p.add_argument("--storage", default=None, help="shorthand for --set run.storage=... (a folder)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve(args):
    from pipelines.recipes import resolve_config_path
    from dynamix_core.config import load_config
    from pipelines.pretrain.config import PretrainConfig

    overrides = list(args.overrides)
    for flag, key in ((args.run_name, "run.name"), (args.storage, "run.storage"), (args.address, "scaling.address")):
        if flag:
            overrides.append(f"{key}={flag}")
    return load_config(PretrainConfig, resolve_config_path(args.config), overrides)


def run(args) -> int:
    from dynamix_core.config import dump_yaml

    cfg = resolve(args)
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    from pipelines.pretrain.driver import run_pretraining

    result = run_pretraining(cfg)
    print(f"run folder: {result.run_dir}   backbone: {result.weights_path}   MLflow run: {result.mlflow_run_id}")
    if result.weights_path is not None:
        print(f"fine-tune from it: dynamix train --config RECIPE --set model.weights={result.weights_path} "
              f"--set model.backbone={cfg.model.backbone}")
    return 0
