"""Scheduled retraining: ingest new single-camera data -> continue training from the champion ->
evaluate -> register -> promote, as one resumable cycle.

    dynamix retrain --config recipes/retrain_demo.yaml                 # today's cycle (or the unfinished one)
    dynamix retrain --config recipes/retrain.yaml --cycle 2026w47      # a named cycle
    dynamix retrain --config recipes/retrain.yaml --set margin=0.01 --print-config

Each finished step is recorded in STATE_DIR/CYCLE/journal.json. Re-running after a crash continues
the cycle: finished steps are skipped, training resumes from its checkpoint, and no version is
registered twice. Re-running a finished cycle does nothing. Exit status 1 when a step fails.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="retraining YAML (see recipes/retrain.yaml)")
    p.add_argument("--cycle", default=None,
                   help="cycle id (default: the unfinished cycle if any, else today's, from cycle_format)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one retraining config value, e.g. --set margin=0.01 (repeatable)")
    p.add_argument("--storage", default=None,
                   help="shared storage root (the Helm chart's storage.uri): training runs go under STORAGE/runs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    import sys

    from pipelines.recipes import resolve_config_path
    from dynamix_core.config import dump_yaml, load_config
    from pipelines.retrain import RetrainConfig, RetrainError, recipe_config, run_retrain

    cfg = load_config(RetrainConfig, resolve_config_path(args.config), args.overrides)
    if args.storage:
        storage = args.storage.rstrip("/")
        cfg.train.overrides.append(f"run.storage={storage}/runs")  # as the chart's training job
    if args.print_config:  # the training config is resolved too, so a bad train.overrides key fails here
        print(dump_yaml(cfg))
        print("# the training config of each cycle (the cycle sets run.name and starts from the champion):")
        print("\n".join("#   " + line for line in dump_yaml(recipe_config(cfg)).splitlines()))
        return 0
    try:
        result = run_retrain(cfg, cycle=args.cycle, echo=lambda line: print(line, flush=True))
    except RetrainError as exc:
        print(f"dynamix retrain: error: {exc}", file=sys.stderr)
        return 1
    print(f"[retrain] cycle {result.cycle} finished; steps run now: {', '.join(result.ran) or 'none'}")
    return 0
