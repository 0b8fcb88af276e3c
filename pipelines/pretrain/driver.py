"""The pre-training job: local Ray (or ``--address``), one Ray Data stream of whole single-camera
videos per worker (the training's streams: :func:`pipelines.train.index.write_single_camera_index`,
:class:`pipelines.train.data.RankVideos`, :func:`pipelines.train.data.ray_video_stream`), a ``TorchTrainer`` running
:func:`pipelines.pretrain.worker.pretrain_loop_per_worker`, MLflow tracking, and at the end the
backbone as ``STORAGE/NAME/backbone.safetensors`` plus ``report.html``.

The exported file loads with ``model.weights=<it>`` and ``model.weights_scope=backbone`` into any
training recipe with the same ``model.backbone`` (and, for ViTs, any ``img_size``: position
embeddings are resampled). Re-running the same command (same run name and storage) resumes from the
newest checkpoint; the MLflow run tagged with the run name is continued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path


from dynamix_core.config import ConfigError, dump_yaml, to_dict
from pipelines.pretrain.config import PretrainConfig
from pipelines.train.driver import _ProgressPrinter, _read_history, check_ingest, init_ray

#: the exported backbone, in the run folder
BACKBONE_FILE = "backbone.safetensors"


@dataclass
class PretrainResult:
    run_dir: Path
    metrics: dict
    history: list[dict]
    weights_path: Path | None
    mlflow_run_id: str | None


def resolve_paths(cfg: PretrainConfig) -> PretrainConfig:
    data = dataclasses.replace(cfg.data, single=[check_ingest(r, "data.single") for r in cfg.data.single],
                               monitor=[check_ingest(r, "data.monitor") for r in cfg.data.monitor])
    model = cfg.model
    if model.weights is not None:
        if not Path(model.weights).is_file():
            raise FileNotFoundError(f"model.weights: {model.weights} does not exist")
        model = dataclasses.replace(model, weights=str(Path(model.weights).resolve()))
    return dataclasses.replace(cfg, data=data, model=model)


def run_pretraining(cfg: PretrainConfig, *, progress: bool = True) -> PretrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.pretrain.worker import pretrain_loop_per_worker
    from pipelines.report import print_summary_table, write_report
    from pipelines.tracking import ResilientTracker
    from pipelines.train.index import write_single_camera_index

    from dynamix_core.model import check_backbone

    check_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.ibn)  # before the data and the cluster
    if "://" in cfg.run.storage:  # Path("s3://b/x") would quietly become a local folder named "s3:"
        from dynamix_core.config import ConfigError

        raise ConfigError(f"run.storage={cfg.run.storage}: pre-training keeps its runs in a local or mounted folder "
                          "(object stores are supported by `dynamix train`; its data.single may be a URI)")
    cfg = resolve_paths(cfg)
    init_ray(cfg.scaling.address)
    storage = Path(cfg.run.storage).resolve()
    run_dir = storage / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    tracking_uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
    tracker = ResilientTracker(tracking_uri, cfg.tracking.experiment, cfg.run.name, str(run_dir / "spool_driver"))
    tracker.log_params(to_dict(cfg))
    tracker.set_tags({"dynamix.method": "pretrain", "dynamix.objective": "moco_v3"})
    tracker.log_artifact(str(run_dir / "config.yaml"))
    tracker.flush(timeout_s=30)  # the MLflow run exists before rank 0 logs into it (see the training driver)

    # the index locates every image by shard and offset: each worker streams its own videos from it
    # (seekable: a resumed worker starts at its checkpoint's position and re-reads its buffered videos)
    index_path = run_dir / "index.parquet"
    info = write_single_camera_index(cfg.data.single, index_path)  # streamed: bounded memory here
    videos_per_rank = []
    for r, count in enumerate(info.videos_per_rank(cfg.scaling.num_workers).tolist()):
        if count * cfg.data.max_images_per_video < cfg.data.batch_size:
            raise ConfigError(
                f"data.single: worker {r} gets {count} of the {len(info.videos)} videos, which cannot fill a batch of "
                f"data.batch_size={cfg.data.batch_size} with at most data.max_images_per_video="
                f"{cfg.data.max_images_per_video} per video; lower scaling.num_workers or data.batch_size")
        videos_per_rank.append(count)
    trainer = TorchTrainer(
        pretrain_loop_per_worker,
        train_loop_config={"pretrain": to_dict(cfg), "run_dir": str(run_dir), "tracking_uri": tracking_uri,
                           "mlflow_run_id": tracker.run_id, "index_path": str(index_path),
                           "videos_per_rank": videos_per_rank},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )
    with _PretrainProgress(run_dir / "history.jsonl", cfg.run.max_steps) if progress else contextlib.nullcontext():
        result = trainer.fit()
    history = list(_read_history(run_dir))
    metrics = dict(result.metrics or {})
    weights_path = None
    if result.checkpoint is not None:
        weights_path = export_backbone(result.checkpoint, run_dir, cfg.objective.export)
        tracker.log_artifact(str(weights_path))
    summary = summarize(history)
    report = write_report(run_dir / "report.html", summary=summary, history=history, relabel_rounds=None,
                          retrieval=None, title=f"Pre-training {cfg.run.name}: MoCo v3, {cfg.model.backbone}")
    tracker.log_artifact(str(report))
    tracker.close()
    (run_dir / "result.json").write_text(json.dumps({"metrics": metrics, "summary": summary}, indent=2, default=float))
    if progress:
        print(print_summary_table(summary), flush=True)
    return PretrainResult(run_dir, metrics, history, weights_path, tracker.run_id)


def summarize(history: list[dict]) -> dict:
    """Monitor mAP / Rank-1 before (step 0) and after pre-training, and the last loss and throughput."""
    summary: dict = {}
    monitored = [h for h in history if any(k.startswith("knn/") for k in h)]
    for label, row in (("before", monitored[0] if monitored else None), ("after", monitored[-1] if monitored else None)):
        if row is not None:
            summary.update({f"{k}_{label}": v for k, v in row.items() if k.endswith(("/mAP", "/rank1"))})
    trained = [h for h in history if "loss/contrastive" in h]
    if trained:
        summary.update({"steps": trained[-1]["step"], "loss/contrastive": trained[-1]["loss/contrastive"],
                        "pretrain/accuracy": trained[-1]["pretrain/accuracy"],
                        "images_per_s": sum(h["images_per_s"] for h in trained) / len(trained)})
    return summary


def export_backbone(checkpoint, run_dir: Path, which: str = "online") -> Path:
    """The pre-trained backbone (``which``: online or teacher) of a checkpoint, as safetensors."""
    from dynamix_core.model import save_state_dict
    from pipelines.train.run_files import load_tensors

    with checkpoint.as_directory() as d:
        state = load_tensors(Path(d) / "pretrain.pt")
    network = state["online" if which == "online" else "teacher"]
    backbone = {k[len("backbone."):]: v for k, v in network.items() if k.startswith("backbone.")}
    out = run_dir / BACKBONE_FILE
    save_state_dict(backbone, out)
    return out


class _PretrainProgress(_ProgressPrinter):
    prefix = "pretrain"

    def format(self, m: dict) -> str:
        knn = "".join(f"  {k[4:]} {100 * v:.1f}" for k, v in m.items() if k.startswith("knn/") and k.endswith("/mAP"))
        if "loss/contrastive" not in m:  # the monitor row of the untrained backbone
            return f"[pretrain] step {m['step']:>6}/{self.max_steps}  untrained backbone:{knn}"
        return (f"[pretrain] step {m['step']:>6}/{self.max_steps}  loss {m['loss/contrastive']:.3f}"
                f"  acc {100 * m['pretrain/accuracy']:.0f}%  lr {m['lr']:.2e}  m {m['momentum']:.4f}"
                f"  {m['images_per_s']:.0f} img/s  data-wait {100 * m['data_wait_fraction']:.0f}%{knn}")
