"""Pre-training on the engine, without Ray: one worker's MoCo v3 loop over its videos.

Per step: take the prefetched pair of views, run :class:`~dynamix_core.pretrain.PretrainStep`
(teacher EMA, MoCo v3 loss over the all-gathered keys, AdamW); at the configured cadences report
metrics, run the kNN monitor (rank 0: the bare backbone ranks each ``data.monitor`` query/gallery
set with the project's exact evaluation), and checkpoint (rank 0 the networks and optimizer, every
rank its sampler and RNG state). The Ray Train worker (:mod:`pipelines.pretrain.worker`) supplies
the rank, the model wrapping, the Ray Data video stream and the reporter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dynamix_core.engine import Checkpointer, Engine, EvalHook, Hook, checkpoint_due


class PairStep(Hook):
    def __init__(self, step_fn, producer, device):
        self.step_fn, self.producer, self.device = step_fn, producer, device

    def __call__(self, step: int):
        batch, waited = self.producer.get()
        out = self.step_fn(batch.view1_BCHW.to(self.device, non_blocking=True),
                           batch.view2_BCHW.to(self.device, non_blocking=True), step)
        return out.result(int(batch.view1_BCHW.shape[0]), waited)


def run_pretrain(cfg, rt, *, videos, reporter, restore_dir=None, video_stream=None, videos_per_rank: int,
                 record_baseline=None):
    """Pre-train one worker from ``restore_dir`` (or from scratch) to ``cfg.run.max_steps``;
    ``record_baseline(row)`` (rank 0, a fresh run) records the untrained backbone's monitor row."""
    from dynamix_core.pretrain import OnlineNetwork, PretrainStep
    from dynamix_core.sampling import UnlabeledImageSampler
    from dynamix_core.training.step import all_gather
    from pipelines.pretrain.batches import PairProducer
    from dynamix_core.data.train_sets import VideoFeed
    from dynamix_core.evaluation.target import TargetSet

    online = OnlineNetwork(build_backbone(cfg), cfg.objective.dim, cfg.objective.mlp_dim,
                           cfg.objective.projector_layers, cfg.objective.predictor_layers)
    if cfg.scaling.use_gpu and rt.world > 1:
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # MoCo v3: BN statistics of the global batch
    if cfg.scaling.compile:
        online = torch.compile(online)
    online = rt.prepare(online)
    step_fn = PretrainStep(online, cfg.objective, cfg.optim, total_steps=cfg.run.max_steps, device=rt.device,
                           bf16=cfg.scaling.precision == "bf16", rank=rt.rank,
                           gather=all_gather if rt.world > 1 else None)
    # this rank's videos of the run index, seekable: a resume reads nothing before its position,
    # and the videos a restored sampler buffers are read again when a batch needs them
    feed = VideoFeed(videos, None, 0, cache_videos=2 * cfg.data.buffer_videos,
                     **({"stream": video_stream} if video_stream is not None else {}))
    sampler = UnlabeledImageSampler(feed, batch_size=cfg.data.batch_size,
                                    buffer_size=min(cfg.data.buffer_videos, videos_per_rank),
                                    max_images_per_video=cfg.data.max_images_per_video,
                                    seed=cfg.run.seed, rank=rt.rank)
    ckpt = Checkpointer(rt.rank, device=rt.device)
    ckpt.add("pretrain.pt", step_fn, shared=True)
    producer = None

    def sampler_state(step: int) -> dict:
        with producer.lock:
            return producer.state_at(step)

    ckpt.add_state("sampler_rank{rank}.json", save=sampler_state, load=sampler.load_state_dict)
    start_step = ckpt.load(restore_dir) if restore_dir is not None else 0

    def is_checkpoint_step(s: int) -> bool:
        return checkpoint_due(s, cfg.run.checkpoint_every, cfg.run.max_steps)

    producer = PairProducer(sampler, feed, cfg.data.view1, cfg.data.view2, seed=cfg.run.seed * 1000003 + rt.rank,
                            prefetch=cfg.data.prefetch_batches, threads=cfg.data.decode_threads,
                            snapshot_at=is_checkpoint_step)
    step = PairStep(step_fn, producer, rt.device)
    hooks: list[Hook] = [step]
    monitors = [TargetSet.load(root, cfg.data.view1) for root in cfg.data.monitor] if rt.rank == 0 else []
    if monitors:
        def monitor() -> dict:
            return knn_monitor(step_fn.backbone(), monitors, cfg, rt.device)

        if start_step == 0 and record_baseline is not None:
            record_baseline(monitor)  # the untrained backbone: the baseline of the curve
        hooks.append(EvalHook(monitor, cfg.run.monitor_every, prefix=""))
    engine = Engine.for_run(step, cfg.run, hooks=hooks, checkpointer=ckpt, reporter=reporter,
                            world_size=rt.world)
    try:
        engine.run(start_step)
    finally:
        producer.close()
        feed.close()
    return step_fn


def has_step_zero(run_dir: str) -> bool:
    from dynamix_core import storage
    from pipelines.runs.files import read_history_file

    return any(row.get("step") == 0 for row in read_history_file(storage.join(run_dir, "history.jsonl")))


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
    monitor set, by :func:`dynamix_core.evaluation.target.evaluate_target`; keys ``knn/<set>/<metric>``."""
    from dynamix_core.evaluation.target import evaluate_target

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
