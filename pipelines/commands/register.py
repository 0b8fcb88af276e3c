"""Register a trained momentum encoder as a new version of an MLflow pyfunc embedding model.

    dynamix register --weights runs/r1/momentum.safetensors --config runs/r1/config.yaml --name dynamix-reid
    dynamix register --weights W --config C --name dynamix-reid --run-id 3f2c... --eval-metric mAP=0.412 --tag recipe=dynamix

The version holds the weights (safetensors), the model config, an ONNX export checked against
PyTorch, a tensor signature and an input example; load it with
mlflow.pyfunc.load_model("models:/NAME/VERSION"). Registering the same weights and config again
prints the existing version instead of creating a duplicate. Promote it with `dynamix promote`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri``, shared with ``dynamix promote``."""
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (http://mlflow:5000, sqlite:///path/mlflow.db); default: "
                             "the training run's store as `dynamix train` chose it (tracking.uri of --config, else "
                             "$MLFLOW_TRACKING_URI, else the mlflow.db beside --config)")


def resolve_tracking_uri(given: str | None, run_config: str | None = None) -> str:
    """The store to use, in the order ``dynamix train`` chose it for the run whose ``config.yaml`` is
    ``run_config``: ``given``, the run's ``tracking.uri``, $MLFLOW_TRACKING_URI, the ``mlflow.db`` the
    run wrote beside its config. Never a store silently created in the working directory."""
    from dynamix_core.config import ConfigError

    if given:
        return given
    section = None
    if run_config is not None and Path(run_config).is_file():
        import yaml

        content = yaml.safe_load(Path(run_config).read_text()) or {}
        section = content.get("tracking") if isinstance(content, dict) else None
    if isinstance(section, dict) and section.get("uri"):
        return str(section["uri"])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    beside = Path(run_config).resolve().parent / "mlflow.db" if run_config is not None else None
    if beside is not None and beside.is_file():
        return f"sqlite:///{beside}"
    where = f" and {run_config} is not a training run's config.yaml with a store" if run_config else ""
    raise ConfigError(f"no MLflow store: --tracking-uri not given, $MLFLOW_TRACKING_URI not set{where}; "
                      f"pass --tracking-uri (e.g. sqlite:///runs/NAME/mlflow.db or http://mlflow:5000)")


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    from dynamix_core.config import ConfigError

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def _metrics(items: list[str]) -> dict[str, float]:
    from dynamix_core.config import ConfigError

    metrics = {}
    for key, value in _key_values(items, "--eval-metric").items():
        try:
            metrics[key] = float(value)
        except ValueError:
            raise ConfigError(f"--eval-metric {key}={value}: the value must be a number") from None
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True,
                        help="the momentum encoder's weights (.safetensors or torch state dict: backbone + neck)")
    parser.add_argument("--config", required=True,
                        help="YAML/JSON model config (the ModelConfig fields, or a training config with a model: section)")
    parser.add_argument("--name", required=True, help="registered model name, e.g. dynamix-reid")
    add_tracking_uri(parser)
    parser.add_argument("--run-id", default=None,
                        help="MLflow run to log the model into (the training run); default a new run in --experiment")
    parser.add_argument("--experiment", default="dynamix-registry", help="experiment of the registration run when no --run-id")
    parser.add_argument("--artifact-location", default=None,
                        help="artifact root of --experiment when this command creates it (e.g. s3://bucket/mlflow)")
    parser.add_argument("--eval-metric", action="append", default=[], metavar="NAME=VALUE",
                        help="an evaluation result to log with the version (repeatable), e.g. mAP=0.412")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a version tag (repeatable)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")


def run(args: argparse.Namespace) -> int:
    from services.registry import register_model

    version = register_model(
        args.weights, args.config, args.name, resolve_tracking_uri(args.tracking_uri, args.config), run_id=args.run_id,
        tags=_key_values(args.tag, "--tag"), eval_metrics=_metrics(args.eval_metric), experiment=args.experiment,
        artifact_location=args.artifact_location, export_onnx=not args.no_onnx,
    )
    state = "registered" if version.created else "already registered (same weights and config)"
    print(f"{state}: {version.uri} (run {version.run_id}, weights sha256 {version.weights_sha256[:12]})")
    return 0
