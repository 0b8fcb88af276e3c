"""Model registry: register a trained momentum encoder as an MLflow pyfunc embedding model, load it back.

    v = register_model("runs/r1/momentum.safetensors", "runs/r1/config.yaml", "dynamix-reid",
                       "sqlite:///mlflow.db", run_id=training_run_id, eval_metrics={"mAP": 0.41})
    model = load_embedding_model("dynamix-reid", "champion", "sqlite:///mlflow.db")
    emb_BD = model.predict([jpeg_bytes, ...])      # or uint8 (B, H, W, 3) pixels

One registered version holds (MLflow 3: a logged model, then a registry version pointing at it):
- a pyfunc model whose code is ``services/embedding_model.py`` (models from code, nothing pickled)
  with ``dynamix_core`` bundled as ``code_paths``; artifacts ``weights`` (the encoder state dict,
  safetensors, keys canonicalised), ``config`` (the ModelConfig as JSON) and ``preprocessing`` (the
  training run's test view: size, mean, std), so it takes raw images (uint8 pixels or JPEG/PNG bytes);
- its signature (output float32 ``(-1, D)``; the input is left to the model, which accepts several
  forms, see services/embedding_model.py) and a one-image uint8 input example;
- ``onnx``: the same embedding function exported to ONNX (dynamic batch), checked against PyTorch
  with onnxruntime before anything is registered;
- version tags ``weights_sha256``/``config_sha256`` (the idempotency key), ``source_run_id``,
  ``eval.<metric>`` and the caller's tags.

Idempotency: registering the same weights file with the same config again returns the existing
version instead of creating a duplicate, so a retried job is harmless. Two registrations racing in
parallel can still both create a version (the registry has no conditional create).

Versions are addressed by alias (``champion``, see :mod:`services.promotion`) or number; registry
stages are deprecated in MLflow 3 and not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import yaml

import dynamix_core
from dynamix_core.config import ConfigError, from_dict, to_dict
from dynamix_core.model import ModelConfig

#: ``context.artifacts`` keys read by services/embedding_model.py (kept in step with that file)
WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"
PREPROCESSING_ARTIFACT = "preprocessing"
ONNX_ARTIFACT = "onnx"
ONNX_FILE = "model.onnx"

#: the file MLflow logs as the model's code
MODEL_CODE = Path(__file__).with_name("embedding_model.py")

DEFAULT_EXPERIMENT = "dynamix-registry"

#: packages the pyfunc model imports at load time (pinned to the versions installed here). Passing them
#: explicitly also spares MLflow its requirement inference, which loads the model in a subprocess.
RUNTIME_PACKAGES = ("mlflow", "torch", "timm", "safetensors", "numpy", "pillow", "pyyaml")


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model."""

    name: str
    version: str
    run_id: str
    weights_sha256: str
    created: bool  # False when an identical version already existed and was returned

    @property
    def uri(self) -> str:
        return model_uri(self.name, self.version)


def model_uri(name: str, ref: str | int) -> str:
    """``models:/NAME/3`` for a version number, ``models:/NAME@alias`` for an alias."""
    ref = str(ref)
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"


def registry_client(tracking_uri: str):
    """An MlflowClient whose tracking store and model registry both live at ``tracking_uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def tracking(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``, ``load_model``) at ``tracking_uri`` for the block,
    then restore the process-wide setting."""
    import mlflow

    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    # set_tracking_uri() also writes MLFLOW_TRACKING_URI into os.environ; restoring "the previous
    # URI" that way would pin MLflow's *default* (sqlite:///mlflow.db in the cwd) for the rest of
    # the process, and every later run would log there. Restore the environment exactly instead.
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_model_config(source: ModelConfig | str | Path) -> ModelConfig:
    """A ModelConfig, or one read from YAML/JSON: either the model section itself or a full
    training config holding it under ``model:``."""
    if isinstance(source, ModelConfig):
        return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist; pass the config.yaml saved with the run")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path}: top level must be a mapping, got {type(data).__name__}")
    if isinstance(data.get("model"), dict):
        data = data["model"]
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"model config {path}: {exc}") from None


def load_preprocessing(source: ModelConfig | str | Path, img_size: tuple[int, int]):
    """The test-view preprocessing to store with the model: the ``data.transform`` section of a
    training config (height, width, mean, std), else the transform defaults at ``img_size``."""
    from dynamix_core.data.transforms import TransformConfig

    section = {}
    if not isinstance(source, ModelConfig):
        data = yaml.safe_load(Path(source).read_text()) or {}
        found = data.get("data", {}).get("transform") if isinstance(data.get("data"), dict) else None
        section = {k: found[k] for k in ("height", "width", "mean", "std") if k in found} if isinstance(found, dict) else {}
    try:
        return from_dict(TransformConfig, {"height": img_size[0], "width": img_size[1], **section})
    except ConfigError as exc:
        raise ConfigError(f"model config {source}: data.transform: {exc}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_existing(client, name: str, weights_sha: str, config_sha: str):
    """The version of ``name`` registered from the same weights and config, or None."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return None  # no such model yet
    found = client.search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha}'")
    same = sorted((v for v in found if v.tags.get("config_sha256") == config_sha), key=lambda v: int(v.version))
    return same[0] if same else None


def _signature(dim: int):
    """Output float32 ``(-1, D)``. No input schema: MLflow would then force one input form, and the
    model takes encoded bytes, uint8 pixels and preprocessed tensors (it checks them itself)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def _experiment_id(client, experiment: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location)


@contextlib.contextmanager
def _run(client, run_id: str | None, experiment: str, artifact_location: str | None):
    """The run to log into: ``run_id``'s (active already, or resumed) or a new registration run."""
    import mlflow

    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        yield active
        return
    if run_id is None:
        with mlflow.start_run(experiment_id=_experiment_id(client, experiment, artifact_location),
                              run_name="register") as run:
            yield run
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
        yield run


def _write_artifacts(encoder, img_size: tuple[int, int], config_json: str, prep_json: str, folder: Path,
                     example_BCHW: np.ndarray, export_onnx: bool) -> dict[str, str]:
    """The pyfunc artifacts in ``folder``: canonical safetensors weights, the config, and (checked
    against PyTorch on ``example_BCHW``) the ONNX export; ``{artifact name: local path}``."""
    from dynamix_core.model import save_weights
    from services.onnx_export import check_onnx_parity, export_onnx as write_onnx

    artifacts = {WEIGHTS_ARTIFACT: str(folder / "weights.safetensors"), CONFIG_ARTIFACT: str(folder / "model_config.json")}
    save_weights(encoder, artifacts[WEIGHTS_ARTIFACT])
    Path(artifacts[CONFIG_ARTIFACT]).write_text(config_json)
    artifacts[PREPROCESSING_ARTIFACT] = str(folder / "preprocessing.json")
    Path(artifacts[PREPROCESSING_ARTIFACT]).write_text(prep_json)
    if export_onnx:
        artifacts[ONNX_ARTIFACT] = str(write_onnx(encoder, img_size, folder / ONNX_FILE))
        check_onnx_parity(encoder, artifacts[ONNX_ARTIFACT], example_BCHW)
    return artifacts


def register_model(
    weights_path: str | Path,
    model_config: ModelConfig | str | Path,
    name: str,
    tracking_uri: str,
    *,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    eval_metrics: Mapping[str, float] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    export_onnx: bool = True,
    preprocessing=None,
) -> RegisteredVersion:
    """Register the encoder saved at ``weights_path`` (the momentum encoder ``f~``: backbone + BNNeck,
    any format :func:`dynamix_core.model.read_state_dict` reads) as a new version of ``name``.

    ``run_id``: log the model into that (training) run; default a new run in ``experiment``, whose
    artifacts go to ``artifact_location`` when the experiment is created here. ``eval_metrics`` are
    logged as run metrics and as ``eval.<name>`` version tags. ``export_onnx=False`` skips the ONNX
    export. ``preprocessing`` (a TransformConfig: the training run's ``data.transform``) is stored for
    raw-image input; default: read from ``model_config`` when it is a training config, else the
    transform defaults at the model's ``img_size``. The weights are loaded into the configured encoder first, so a file that does not match
    the config is rejected (WeightsError) before anything is logged.
    """
    import mlflow

    from dynamix_core.model import build_encoder

    cfg = load_model_config(model_config)
    # the stored config describes the registered file (a full encoder with canonical keys), not
    # where the training run's initial weights came from
    stored_cfg = dataclasses.replace(cfg, weights=None, weights_scope="encoder", strip_prefixes=(), strict_weights=True)
    config_json = json.dumps(to_dict(stored_cfg), sort_keys=True)
    prep = preprocessing if preprocessing is not None else load_preprocessing(model_config, cfg.img_size)
    if (prep.height, prep.width) != tuple(cfg.img_size):
        raise ConfigError(f"preprocessing is {prep.height}x{prep.width} but model.img_size is "
                          f"{cfg.img_size[0]}x{cfg.img_size[1]}")
    prep_json = json.dumps({"height": prep.height, "width": prep.width, "mean": list(prep.mean), "std": list(prep.std)},
                           sort_keys=True)
    weights_sha = file_sha256(weights_path)
    config_sha = hashlib.sha256((config_json + prep_json).encode()).hexdigest()  # the preprocessing is config too
    metrics = {k: float(v) for k, v in (eval_metrics or {}).items()}

    client = registry_client(tracking_uri)
    existing = _find_existing(client, name, weights_sha, config_sha)
    if existing is not None:
        return RegisteredVersion(name, str(existing.version), existing.run_id or "", weights_sha, created=False)

    encoder = build_encoder(dataclasses.replace(cfg, weights=str(weights_path), weights_scope="encoder")).eval()
    example_BCHW = np.random.default_rng(0).standard_normal((1, 3, *cfg.img_size), dtype=np.float32)
    version_tags = {
        **dict(tags or {}), "weights_sha256": weights_sha, "config_sha256": config_sha,
        "backbone": cfg.backbone, "img_size": f"{cfg.img_size[0]}x{cfg.img_size[1]}",
        **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    with tempfile.TemporaryDirectory(prefix="dynamix_register_") as tmp:
        artifacts = _write_artifacts(encoder, cfg.img_size, config_json, prep_json, Path(tmp), example_BCHW, export_onnx)
        with tracking(tracking_uri), _run(client, run_id, experiment, artifact_location) as run:
            if metrics:
                mlflow.log_metrics(metrics)
            info = mlflow.pyfunc.log_model(
                name="embedding_model",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(Path(dynamix_core.__file__).parent)],
                signature=_signature(encoder.embed_dim),
                input_example=np.zeros((1, *cfg.img_size, 3), dtype=np.uint8),  # one raw image
                pip_requirements=[f"{p}=={metadata.version(p).split('+')[0]}" for p in RUNTIME_PACKAGES],
            )
            version_tags["source_run_id"] = run.info.run_id
            with _without_registry_chatter():
                mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    return RegisteredVersion(name, str(mv.version), run.info.run_id, weights_sha, created=True)


#: what ``mlflow.register_model`` prints to stderr on success (the caller reports the version itself)
_REGISTRY_CHATTER = re.compile(r"(Successfully registered model |Created version |Registered model .* already exists)")


@contextlib.contextmanager
def _without_registry_chatter():
    """Run ``mlflow.register_model`` without its success lines on stderr; anything else it writes
    there is passed on, also when it fails."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if not _REGISTRY_CHATTER.match(line):
                print(line, file=sys.stderr)


def load_embedding_model(name: str, ref: str | int, tracking_uri: str):
    """The pyfunc embedding model of version/alias ``ref`` of ``name`` (``.predict(images) -> emb_BD``)."""
    import mlflow

    with tracking(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri(name, ref))


def download_onnx(name: str, ref: str | int, tracking_uri: str, dst_dir: str | Path) -> Path:
    """Download the ONNX export of version/alias ``ref`` of ``name`` into ``dst_dir``; its path."""
    import mlflow

    with tracking(tracking_uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri(name, ref)}/artifacts/{ONNX_FILE}", dst_path=str(dst_dir))
    return Path(local)
