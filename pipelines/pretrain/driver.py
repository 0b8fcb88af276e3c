"""The pre-training job: the job's Ray cluster (or a local instance), one Ray Data stream of whole single-camera
videos per worker (the training's streams: :func:`dynamix_core.data.run_index_writer.write_single_camera_index`,
:class:`dynamix_core.data.train_sets.RankVideos`, :func:`pipelines.train.data.ray_video_stream`), a ``TorchTrainer`` running
:func:`pipelines.pretrain.worker.pretrain_loop_per_worker`, MLflow tracking, and at the end the
backbone as ``STORAGE/NAME/backbone.safetensors`` plus ``report.html``. ``run.storage`` may be a
local folder or an object-store URI, as for training (:class:`pipelines.runs.folder.RunFolder`).

The exported file loads with ``model.weights=<it>`` and ``model.weights_scope=backbone`` into any
training recipe with the same ``model.backbone`` (and, for ViTs, any ``img_size``: position
embeddings are resampled). Re-running the same command (same run name and storage) resumes from the
newest checkpoint; the MLflow run tagged with the run name is continued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


from dynamix_core.config import ConfigError, dump_yaml
from pipelines.pretrain.config import PretrainConfig
from pipelines.checkpoints import repair_checkpoints
from pipelines.runs.folder import RunFolder, WorkerJob, open_tracker
from pipelines.ray_cluster import require_resources, training_demands
from pipelines.train.driver import (ProgressPrinter, check_ingest, init_ray, mlflow_settings, ray_storage, read_history,
                                    resolve_model, silent)

#: the exported backbone, in the run folder
BACKBONE_FILE = "backbone.safetensors"


@dataclass
class PretrainResult:
    run_dir: Path | str  # a local folder, or the run's URI on an object store
    metrics: dict
    history: list[dict]
    weights_path: Path | None  # a local file: for a run on an object store, the local copy of BACKBONE_FILE
    mlflow_run_id: str | None


def resolve_paths(cfg: PretrainConfig) -> PretrainConfig:
    data = dataclasses.replace(cfg.data, single=[check_ingest(r, "data.single") for r in cfg.data.single],
                               monitor=[check_ingest(r, "data.monitor") for r in cfg.data.monitor])
    return dataclasses.replace(cfg, data=data, model=resolve_model(cfg.model))


def run_pretraining(cfg: PretrainConfig, *, progress: bool = True) -> PretrainResult:
    from pipelines.runs.lease import RunLease

    from dynamix_core.model import check_backbone

    check_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.ibn)  # before the data and the cluster
    cfg = resolve_paths(cfg)
    run = RunFolder.create(cfg.run.storage, cfg.run.name)
    with RunLease(run.dir):  # one writer per run folder: a second run refuses before writing there
        return _run_pretraining(cfg, run, progress)


def _run_pretraining(cfg: PretrainConfig, run: RunFolder, progress: bool) -> PretrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.pretrain.worker import pretrain_loop_per_worker
    from pipelines.report import print_summary_table, write_report
    from dynamix_core.data.run_index_writer import write_single_camera_index

    init_ray(cfg.scaling.address)
    require_resources(training_demands(cfg), timeout_s=cfg.scaling.resources_timeout_s, prefix="pretrain",
                      echo=print if progress else silent)
    params, tags, _ = mlflow_settings(run, cfg)  # MLflow params are immutable: changed settings become tags
    config_file = run.write("config.yaml", dump_yaml(cfg), local_copy=True)
    tracker, tracking_uri = open_tracker(run, cfg.tracking, cfg.run.name)
    try:
        tracker.log_params(params)
        tracker.set_tags({"dynamix.method": "pretrain", "dynamix.objective": "moco_v3", **tags})
        tracker.log_artifact(str(config_file))
        tracker.flush(timeout_s=30)  # the MLflow run exists before rank 0 logs into it (see the training driver)

        # the index locates every image by shard and offset: each worker streams its own videos from it
        # (seekable: a resumed worker starts at its checkpoint's position and re-reads its buffered videos)
        index_path = run.path("index.parquet")
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
            train_loop_config={"job": WorkerJob(cfg, str(run.dir), str(run.local), tracking_uri, tracker.run_id,
                                                index_path=str(index_path), videos_per_rank=tuple(videos_per_rank))},
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run.name, **ray_storage(run.root),
                                 failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        )
        repair_checkpoints(run.dir, echo=print if progress else silent, prefix="pretrain")
        with _PretrainProgress(run.path("history.jsonl"), cfg.run.max_steps) if progress else contextlib.nullcontext():
            result = fit(trainer)  # a deterministic worker error: no retry
    except BaseException:
        tracker.close(status="FAILED")
        raise
    history = list(read_history(run.dir))
    metrics = dict(result.metrics or {})
    weights_path = None
    if result.checkpoint is not None:
        weights_path = export_backbone(result.checkpoint, run.local, cfg.objective.export)
        run.upload(weights_path)
        tracker.log_artifact(str(weights_path))
    summary = summarize(history)
    report = write_report(run.local / "report.html", summary=summary, history=history, relabel_rounds=None,
                          retrieval=None, title=f"Pre-training {cfg.run.name}: MoCo v3, {cfg.model.backbone}")
    run.upload(Path(report))
    tracker.log_artifact(str(report))
    tracker.close()
    run.write("result.json", json.dumps({"metrics": metrics, "summary": summary}, indent=2, default=float))
    if progress:
        print(print_summary_table(summary), flush=True)
    return PretrainResult(run.dir, metrics, history, weights_path, tracker.run_id)


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
    from dynamix_core.engine import load_tensors

    with checkpoint.as_directory() as d:
        state = load_tensors(Path(d) / "pretrain.pt")
    network = state["online" if which == "online" else "teacher"]
    backbone = {k[len("backbone."):]: v for k, v in network.items() if k.startswith("backbone.")}
    out = run_dir / BACKBONE_FILE
    save_state_dict(backbone, out)
    return out


class _PretrainProgress(ProgressPrinter):
    prefix = "pretrain"

    def format(self, m: dict) -> str:
        knn = "".join(f"  {k[4:]} {100 * v:.1f}" for k, v in m.items() if k.startswith("knn/") and k.endswith("/mAP"))
        if "loss/contrastive" not in m:  # the monitor row of the untrained backbone
            return f"[pretrain] step {m['step']:>6}/{self.max_steps}  untrained backbone:{knn}"
        return (f"[pretrain] step {m['step']:>6}/{self.max_steps}  loss {m['loss/contrastive']:.3f}"
                f"  acc {100 * m['pretrain/accuracy']:.0f}%  lr {m['lr']:.2e}  m {m['momentum']:.4f}"
                f"  {m['images_per_s']:.0f} img/s  data-wait {100 * m['data_wait_fraction']:.0f}%{knn}")
