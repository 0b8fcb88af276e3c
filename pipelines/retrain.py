"""Scheduled retraining: ingest new single-camera data, continue training from the champion,
evaluate, register, promote - one *cycle*, idempotent and resumable step by step.

    result = run_retrain(load_config(RetrainConfig, "recipes/retrain.yaml"))          # today's cycle
    result = run_retrain(cfg, cycle="2026w47")                                       # a named cycle

Steps, in order (:data:`STEPS`):
1. ``ingest``: :func:`pipelines.ingest.run_ingest` on every source (finished shards are skipped, so
   only new data is written); each source must hold single-camera videos. Their output folders are
   added to the training's ``data.single``.
2. ``base``: the current ``champion`` version of the model and its weights, downloaded into the cycle
   folder (none on the first cycle: training then starts from the recipe's ``model.weights``).
3. ``train``: :func:`pipelines.train.driver.run_training` with ``model.weights`` = the champion's
   encoder, run name ``NAME-retrain-CYCLE`` (a re-run resumes the run from its last checkpoint).
4. ``evaluate``: the trained momentum encoder on the recipe's ``data.target``.
5. ``register``: :func:`services.registry.register_model` (idempotent by weights + config hash).
6. ``promote``: :func:`services.promotion.promote` against the champion on the fixed ``suite``.

The journal ``STATE_DIR/CYCLE/journal.json`` records each finished step with its outputs; it is
rewritten atomically (temporary file + rename, or one whole upload) after every step, and a re-run skips the
steps it lists. A crash between a step's side effect and its journal entry is harmless: training
resumes from its checkpoint (a finished run is restored, not retrained), registering the same
weights returns the existing version, and a version that already carries a promotion decision is
not evaluated again (the recorded decision is adopted). One process per cycle at a time (a lock file).

Cycle ids: ``cycle`` when given; else the newest unfinished cycle in ``state_dir`` (a crashed run
is continued, even on a later day); else the current UTC time formatted by ``cycle_format``, so a
scheduler firing twice in one period finds the period's cycle finished and does nothing.
``state_dir`` must be readable by the training workers (the champion's weights are read from it):
on a cluster, an object-store URI (``s3://bucket/prod/retrain``). Raw data set folders (the
sources' roots, the promotion suite) may be URIs too: they are copied to a local cache first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal

import yaml

from dynamix_core import storage
from dynamix_core.config import ConfigError, apply_override, expand_env, field, from_dict, to_dict
from pipelines.ingest import IngestConfig
from pipelines.recipes import resolve_config_path
from pipelines.train.config import TrainConfig

STEPS = ("ingest", "base", "train", "evaluate", "register", "promote")
JOURNAL = "journal.json"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: promotion decisions that end the promote step (``error`` is retried by the next run)
_DECIDED = ("promoted", "rejected")


class RetrainError(RuntimeError):
    """A retraining cycle cannot continue; the message names the step and how to fix it. The journal
    keeps the finished steps, so re-running the same cycle after the fix continues from there."""


@dataclass(kw_only=True)
class TrainSpec:
    """The training of a cycle: a recipe and its overrides (run name, tracking URI and initial weights are set per cycle)."""

    recipe: str = field(help="training recipe YAML (a path, an object-store URI or a shipped recipe's name); "
                             "its data.single is extended with the sources' folders")
    overrides: list[str] = field(default_factory=list, help="KEY=VALUE overrides of the recipe, as `dynamix train --set`")


@dataclass(kw_only=True)
class RetrainConfig:
    """One scheduled retraining job (``dynamix retrain --config RETRAIN.yaml``)."""

    name: str = field(help="registered model to retrain: its champion (models:/NAME@champion) is the starting point")
    tracking_uri: str | None = field(None, help="MLflow tracking + registry URI (default: $MLFLOW_TRACKING_URI)")
    state_dir: str = field("runs/retrain", help="folder or object-store URI of the cycle journals: STATE_DIR/CYCLE/journal.json "
                                               "(and the champion's weights the training workers read)")
    sources: list[IngestConfig] = field(default_factory=list, help="new single-camera data sets to ingest (IngestConfig each)")
    train: TrainSpec = field(help="the training recipe and its overrides")
    suite: str = field(help="promotion suite: query/gallery data set folder (e.g. Market layout: query/ + bounding_box_test/); "
                            "an object-store URI is copied to a local cache first")
    suite_format: str = field("market1501", help="parser of the suite folder (market1501, dukemtmc, cuhk03np, msmt17, manifest)")
    metric: Literal["mAP", "mINP", "rank1", "rank5", "rank10"] = field("mAP", help="the metric that decides a promotion")
    margin: float = field(0.0, help="the new version must beat the champion by more than this on the metric")
    cycle_format: str = field("%Y%m%d", help="strftime pattern (UTC) naming a new cycle when none is given: one cycle per day")
    export_onnx: bool = field(True, help="register the ONNX export with each version")

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '_', '.', '-' (it names training runs)")


# ----------------------------------------------------------------------------------------- journal


@dataclass
class Journal:
    """The step journal of one cycle (``path``: a file or an object), as plain JSON data."""

    path: Path | str
    data: dict

    @classmethod
    def open(cls, path: Path | str, cycle: str, cfg: RetrainConfig) -> "Journal":
        if storage.exists(path):
            return cls(path, json.loads(storage.read_bytes(path)))
        journal = cls(path, {"cycle": cycle, "name": cfg.name, "started": _now(), "finished": None,
                             "config": to_dict(cfg), "steps": {}})
        journal.write()
        return journal

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def outputs(self, step: str) -> dict:
        if step not in self.data["steps"]:
            raise RetrainError(f"{self.path}: step {step!r} has not finished "
                               f"(journal steps: {sorted(self.data['steps'])})")
        return self.data["steps"][step]["outputs"]

    def record(self, step: str, outputs: dict) -> None:
        self.data["steps"][step] = {"finished": _now(), "outputs": outputs}
        if all(self.done(s) for s in STEPS):
            self.data["finished"] = _now()
        self.write()

    def write(self) -> None:
        # a crash leaves the previous journal, never half of one (a renamed file, or one whole upload)
        storage.write_bytes_atomic(self.path, json.dumps(self.data, indent=2) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_cycle(state_dir: Path | str, cycle: str | None, cycle_format: str,
                  now: datetime | None = None) -> tuple[str, str]:
    """``(cycle id, how it was chosen)``: the given id, else the newest unfinished cycle under
    ``state_dir``, else ``now`` (UTC) formatted by ``cycle_format``."""
    if cycle is not None:
        if not _ID_RE.fullmatch(cycle):
            raise ConfigError(f"--cycle {cycle!r}: use letters, digits, '_', '.', '-'")
        return cycle, "given"
    unfinished = []
    journals = [rel for rel in storage.list_tree(state_dir) if rel.count("/") == 1 and rel.endswith(f"/{JOURNAL}")]
    for rel in journals:
        data = json.loads(storage.read_bytes(storage.join(state_dir, rel)))
        if not data["finished"]:
            unfinished.append((data["started"], data["cycle"]))
    if unfinished:
        return max(unfinished)[1], "resuming the unfinished cycle"
    new = (now or datetime.now(timezone.utc)).strftime(cycle_format)
    if not _ID_RE.fullmatch(new):
        raise ConfigError(f"cycle_format: {cycle_format!r} gives {new!r}; "
                          "use a pattern of letters, digits, '_', '.', '-'")
    return new, f"from the date ({cycle_format})"


@contextlib.contextmanager
def _cycle_lock(cycle_dir: Path | str) -> Iterator[None]:
    """One process per cycle on this machine: a lock file in the cycle folder, or for a state_dir on an
    object store (which has no locks) in a local cache folder; across machines the scheduler runs one
    cycle at a time (the chart's CronJob: concurrencyPolicy Forbid)."""
    if storage.is_remote(cycle_dir):
        lock = storage.cache_dir("retrain") / f"{hashlib.sha256(str(cycle_dir).encode()).hexdigest()[:16]}.lock"
    else:
        lock = Path(cycle_dir) / "lock"
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainError(f"cycle {storage.name(cycle_dir)} is running in another process "
                               f"(lock {lock}); wait for it to finish") from None
        yield


# ------------------------------------------------------------------------------------------- steps


def _local(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def recipe_config(cfg: RetrainConfig) -> TrainConfig:
    """The training recipe with its overrides, ``data.single`` extended by the sources' folders."""
    try:
        path = resolve_config_path(cfg.train.recipe)
    except ConfigError as exc:
        raise ConfigError(f"train.recipe: {exc}") from None
    data = yaml.safe_load(path.read_text()) or {}
    for override in cfg.train.overrides:
        apply_override(data, override, TrainConfig, source=f"train.overrides of {path}:")
    data = expand_env(data)  # ${DYNAMIX_STORAGE_URI}/...: compared with the sources' folders below
    section = data.setdefault("data", {})
    if not isinstance(section, dict):
        raise ConfigError(f"train.recipe {path}: data must be a mapping, got {section!r}")
    single = list(section.get("single") or [])
    known = {_local(p) for p in single}
    single += [str(s.out) for s in cfg.sources if _local(str(s.out)) not in known]
    section["single"] = single
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"train.recipe {path}: {exc}") from None


def train_config(cfg: RetrainConfig, cycle: str, base: dict) -> TrainConfig:
    """The cycle's training config: same run name on every re-run, starting from the champion."""
    tcfg = recipe_config(cfg)
    model = tcfg.model
    if base["weights"] is not None:
        model = dataclasses.replace(model, weights=base["weights"], weights_scope="encoder", strip_prefixes=(),
                                    strict_weights=True)
    return dataclasses.replace(
        tcfg, model=model, run=dataclasses.replace(tcfg.run, name=f"{cfg.name}-retrain-{cycle}"),
        tracking=dataclasses.replace(tcfg.tracking, uri=cfg.tracking_uri))


def _ingest(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    from pipelines.ingest import run_ingest

    sources = []
    for i, source in enumerate(cfg.sources):
        result = run_ingest(source, progress=False)
        summary = result.summary
        if summary["videos"] == 0:
            raise RetrainError(f"sources[{i}] ({source.root}, format {summary['format']}): no single-camera videos "
                               "were ingested; retraining takes single-camera data only (e.g. format luperson_nl)")
        sources.append({"out": _local(str(source.out)), "images": summary["images"], "videos": summary["videos"],
                        "shards_written": result.shards_written, "shards_skipped": result.shards_skipped,
                        "inputs_skipped": summary["skipped"]})
    return {"sources": sources}


def champion_version(name: str, tracking_uri: str) -> str | None:
    """The version holding the ``champion`` alias of ``name``; None without one (or without the model)."""
    from mlflow.exceptions import MlflowException

    from services.promotion import CHAMPION
    from services.registry import registry_client

    try:
        aliases = registry_client(tracking_uri).get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def _base(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    """The champion's weights, put in the cycle folder (where the training workers read them: on
    an object store, an object; every node reads it by URI)."""
    import tempfile

    import mlflow

    from services.registry import file_sha256, model_uri, tracking

    version = champion_version(cfg.name, cfg.tracking_uri)
    if version is None:
        return {"champion_version": None, "weights": None, "weights_sha256": None}
    remote = storage.is_remote(cycle_dir)
    dst = Path(tempfile.mkdtemp(prefix="dynamix-champion-")) if remote else Path(cycle_dir) / "champion"
    dst.mkdir(exist_ok=True)
    # by version number, not alias: what is downloaded is the version recorded here
    with tracking(cfg.tracking_uri):
        # "weights.safetensors": the file name services.registry logs the weights artifact under
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri(cfg.name, version)}/artifacts/weights.safetensors",
            dst_path=str(dst))
    digest = file_sha256(local)
    if not remote:
        return {"champion_version": version, "weights": _local(local), "weights_sha256": digest}
    uri = storage.join(cycle_dir, "champion", "weights.safetensors")
    storage.upload_file(local, uri)
    shutil.rmtree(dst, ignore_errors=True)
    return {"champion_version": version, "weights": uri, "weights_sha256": digest}


def _train(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    from pipelines.train.driver import WEIGHTS_FILE, run_training
    from services.registry import file_sha256

    tcfg = train_config(cfg, storage.name(cycle_dir), journal.outputs("base"))
    result = run_training(tcfg, progress=False)
    if result.weights_path is None:
        raise RetrainError(f"train: run {tcfg.run.name} ({result.run_dir}) ended without a checkpoint; "
                           "check its logs, then re-run the cycle")
    # a run on an object store: its exported weights object (a re-run on another machine reads it there)
    weights = storage.join(result.run_dir, WEIGHTS_FILE) if storage.is_remote(result.run_dir) else str(result.weights_path)
    return {"run_name": tcfg.run.name, "run_dir": str(result.run_dir), "weights": weights,
            "weights_sha256": file_sha256(result.weights_path), "mlflow_run_id": result.mlflow_run_id,
            "max_steps": tcfg.run.max_steps}


def _trained_weights(journal: Journal) -> str:
    """The trained weights file, checked against the hash the train step recorded."""
    from services.registry import file_sha256

    train = journal.outputs("train")
    try:
        local = storage.local_file(train["weights"])  # itself, or a cached copy of the run's object
    except FileNotFoundError:
        local = None
    if local is None or not local.is_file() or file_sha256(local) != train["weights_sha256"]:
        raise RetrainError(f"{train['weights']} is missing or changed since the train step recorded it "
                           f"(sha256 {train['weights_sha256'][:12]}); delete the 'train' entry of {journal.path} "
                           "(the run is restored and exports its weights again) or start a new --cycle")
    return str(local)


def _evaluate(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    import torch

    from dynamix_core.model import build_encoder, load_weights
    from dynamix_core.evaluation.target import TargetSet, evaluate_target

    tcfg = train_config(cfg, storage.name(cycle_dir), journal.outputs("base"))
    if tcfg.data.target is None:
        return {"target": None, "metrics": {}}
    encoder = build_encoder(dataclasses.replace(tcfg.model, weights=None)).eval()
    load_weights(encoder, _trained_weights(journal))
    target = TargetSet.load(tcfg.data.target, tcfg.data.transform)
    return {"target": tcfg.data.target, "metrics": evaluate_target(encoder, target, tcfg.eval, torch.device("cpu"))}


def _register(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    from services.registry import register_model

    tcfg = train_config(cfg, storage.name(cycle_dir), journal.outputs("base"))
    base = journal.outputs("base")["champion_version"]
    version = register_model(
        _trained_weights(journal), tcfg.model, cfg.name, cfg.tracking_uri,
        run_id=journal.outputs("train")["mlflow_run_id"], eval_metrics=journal.outputs("evaluate")["metrics"],
        tags={"dynamix.retrain_cycle": storage.name(cycle_dir), "dynamix.base_version": base or ""},
        export_onnx=cfg.export_onnx, preprocessing=tcfg.data.transform)
    return {"version": version.version, "uri": version.uri, "created": version.created,
            "weights_sha256": version.weights_sha256}


def _promote(cfg: RetrainConfig, cycle_dir: Path | str, journal: Journal) -> dict:
    from services.promotion import TAG_PREFIX, ImageSetSuite, promote
    from services.registry import registry_client

    version = journal.outputs("register")["version"]
    tags = registry_client(cfg.tracking_uri).get_model_version(cfg.name, version).tags
    if tags.get(TAG_PREFIX + "decision") in _DECIDED:
        # decided by an earlier attempt that crashed before the journal entry: promoting again would
        # compare the version with itself (once promoted) and overwrite the real decision
        recorded = {k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        return {"version": version, "decision": recorded["decision"], "message": recorded["message"],
                "champion_version": recorded["champion_version"] or None,
                **{k: float(recorded[k]) if recorded[k] else None for k in ("challenger_score", "champion_score")},
                "adopted": True}
    decision = promote(cfg.name, version, ImageSetSuite(str(storage.local_tree(cfg.suite)), fmt=cfg.suite_format),
                       tracking_uri=cfg.tracking_uri, metric=cfg.metric, margin=cfg.margin)
    if decision.decision not in _DECIDED:
        raise RetrainError(f"promote: version {version} could not be evaluated ({decision.message}); "
                           "the aliases are unchanged; fix it and re-run the same cycle")
    return {"version": version, "decision": decision.decision, "message": decision.message,
            "champion_version": decision.champion_version, "challenger_score": decision.challenger_score,
            "champion_score": decision.champion_score, "adopted": False}


_STEP_FUNCTIONS: dict[str, Callable[[RetrainConfig, Path | str, Journal], dict]] = {
    "ingest": _ingest, "base": _base, "train": _train, "evaluate": _evaluate, "register": _register,
    "promote": _promote,
}


def describe(step: str, outputs: dict) -> str:
    """One line saying what a finished step did."""
    if step == "ingest":
        parts = [f"{Path(s['out']).name}: {s['shards_written']} shards written, {s['shards_skipped']} already complete "
                 f"({s['images']} images, {s['videos']} videos)" for s in outputs["sources"]]
        return "; ".join(parts) or "no sources"
    if step == "base":
        v = outputs["champion_version"]
        return f"champion version {v}" if v else "no champion yet: training starts from the recipe's weights"
    if step == "train":
        return f"run {outputs['run_name']} ({outputs['max_steps']} steps), weights {outputs['weights']}"
    if step == "evaluate":
        m = outputs["metrics"]
        return f"{outputs['target']}: mAP {m['mAP']:.4f}, rank1 {m['rank1']:.4f}" if m else "no data.target: skipped"
    if step == "register":
        return f"{outputs['uri']} ({'new version' if outputs['created'] else 'already registered'})"
    return f"version {outputs['version']}: {outputs['decision']} - {outputs['message']}"


# ------------------------------------------------------------------------------------------- cycle


@dataclass(frozen=True)
class RetrainResult:
    cycle: str
    journal: dict
    ran: list[str]  # steps run by this call (the others were already in the journal)


def run_retrain(cfg: RetrainConfig, *, cycle: str | None = None, echo: Callable[[str], None] = print,
                before_commit: Callable[[str, dict], None] | None = None) -> RetrainResult:
    """Run (or continue) one retraining cycle. ``echo`` receives one line per step.
    ``before_commit(step, outputs)`` is called after a step ran and before the journal records it
    (fault injection: an exception there leaves the step's effect without its journal entry)."""
    if cfg.tracking_uri is None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ConfigError("tracking_uri: not set and $MLFLOW_TRACKING_URI is empty; "
                              "give the MLflow URI of the registry")
        cfg = dataclasses.replace(cfg, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    tcfg = recipe_config(cfg)  # fail on a bad recipe before any work
    state_dir = cfg.state_dir if storage.is_remote(cfg.state_dir) else Path(cfg.state_dir).resolve()
    storage.makedirs(state_dir)  # a missing bucket or refused credentials fail here
    cycle, how = resolve_cycle(state_dir, cycle, cfg.cycle_format)
    cycle_dir = storage.join(state_dir, cycle) if storage.is_remote(state_dir) else state_dir / cycle
    storage.makedirs(cycle_dir)
    ran = []
    with _cycle_lock(cycle_dir):
        journal = Journal.open(storage.join(cycle_dir, JOURNAL), cycle, cfg)
        echo(f"[retrain] cycle {cycle} ({how}); journal {journal.path}")
        for step in STEPS:
            if journal.done(step):
                echo(f"[retrain] {step}: skipped, finished {journal.data['steps'][step]['finished']} - "
                     f"{describe(step, journal.outputs(step))}")
                continue
            if step == "ingest" and any(s.workers > 0 for s in cfg.sources):
                from pipelines.train.driver import init_ray

                init_ray(tcfg.scaling.address)  # one Ray instance for ingest and training
            echo(f"[retrain] {step}: running")
            outputs = _STEP_FUNCTIONS[step](cfg, cycle_dir, journal)
            if before_commit is not None:
                before_commit(step, outputs)
            journal.record(step, outputs)
            ran.append(step)
            echo(f"[retrain] {step}: done - {describe(step, outputs)}")
    return RetrainResult(cycle, journal.data, ran)
