"""The Ray Train side of a training worker: what Ray provides to the engine.

The loop itself is :mod:`pipelines.train.mixing` (DynaMix, ReMix, multi-camera-only) on
:class:`dynamix_core.engine.Engine`; this module gives it Ray's rank, device and model wrapping
(:func:`ray_runtime`), the restored checkpoint (:func:`restored_checkpoint`), the video stream
through Ray Data, the labelling service's actors (:class:`~pipelines.train.labels.LabelClient`,
:class:`LabelingHealth`) and the reporter that records metrics and hands checkpoints to
``ray.train.report`` (:class:`RayReporter`). The clustering and pre-training workers use the same
pieces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.runs.files import MetricHistory, local_run_dir, record_start

log = logging.getLogger("dynamix.train")


def seed_all(seed: int) -> None:
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
    seed_all(seed + rank)
    return rank, world, ray.train.torch.get_device()


def ray_runtime(seed: int):
    """This Ray Train worker's :class:`~pipelines.train.mixing.Runtime`: rank, world, device,
    ``prepare_model`` for data parallelism, the process group."""
    import ray.train.torch

    from pipelines.train.mixing import Runtime

    rank, world, device = worker_context(seed)

    def prepare(model, find_unused_parameters: bool):
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return Runtime(rank, world, device, group=group, prepare_model=prepare if world > 1 else None)


@contextlib.contextmanager
def restored_checkpoint():
    """The folder of the checkpoint Ray Train restored for this worker (None: a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


class RayReporter:
    """The engine's reporter in a Ray Train worker: rank 0 records the metrics (history, MLflow),
    every rank calls ``ray.train.report`` with its part of the checkpoint, whose local copy is then
    dropped (report() copied it to the run's storage)."""

    def __init__(self, job, rank: int, start_step: int):
        self.tracker, self.history = open_rank0_records(job, start_step) if rank == 0 else (None, None)

    def report(self, done: int, metrics: dict, checkpoint_dir) -> None:
        import shutil

        import ray.train
        from ray.train import Checkpoint

        if self.tracker is not None:
            record_metrics(self.tracker, self.history, metrics, done)
        ray.train.report(metrics, checkpoint=None if checkpoint_dir is None else Checkpoint.from_directory(str(checkpoint_dir)))
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def record(self, metrics: dict, step: int) -> None:
        """A row outside the step cadence (the pre-training monitor's step 0)."""
        if self.tracker is not None:
            record_metrics(self.tracker, self.history, metrics, step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.history.close()


def start_step_of(folder) -> int:
    from pipelines.train.mixing import read_progress

    progress = read_progress(folder)
    return 0 if progress is None else int(progress["step"])


def train_loop_per_worker(config: dict) -> None:
    import dynamix_core  # noqa: F401
    from dynamix_core.data.train_sets import MultiCameraSet, RankVideos
    from pipelines.train.data import ray_video_stream
    from pipelines.train.mixing import MixingInputs, run_mixing

    job = config["job"]
    cfg = job.cfg
    rt = ray_runtime(cfg.run.seed)
    multi = MultiCameraSet.load(cfg.data.multi)
    with restored_checkpoint() as restore_dir:
        inputs = MixingInputs(multi=multi, restore_dir=restore_dir,
                              reporter=RayReporter(job, rt.rank, start_step_of(restore_dir)))
        if cfg.uses_labeling_pool:
            inputs.open_labels = _label_opener(job, rt, multi.num_identities)
            inputs.videos = RankVideos.load(job.index_path, rt.rank, rt.world)
            # whole videos through Ray Data tasks, or (planned reads) the index rows read here and
            # each planned image fetched by the prefetcher
            inputs.video_stream = ray_video_stream if cfg.data.single_reads == "videos" else None
            inputs.num_single_identities = job.num_single_identities
            inputs.health = LabelingHealth(inputs.reporter.tracker) if rt.rank == 0 else None
        run_mixing(cfg, rt, inputs)


def _label_opener(job, rt, bank_offset: int):
    """(bank, progress) -> (LabelClient, labels): the labels of the checkpoint's version on a
    resume, else the newest version with its centroids."""
    def open_labels(bank, progress):
        import ray

        from pipelines.train.labels import LabelClient

        store = ray.get_actor(job.store_name, namespace="dynamix")
        coordinator = ray.get_actor(job.coordinator_name, namespace="dynamix")
        client = LabelClient(store, coordinator, rank=rt.rank, world_size=rt.world,
                             sharded=job.cfg.centroids.loss_mode == "sharded", bank_offset=bank_offset, version=None)
        if progress is None:
            return client, client.initial_labels(bank, step=0)
        # the checkpoint's version (its sampler state was planned with it); its bank is restored after
        return client, client.resume(progress["label_version"], int(progress["step"]))
    return open_labels


class LabelingHealth:
    """Rank 0: the labelling service's relabel quality of finished rounds and its counters in the
    report, fetched without waiting; the cause of every failed round on the console and in MLflow."""

    def __init__(self, tracker):
        self.tracker, self.stats_ref, self.rounds_logged, self.errors_logged = tracker, None, 0, 0

    def __call__(self, client, metrics: dict) -> None:
        import ray

        if self.stats_ref is None:
            self.stats_ref = client.coordinator.stats.remote()
        if not ray.wait([self.stats_ref], timeout=0)[0]:
            return
        stats = ray.get(self.stats_ref)
        self.stats_ref = None
        for rep in stats["reports"][self.rounds_logged:]:
            metrics.update({f"relabel/{k}": float(v) for k, v in rep.items()})
        self.rounds_logged = len(stats["reports"])
        self.errors_logged = _forward_labeling_health(stats, metrics, self.errors_logged, self.tracker)


def open_rank0_records(job, start_step: int):
    """Rank 0's MLflow tracker and metric history (a restart's replayed steps keep their first
    records), after noting this start in ``starts.jsonl``."""
    from dynamix_core import storage
    from pipelines.tracking import ResilientTracker

    run_dir = job.run_dir  # a folder, or a URI (s3://...) when run.storage is an object store
    record_start(run_dir, start_step)
    # the MLflow spool is a local buffer: in the run folder, or in the driver's local folder of a
    # run on an object store (this node's own one when that path cannot be made here)
    local = Path(job.local_dir or local_run_dir(run_dir))
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError:
        local = local_run_dir(run_dir)
    tracker = ResilientTracker(job.tracking_uri, job.cfg.tracking.experiment, job.cfg.run.name,
                               str(local / "spool_rank0"), run_id=job.mlflow_run_id)
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
