"""The Ray Train worker loop of pre-training: plain PyTorch in the middle, Ray for the dataset shard
and the checkpoint/report barrier only.

Per step: take the prefetched pair of views, run :class:`~dynamix_core.pretrain.PretrainStep`
(teacher EMA, MoCo v3 loss over the all-gathered keys, AdamW); at the configured cadences report
metrics (rank 0 logs them to MLflow and ``history.jsonl``), run the kNN monitor (rank 0: the bare
backbone ranks each ``data.monitor`` query/gallery set with the project's exact evaluation), and
checkpoint (rank 0 the networks and optimizer, every rank its sampler and RNG state).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def pretrain_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    import dynamix_core  # noqa: F401  (the torchvision shim, before anything imports timm)
    from dynamix_core.config import from_dict
    from dynamix_core.pretrain import OnlineNetwork, PretrainStep
    from dynamix_core.sampling import UnlabeledImageSampler
    from dynamix_core.training.step import _all_gather
    from pipelines.pretrain.batches import PairProducer
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.train.data import RankVideos, VideoFeed, ray_video_stream
    from pipelines.train.evaluate import TargetSet
    from pipelines.train.run_files import load_json, load_tensors, set_rng_state
    from pipelines.train.worker import open_rank0_records, record_metrics, worker_context

    cfg = from_dict(PretrainConfig, config["pretrain"])
    rank, world, device = worker_context(cfg.run.seed)

    online = OnlineNetwork(build_backbone(cfg), cfg.objective.dim, cfg.objective.mlp_dim,
                           cfg.objective.projector_layers, cfg.objective.predictor_layers)
    if cfg.scaling.use_gpu and world > 1:
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # MoCo v3: BN statistics of the global batch
    if cfg.scaling.compile:
        online = torch.compile(online)
    online = ray.train.torch.prepare_model(online, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world > 1 else online.to(device)
    step_fn = PretrainStep(online, cfg.objective, cfg.optim, total_steps=cfg.run.max_steps, device=device,
                           bf16=cfg.scaling.precision == "bf16", rank=rank, gather=_all_gather if world > 1 else None)

    # this rank's videos of the run index, seekable: a resume reads nothing before its position,
    # and the videos a restored sampler buffers are read again when a batch needs them
    feed = VideoFeed(RankVideos.load(config["index_path"], rank, world), None, 0,
                     cache_videos=2 * cfg.data.buffer_videos, stream=ray_video_stream)
    sampler = UnlabeledImageSampler(feed, batch_size=cfg.data.batch_size,
                                    buffer_size=min(cfg.data.buffer_videos, config["videos_per_rank"][rank]),
                                    max_images_per_video=cfg.data.max_images_per_video,
                                    seed=cfg.run.seed, rank=rank)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            step_fn.load_state_dict(load_tensors(Path(ckpt_dir) / "pretrain.pt", device))
            mine = load_json(Path(ckpt_dir) / f"state_rank{rank}.json")
            sampler.load_state_dict(mine["sampler"])
            set_rng_state(mine["rng"])
            start_step = int(load_json(Path(ckpt_dir) / "progress.json")["step"])

    def is_checkpoint_step(s: int) -> bool:
        return s % cfg.run.checkpoint_every == 0 or s == cfg.run.max_steps

    producer = PairProducer(sampler, feed, cfg.data.view1, cfg.data.view2, seed=cfg.run.seed * 1000003 + rank,
                            prefetch=cfg.data.prefetch_batches, threads=cfg.data.decode_threads,
                            snapshot_at=is_checkpoint_step)
    monitors = [TargetSet.load(root, cfg.data.view1) for root in cfg.data.monitor] if rank == 0 else []
    tracker, history = open_rank0_records(config, cfg, start_step) if rank == 0 else (None, None)
    if rank == 0 and start_step == 0 and monitors and not _has_step_zero(config["run_dir"]):
        # the untrained backbone: the baseline of the curve (once: a restart before the first checkpoint keeps it)
        row = {"step": 0, **knn_monitor(step_fn.backbone(), monitors, cfg, device)}
        record_metrics(tracker, history, row, 0)
    window = {"data_wait": 0.0, "compute": 0.0, "images": 0, "loss": 0.0, "accuracy": 0.0, "t0": time.perf_counter()}
    try:
        for step in range(start_step, cfg.run.max_steps):
            batch, waited = producer.get()
            out = step_fn(batch.view1_BCHW.to(device, non_blocking=True),
                          batch.view2_BCHW.to(device, non_blocking=True), step)
            window["data_wait"] += waited
            window["compute"] += out.compute_s
            window["images"] += batch.view1_BCHW.shape[0]
            window["loss"] += out.loss
            window["accuracy"] += out.accuracy
            done = step + 1
            if done % cfg.run.log_every and done != cfg.run.max_steps:
                continue
            n_steps = cfg.run.log_every if done % cfg.run.log_every == 0 else done % cfg.run.log_every
            elapsed = time.perf_counter() - window["t0"]
            metrics = {"step": done, "loss/contrastive": window["loss"] / n_steps,
                       "pretrain/accuracy": window["accuracy"] / n_steps, "lr": out.lr, "momentum": out.momentum,
                       "grad_norm": out.grad_norm, "images_per_s": window["images"] * world / elapsed,
                       "data_wait_fraction": window["data_wait"] / elapsed, "compute_fraction": window["compute"] / elapsed}
            if monitors and (done == cfg.run.max_steps or (cfg.run.monitor_every and done % cfg.run.monitor_every == 0)):
                metrics.update(knn_monitor(step_fn.backbone(), monitors, cfg, device))
            ckpt = None
            if is_checkpoint_step(done):
                ckpt = _write_checkpoint(step_fn, producer, done, rank)
            if rank == 0:
                record_metrics(tracker, history, metrics, done)
            ray.train.report(metrics, checkpoint=ckpt)
            if ckpt is not None:
                import shutil

                shutil.rmtree(ckpt.path, ignore_errors=True)  # report() copied it to storage
            window.update({"data_wait": 0.0, "compute": 0.0, "images": 0, "loss": 0.0, "accuracy": 0.0,
                           "t0": time.perf_counter()})
    finally:
        producer.close()
        feed.close()
        if tracker is not None:
            tracker.close()
            history.close()


def _has_step_zero(run_dir: str) -> bool:
    from dynamix_core import storage
    from pipelines.train.run_files import read_jsonl

    return any(row.get("step") == 0 for row in read_jsonl(storage.join(run_dir, "history.jsonl")))


def build_backbone(cfg) -> nn.Module:
    """The backbone of ``cfg.model``, from ``cfg.model.weights`` when set (backbone scope)."""
    from dynamix_core.model import create_backbone, load_backbone_weights

    backbone = create_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.drop_path_rate, cfg.model.ibn)
    if cfg.model.weights is not None:
        load_backbone_weights(backbone, cfg.model.weights, strict=cfg.model.strict_weights,
                              strip_prefixes=cfg.model.strip_prefixes)
    return backbone


def knn_monitor(backbone: nn.Module, monitors: list, cfg, device) -> dict[str, float]:
    """mAP / Rank-1 / mINP of the bare backbone (pooled features, eval mode, L2-normalised) on each
    monitor set, by :func:`pipelines.train.evaluate.evaluate_target`; keys ``knn/<set>/<metric>``."""
    from pipelines.train.evaluate import evaluate_target

    was_training = backbone.training
    backbone.eval()
    try:
        out = {}
        for target in monitors:
            name = Path(target.name).name
            res = evaluate_target(backbone, target, cfg.eval, device)
            out.update({f"knn/{name}/{k}": res[k] for k in ("mAP", "rank1", "mINP")})
        return out
    finally:
        backbone.train(was_training)


def _write_checkpoint(step_fn, producer, step: int, rank: int):
    """Rank 0 writes the networks and optimizer (``pretrain.pt``, tensors only: loaded with
    ``weights_only=True``) and ``progress.json``; every rank its sampler and RNG state as JSON."""
    from ray.train import Checkpoint

    from pipelines.train.run_files import rng_state, save_json

    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dynamix-pretrain-{step}-r{rank}-"))
    with producer.lock:
        sampler_state = producer.state_at(step)
    if rank == 0:
        torch.save(step_fn.state_dict(), ckpt_dir / "pretrain.pt")
        save_json(ckpt_dir / "progress.json", {"step": step})
    save_json(ckpt_dir / f"state_rank{rank}.json", {"sampler": sampler_state, "rng": rng_state()})
    return Checkpoint.from_directory(str(ckpt_dir))
