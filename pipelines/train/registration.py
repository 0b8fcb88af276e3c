"""Register a finished training run's momentum encoder when its config names a registered model
(``tracking.registered_model``), into the run's own tracking store. Idempotent: the registry
returns the existing version for the same weights and config, so a re-run registers nothing new.
The first version of a model becomes its ``champion`` (what the chart's serving and retraining
read); later ones are promoted by ``dynamix promote`` or the retraining cycle."""

from __future__ import annotations

from pathlib import Path

from pipelines.train.config import TrainConfig


def register_trained(cfg: TrainConfig, weights_path: Path, tracking_uri: str, run_id: str | None,
                     metrics: dict) -> str:
    """Register ``weights_path``; returns one line saying what happened (for the console)."""
    from services.promotion import CHAMPION
    from services.registry import register_model, registry_client

    name = cfg.tracking.registered_model
    version = register_model(
        str(weights_path), cfg.model, name, tracking_uri, run_id=run_id, preprocessing=cfg.data.transform,
        eval_metrics={k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("eval/")},
        tags={"dynamix.run_name": cfg.run.name, "dynamix.method": cfg.method},
    )
    client = registry_client(tracking_uri)
    made_champion = CHAMPION not in client.get_registered_model(name).aliases
    if made_champion:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    state = "registered" if version.created else "already registered"
    return f"{state}: {version.uri}" + (f" (now @{CHAMPION}: the model had none)" if made_champion else "")
