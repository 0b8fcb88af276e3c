"""The Ray Train worker loop. Plain PyTorch in the middle; Ray only for the dataset shard, the
checkpoint/report barrier, and the labeling service handles.

Per step: pull a newer label version if one is ready (never wait), take the prefetched batch,
run :class:`~dynamix_core.training.TrainStep`, and at the configured cadences publish momentum
weights + the videos about to be sampled to the labeling pool, report metrics (rank 0 logs them to
MLflow), evaluate on the target domain, and checkpoint (every rank writes its own part).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.train.run_files import (MetricHistory, load_json, load_tensors, local_run_dir, record_start, rng_state,
                                       save_json, set_rng_state)

log = logging.getLogger("dynamix.train")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_context(seed: int) -> tuple[int, int, "torch.device"]:
    """This Ray Train worker's rank, world size and device; torch threads set and RNGs seeded by rank."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("DYNAMIX_TORCH_THREADS", "1"))))
    _seed_all(seed + rank)
    return rank, world, ray.train.torch.get_device()


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    import dynamix_core  # noqa: F401
    from dynamix_core.centroids import build_centroid_bank
    from dynamix_core.config import from_dict
    from dynamix_core.model import build_encoder
    from dynamix_core.sampling import MixedBatchSampler
    from dynamix_core.training import TrainStep
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import BatchProducer, MultiCameraSet, RankVideos, VideoFeed, ray_video_stream
    from pipelines.train.evaluate import TargetSet, evaluate_target
    from pipelines.train.labels import LabelClient

    cfg = from_dict(TrainConfig, config["train"])
    rank, world, device = worker_context(cfg.run.seed)

    multi = MultiCameraSet.load(cfg.data.multi)
    bank_offset = multi.num_identities
    model = build_encoder(cfg.model)
    if cfg.scaling.compile:
        model = torch.compile(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world > 1 else model.to(device)
    dim = (model.module if hasattr(model, "module") else model).embed_dim
    num_identities = bank_offset + int(config["num_single_identities"])
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    bank = build_centroid_bank(cfg.centroids, num_identities, dim, device=device, group=group)
    trainer = TrainStep(model, bank, loss_cfg=cfg.loss, optim_cfg=cfg.optim, ema_momentum=cfg.model.ema_momentum,
                        total_steps=cfg.run.max_steps, device=device, bf16=cfg.scaling.precision == "bf16",
                        data_parallel=world > 1,
                        replicate_bank_updates=world > 1 and cfg.centroids.loss_mode != "sharded")

    # the checkpoint first: a restart fetches the labels of the version it pinned, and the newer
    # versions' labels and centroids at its first poll, not every label and centroid published so far
    checkpoint = ray.train.get_checkpoint()
    opened = contextlib.ExitStack()
    ckpt_dir = Path(opened.enter_context(checkpoint.as_directory())) if checkpoint is not None else None
    progress = load_json(ckpt_dir / "progress.json") if ckpt_dir is not None else None

    labels = np.zeros(0, dtype=np.int32)  # single identity of every row of the run's index
    client = None
    if cfg.uses_single:
        import ray as _ray

        store = _ray.get_actor(config["store_name"], namespace="dynamix")
        coordinator = _ray.get_actor(config["coordinator_name"], namespace="dynamix")
        client = LabelClient(store, coordinator, rank=rank, world_size=world,
                             sharded=cfg.centroids.loss_mode == "sharded", bank_offset=bank_offset, version=None)
        if progress is None:
            labels = client.initial_labels(bank, step=0)
        else:  # the checkpoint's version (its sampler state was planned with it); its bank is restored below
            labels = client.resume(progress["label_version"], int(progress["step"]))
        # this rank's videos stream from the shards through Ray Data, from the checkpoint's position on
        feed = VideoFeed(RankVideos.load(config["index_path"], rank, world), labels, bank_offset,
                         cache_videos=4 * cfg.sampler.video_buffer_size, stream=ray_video_stream)
    else:
        feed = VideoFeed(None, labels, bank_offset)
    sampler = MixedBatchSampler(cfg.sampler, refs=multi.keys, pids=multi.pid, camids=multi.camid,
                                datasets=multi.dataset, video_stream=feed, total_steps=cfg.run.max_steps,
                                rank=rank, world_size=world)

    start_step = 0
    with opened:
        if ckpt_dir is not None:
            trainer.load_state_dict(load_tensors(ckpt_dir / "trainer.pt", device))
            bank.load_state_dict(load_tensors(ckpt_dir / f"bank_rank{rank}.pt", device))
            mine = load_json(ckpt_dir / f"state_rank{rank}.json")
            sampler.load_state_dict(mine["sampler"])
            set_rng_state(mine["rng"])
            start_step = int(progress["step"])
            log.info("rank %d resumed at step %d", rank, start_step)

    target = TargetSet.load(cfg.data.target, cfg.data.transform) if (cfg.data.target and rank == 0) else None
    refresh_every = cfg.data.camera_centroid_every or max(1, len(multi.keys) // max(1, cfg.sampler.batch_size))
    def is_checkpoint_step(s: int) -> bool:
        return s % cfg.run.checkpoint_every == 0 or s == cfg.run.max_steps

    producer = BatchProducer(sampler, multi, feed, cfg.data.transform, seed=cfg.run.seed * 1000003 + rank,
                             prefetch=cfg.data.prefetch_batches, threads=cfg.data.decode_threads,
                             snapshot_at=is_checkpoint_step)
    tracker, history, stats_ref, rounds_logged, errors_logged = None, None, None, 0, 0
    if rank == 0:
        tracker, history = open_rank0_records(config, cfg, start_step)
    window = {"data_wait": 0.0, "compute": 0.0, "label_wait": 0.0, "images": 0, "t0": time.perf_counter()}
    terms_sum: dict[str, float] = {}
    try:
        for step in range(start_step, cfg.run.max_steps):
            if step == start_step or step % refresh_every == 0:
                _refresh_multi_centroids(trainer, bank, multi, cfg, device, step)
            if client is not None:
                label_t0 = client.wait_s
                client.poll(sampler, feed, bank, producer.lock, step)
                window["label_wait"] += client.wait_s - label_t0
                if step % cfg.labeling.publish_every == 0:
                    with producer.lock:
                        upcoming = sampler.buffered_video_ids()
                    client.publish(step, trainer.momentum.model.state_dict(), upcoming)
            batch, waited = producer.get()
            out = trainer(batch.to(device), step)
            window["data_wait"] += waited
            window["compute"] += out.compute_s
            window["images"] += batch.pid_B.shape[0]
            for k, v in out.terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v
            done = step + 1
            if done % cfg.run.log_every and done != cfg.run.max_steps:
                continue
            n_steps = cfg.run.log_every if done % cfg.run.log_every == 0 else done % cfg.run.log_every
            elapsed = time.perf_counter() - window["t0"]
            metrics = {f"loss/{k}": v / n_steps for k, v in terms_sum.items()}
            metrics.update({
                "step": done, "lr": out.lr, "grad_norm": out.grad_norm,
                "images_per_s": window["images"] * world / elapsed,
                "data_wait_fraction": window["data_wait"] / elapsed,
                "label_wait_fraction": window["label_wait"] / elapsed,
                "compute_fraction": window["compute"] / elapsed,
                "label_version": float(client.version if client and client.version is not None else 0),
                "bank_stale_rows": float(bank.staleness_counts(done).get("stale", 0)),
            })
            if target is not None and (done == cfg.run.max_steps or (cfg.run.eval_every and done % cfg.run.eval_every == 0)):
                metrics.update({f"eval/{k}": v for k, v in evaluate_target(trainer.momentum, target, cfg.eval, device).items()})
            ckpt = None
            if done % cfg.run.checkpoint_every == 0 or done == cfg.run.max_steps:
                if client is not None:
                    client.pin(cfg.run.keep_checkpoints)  # the store keeps this checkpoint's label version
                ckpt = _write_checkpoint(trainer, bank, sampler, producer, done, rank, client)
            if rank == 0 and client is not None:
                # relabel quality of finished rounds, fetched without waiting
                if stats_ref is None:
                    stats_ref = client.coordinator.stats.remote()
                if ray.wait([stats_ref], timeout=0)[0]:
                    stats = ray.get(stats_ref)
                    stats_ref = None
                    for rep in stats["reports"][rounds_logged:]:
                        metrics.update({f"relabel/{k}": float(v) for k, v in rep.items()})
                    rounds_logged = len(stats["reports"])
                    errors_logged = _forward_labeling_health(stats, metrics, errors_logged, tracker)
            if rank == 0:
                record_metrics(tracker, history, metrics, done)
            ray.train.report(metrics, checkpoint=ckpt)
            if ckpt is not None:
                # the checkpoint was copied to storage by report(); drop the local temp copy
                import shutil

                shutil.rmtree(ckpt.path, ignore_errors=True)
            terms_sum.clear()
            window.update({"data_wait": 0.0, "compute": 0.0, "label_wait": 0.0, "images": 0, "t0": time.perf_counter()})
    finally:
        producer.close()
        feed.close()
        if tracker is not None:
            tracker.close()
            history.close()


def open_rank0_records(config: dict, cfg, start_step: int):
    """Rank 0's MLflow tracker and metric history (a restart's replayed steps keep their first
    records), after noting this start in ``starts.jsonl``."""
    from dynamix_core import storage
    from pipelines.tracking import ResilientTracker

    run_dir = config["run_dir"]  # a folder, or a URI (s3://...) when run.storage is an object store
    record_start(run_dir, start_step)
    # the MLflow spool is a local buffer: in the run folder, or in the driver's local folder of a
    # run on an object store (this node's own one when that path cannot be made here)
    local = Path(config.get("local_dir") or local_run_dir(run_dir))
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError:
        local = local_run_dir(run_dir)
    tracker = ResilientTracker(config["tracking_uri"], cfg.tracking.experiment, cfg.run.name,
                               str(local / "spool_rank0"), run_id=config.get("mlflow_run_id"))
    return tracker, MetricHistory(storage.join(run_dir, "history.jsonl"))


def record_metrics(tracker, history, metrics: dict, step: int) -> None:
    """One metric report of rank 0, once per step across restarts: history first (what the driver
    prints), then MLflow unless an earlier attempt already logged this step."""
    history.append(metrics)
    if not tracker.has_metrics_at(step):
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)


#: labeling-service counters rank 0 reports with every metric line once the service has answered
LABELING_COUNTERS = ("round_errors", "chunk_retries", "requests_dropped", "rounds_stale", "rounds")


def _forward_labeling_health(stats: dict, metrics: dict, errors_logged: int, tracker) -> int:
    """Add the labeling service's counters to ``metrics`` (``labeling/<counter>``), log the cause
    of every round that failed since the last call (console, and the MLflow tag
    ``labeling.last_error``); returns the failures logged so far."""
    from services.labeling_pool import new_round_errors

    metrics.update({f"labeling/{k}": float(stats["counters"].get(k, 0)) for k in LABELING_COUNTERS})
    new_causes, failed = new_round_errors(stats, errors_logged)
    for cause in new_causes:
        log.error("labeling round failed: %s", cause)
    if new_causes:
        tracker.set_tags({"labeling.last_error": new_causes[-1]})
    return failed


def _write_checkpoint(trainer, bank, sampler, producer, step: int, rank: int, client):
    """Every rank writes its own files into one checkpoint (Ray merges the workers' directories)."""
    from ray.train import Checkpoint

    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dynamix-ckpt-{step}-r{rank}-"))
    # The producer prefetches: the sampler has already planned batches beyond `step`. Rewind its
    # state to what it was right after planning step-1's batch so no batch is lost or repeated.
    with producer.lock:
        sampler_state = producer.state_at(step)
    if rank == 0:  # tensors in .pt (loaded with weights_only=True), the rest as JSON
        torch.save(trainer.state_dict(), ckpt_dir / "trainer.pt")
        save_json(ckpt_dir / "progress.json",
                  {"step": step, "label_version": None if client is None else client.version})
    torch.save(bank.state_dict(), ckpt_dir / f"bank_rank{rank}.pt")
    save_json(ckpt_dir / f"state_rank{rank}.json", {"sampler": sampler_state, "rng": rng_state()})
    return Checkpoint.from_directory(str(ckpt_dir))


@torch.no_grad()
def _refresh_multi_centroids(trainer, bank, multi, cfg, device, step: int) -> None:
    """(Re)initialise the multi-camera identities' centroids and the (identity, camera) centroids of
    the Camera-centroids loss from f~ features of every multi-camera train image (SPEC 2.2 step 1)."""
    from dynamix_core.data.images import decode_image
    from dynamix_core.data.transforms import ViewTransform

    view = ViewTransform(cfg.data.transform, "test")
    size = (cfg.data.transform.height, cfg.data.transform.width)
    feats = []
    for start in range(0, len(multi.data), 128):
        imgs = torch.stack([view(decode_image(b, size)) for b in multi.data[start:start + 128]]).to(device)
        feats.append(trainer.momentum.embed(imgs).float())
    feat_ND = torch.cat(feats)
    pid_N = torch.as_tensor(multi.pid, device=device)
    cam_N = torch.as_tensor(multi.camid, device=device)
    bank.reinit(feat_ND, pid_N, step=step, video_M=torch.full_like(pid_N, -1))
    pair_N = pid_N * (int(cam_N.max()) + 1) + cam_N
    pair_U, inverse_N = torch.unique(pair_N, return_inverse=True)
    sums_UD = torch.zeros(len(pair_U), feat_ND.shape[1], device=device).index_add_(0, inverse_N, feat_ND)
    first_N = torch.zeros(len(pair_U), dtype=torch.long, device=device).scatter_(
        0, inverse_N, torch.arange(len(pair_N), device=device))
    trainer.set_camera_centroids(sums_UD, pid_N[first_N], cam_N[first_N])
