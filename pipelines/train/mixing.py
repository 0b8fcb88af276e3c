"""The mixing recipes (DynaMix, ReMix, multi-camera-only) on the engine, without Ray.

:func:`run_mixing` assembles one worker's training: the encoder, the centroid bank, the
:class:`~dynamix_core.training.TrainStep`, the mixed-batch sampler and its prefetching producer,
the checkpoint parts and the hooks (centroid refresh, relabelling, evaluation), and runs
:class:`~dynamix_core.engine.Engine`. The Ray Train worker (:mod:`pipelines.train.worker`) calls
it with Ray's rank, model wrapping, video stream, labelling client and reporter; the local runner
(:mod:`pipelines.train.local`) calls it in one process. What differs between them is a
:class:`Runtime`, nothing in the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dynamix_core.engine import Checkpointer, Engine, EvalHook, Hook, StepResult, checkpoint_due
from dynamix_core.engine.checkpoint import load_json, verify_checkpoint

log = logging.getLogger("dynamix.train")


@dataclass
class Runtime:
    """What a worker's environment provides: its rank, world, device and how models are wrapped."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: (model, find_unused_parameters) -> the model wrapped for data parallelism (Ray:
    #: ``prepare_model``); by default the model moved to the device
    prepare_model: Callable[[nn.Module, bool], nn.Module] | None = None
    #: the process group of the sharded bank (None: one process)
    group: object = None

    def prepare(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        if self.prepare_model is None:
            return model.to(self.device)
        return self.prepare_model(model, find_unused_parameters)


def read_progress(folder: str | Path | None) -> dict | None:
    """``progress.json`` of a verified checkpoint folder (None: no checkpoint)."""
    if folder is None:
        return None
    verify_checkpoint(folder)
    return load_json(Path(folder) / "progress.json")


class MixingStep(Hook):
    """One step: the prefetched mixed batch through :class:`TrainStep`."""

    def __init__(self, trainer, producer, device):
        self.trainer, self.producer, self.device = trainer, producer, device

    def __call__(self, step: int) -> StepResult:
        batch, waited = self.producer.get()
        out = self.trainer(batch.to(self.device), step)
        return StepResult(means={f"loss/{k}": v for k, v in out.terms.items()},
                          last={"lr": out.lr, "grad_norm": out.grad_norm}, images=int(batch.pid_B.shape[0]),
                          timers={"data_wait": waited, "compute": out.compute_s})

    def at_report(self, done: int, metrics: dict) -> None:
        metrics["bank_stale_rows"] = float(self.trainer.bank.staleness_counts(done).get("stale", 0))
        if self.producer.bad_images == "skip":
            metrics["data/bad_images_skipped"] = float(self.producer.bad_images_skipped)


class CentroidRefresh(Hook):
    """The multi-camera identities' centroids and the camera centroids from f~ of every
    multi-camera train image, every ``every`` steps, and at the start unless a checkpoint restored
    them (a resumed run continues with the centroids it saved: exact resume)."""

    def __init__(self, trainer, bank, multi, cfg, device, every: int):
        self.trainer, self.bank, self.multi, self.cfg, self.device, self.every = trainer, bank, multi, cfg, device, every
        self.restored = False

    def before_train(self, start_step: int) -> None:
        self.start_step = start_step

    def before_step(self, step: int) -> None:
        if step % self.every == 0 or (step == self.start_step and not self.restored):
            refresh_multi_centroids(self.trainer, self.bank, self.multi, self.cfg, self.device, step)


class Relabelling(Hook):
    """The labelling service seen from a trainer: pull a newer label version between steps (never
    wait for one), publish f~ and the videos about to be sampled, pin checkpointed versions, and
    (rank 0) forward the service's relabel quality and health to the reports."""

    def __init__(self, client, sampler, feed, bank, producer, trainer, *, publish_every: int, keep_checkpoints: int,
                 rank: int, health: Callable[[dict, dict], None] | None = None, locked=None):
        self.client, self.sampler, self.feed, self.bank = client, sampler, feed, bank
        self.producer, self.trainer = producer, trainer
        self.publish_every, self.keep_checkpoints, self.rank = publish_every, keep_checkpoints, rank
        self.health = health  # rank 0: (client, metrics) -> None, adds the service's numbers
        self.locked = locked  # labeling.deterministic: a StepLockedLabels (versions at fixed steps)
        self.saving: int | None = None  # the step of the checkpoint being written

    def checkpoint_label_version(self) -> int | None:
        if self.client is None:
            return None
        return self.locked.checkpoint_version(self.saving) if self.locked is not None else self.client.version

    def before_step(self, step: int) -> None:
        if self.client is None:
            self.engine.window.time("label_wait", 0.0)
            return
        if self.locked is not None:
            t0 = time.perf_counter()
            self.locked.before_step(step, self.bank, lambda: self.trainer.momentum.model.state_dict())
            self.engine.window.time("label_wait", time.perf_counter() - t0)
            return
        waited = self.client.wait_s
        self.client.poll(self.sampler, self.feed, self.bank, self.producer.lock, step)
        self.engine.window.time("label_wait", self.client.wait_s - waited)
        if step % self.publish_every == 0:
            with self.producer.lock:
                upcoming = self.sampler.buffered_video_ids()
            self.client.publish(step, self.trainer.momentum.model.state_dict(), upcoming)

    def at_report(self, done: int, metrics: dict) -> None:
        version = self.client.version if self.client is not None else None
        if self.locked is not None:  # the version the steps up to ``done`` trained with, not the prefetcher's
            version = self.locked.checkpoint_version(done)
        metrics["label_version"] = float(version if version is not None else 0)
        if self.client is None:
            return
        if self.engine.is_checkpoint_step(done):
            self.saving = done
            if self.locked is not None:
                self.locked.before_checkpoint(done)
            # the store keeps this checkpoint's label version
            self.client.pin(self.keep_checkpoints, self.checkpoint_label_version())
        if self.health is not None:
            self.health(self.client, metrics)


@dataclass
class MixingInputs:
    """What the environment supplies besides the config."""

    multi: object  # a MultiCameraSet
    reporter: object  # an engine Reporter
    restore_dir: str | Path | None = None
    #: (bank, progress or None) -> (label client or None, labels of every index row); None: no videos
    open_labels: Callable | None = None
    #: the rank's videos (a RankVideos) and how they stream (Ray Data or local reads)
    videos: object = None
    video_stream: Callable | None = None
    num_single_identities: int = 0
    #: rank 0: (client, metrics) -> None, adds the labelling service's quality and health numbers
    health: Callable | None = None


def run_mixing(cfg, rt: Runtime, inputs: MixingInputs):
    """Train one worker of a mixing recipe from ``inputs.restore_dir`` (or from scratch) to
    ``cfg.run.max_steps``; returns the :class:`TrainStep` (f~ is ``.momentum``)."""
    from dynamix_core.centroids import build_centroid_bank
    from dynamix_core.model import build_encoder
    from dynamix_core.sampling import MixedBatchSampler
    from dynamix_core.training import TrainStep
    from dynamix_core.data.train_sets import VideoFeed
    from dynamix_core.evaluation.target import TargetSet, evaluate_target
    from pipelines.train.data import BatchProducer

    multi = inputs.multi
    bank_offset = multi.num_identities
    model = build_encoder(cfg.model)
    if cfg.scaling.compile:
        model = torch.compile(model)
    model = rt.prepare(model)
    dim = (model.module if hasattr(model, "module") else model).embed_dim
    bank = build_centroid_bank(cfg.centroids, bank_offset + inputs.num_single_identities, dim, device=rt.device,
                               group=rt.group)
    trainer = TrainStep(model, bank, loss_cfg=cfg.loss, optim_cfg=cfg.optim, ema_momentum=cfg.model.ema_momentum,
                        total_steps=cfg.run.max_steps, device=rt.device, bf16=cfg.scaling.precision == "bf16",
                        data_parallel=rt.world > 1,
                        replicate_bank_updates=rt.world > 1 and cfg.centroids.loss_mode != "sharded")

    # the checkpoint's progress first: a restart fetches the labels of the version it pinned, and
    # the newer versions' labels and centroids at its first poll
    progress = read_progress(inputs.restore_dir)
    client, labels = None, np.zeros(0, dtype=np.int32)
    if inputs.open_labels is not None:
        client, labels = inputs.open_labels(bank, progress)
        feed = VideoFeed(inputs.videos, labels, bank_offset, cache_videos=4 * cfg.sampler.video_buffer_size,
                         stream=inputs.video_stream, reads=cfg.data.single_reads)
    else:
        feed = VideoFeed(None, labels, bank_offset)
    sampler = MixedBatchSampler(cfg.sampler, refs=multi.keys, pids=multi.pid, camids=multi.camid,
                                datasets=multi.dataset, video_stream=feed, total_steps=cfg.run.max_steps,
                                rank=rt.rank, world_size=rt.world)

    def is_checkpoint_step(s: int) -> bool:
        return checkpoint_due(s, cfg.run.checkpoint_every, cfg.run.max_steps)

    relabelling = None  # the hook below; the checkpoint records the label version it says
    ckpt = Checkpointer(rt.rank, device=rt.device,
                        progress=lambda: {"label_version": relabelling.checkpoint_label_version()})
    ckpt.add("trainer.pt", trainer, shared=True)
    ckpt.add("bank_rank{rank}.pt", bank)
    producer = None

    def sampler_state(step: int) -> dict:
        # the producer prefetches: the sampler has planned batches beyond `step`; its state as it was
        # right after planning step-1's batch, so no batch is lost or repeated
        with producer.lock:
            return producer.state_at(step)

    ckpt.add_state("sampler_rank{rank}.json", save=sampler_state, load=sampler.load_state_dict)
    start_step = 0
    if inputs.restore_dir is not None:
        start_step = ckpt.load(inputs.restore_dir)
        log.info("rank %d resumed at step %d", rt.rank, start_step)

    locked = None
    if client is not None and cfg.labeling.deterministic:
        import threading

        from pipelines.train.labels import StepLockedLabels

        locked = StepLockedLabels(client, sampler, feed, threading.Lock(), publish_every=cfg.labeling.publish_every,
                                  apply_after=cfg.labeling.apply_after)
    producer = BatchProducer(sampler, multi, feed, cfg.data.transform, seed=cfg.run.seed * 1000003 + rt.rank,
                             prefetch=cfg.data.prefetch_batches, threads=cfg.data.decode_threads,
                             snapshot_at=is_checkpoint_step, bad_images=cfg.data.bad_images,
                             before_plan=None if locked is None else locked.before_plan,
                             lock=None if locked is None else locked.lock)
    step = MixingStep(trainer, producer, rt.device)
    refresh_every = cfg.data.camera_centroid_every or max(1, len(multi.keys) // max(1, cfg.sampler.batch_size))
    refresh = CentroidRefresh(trainer, bank, multi, cfg, rt.device, refresh_every)
    refresh.restored = inputs.restore_dir is not None and trainer.camera_centroids is not None
    relabelling = Relabelling(client, sampler, feed, bank, producer, trainer, publish_every=cfg.labeling.publish_every,
                              keep_checkpoints=cfg.run.keep_checkpoints, rank=rt.rank, health=inputs.health,
                              locked=locked)
    hooks: list[Hook] = [refresh, step, relabelling]
    if cfg.data.target and rt.rank == 0:
        target = TargetSet.load(cfg.data.target, cfg.data.transform)
        hooks.append(EvalHook(lambda: evaluate_target(trainer.momentum, target, cfg.eval, rt.device),
                              cfg.run.eval_every))
    engine = Engine.for_run(step, cfg.run, hooks=hooks, checkpointer=ckpt, reporter=inputs.reporter,
                            world_size=rt.world)
    try:
        engine.run(start_step)
    finally:
        producer.close()
        feed.close()
    return trainer


@torch.no_grad()
def refresh_multi_centroids(trainer, bank, multi, cfg, device, step: int) -> None:
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
