"""Train a re-identification encoder (DynaMix, ReMix or the multi-camera baseline) on Ray Train.

    dynamix train --config recipes/dynamix_demo.yaml
    dynamix train --config recipes/dynamix.yaml --run-name exp42 --storage s3://bucket/runs --set run.max_steps=120000

Re-running the same command (same run name and storage) resumes from the last checkpoint.
`--help-config [SECTION]` lists every config key with its default and help (e.g. `--help-config centroids`);
`--print-config` shows the resolved configuration with the help beside each value; every key can be
overridden with --set.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="recipe YAML (see recipes/); required unless --help-config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set run.max_steps=500 (repeatable)")
    p.add_argument("--run-name", default=None, help="shorthand for --set run.name=...")
    p.add_argument("--storage", default=None, help="shorthand for --set run.storage=... (folder or object-store URI)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else start a local instance)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (with each key's help) and exit")
    p.add_argument("--help-config", nargs="?", const="", default=None, metavar="SECTION",
                   help="list the config keys (of SECTION, e.g. centroids or run) with defaults and help, and exit")


def resolve(args):
    from pipelines.recipes import resolve_config_path
    from dynamix_core.config import load_config
    from pipelines.train.config import TrainConfig

    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"run.name={args.run_name}")
    if args.storage:
        overrides.append(f"run.storage={args.storage}")
    if args.address:
        overrides.append(f"scaling.address={args.address}")
    return load_config(TrainConfig, resolve_config_path(args.config), overrides)


def run(args) -> int:
    from dynamix_core.config import ConfigError, dump_yaml_with_help, format_field_help

    if args.help_config is not None:
        from pipelines.train.config import TrainConfig

        print(format_field_help(TrainConfig, args.help_config))
        return 0
    if args.config is None:
        raise ConfigError("--config RECIPE is required (see recipes/; `dynamix train --help-config` lists the keys)")
    cfg = resolve(args)
    if args.print_config:
        print(dump_yaml_with_help(cfg))
        return 0
    from pipelines.report import print_summary_table
    from pipelines.train.driver import run_training

    result = run_training(cfg)
    summary = {k: v for k, v in result.metrics.items() if k.startswith(("eval/", "images_per_s", "data_wait", "label_wait"))}
    print(print_summary_table(summary))
    from dynamix_core import storage
    from pipelines.train.driver import WEIGHTS_FILE

    # a run on an object store: the exported object there (result.weights_path is its local copy)
    weights = storage.join(result.run_dir, WEIGHTS_FILE) if storage.is_remote(result.run_dir) and result.weights_path \
        else result.weights_path
    print(f"run folder: {result.run_dir}   momentum encoder: {weights}   MLflow run: {result.mlflow_run_id}")
    if result.registered:
        print(result.registered)
    return 0
