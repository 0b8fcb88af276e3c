"""The clustering recipes (Cluster-Contrast, DomainMix, CALR) on the engine, without Ray.

Per epoch (a fixed number of steps, :mod:`pipelines.train.methods_config`): every rank embeds its
contiguous block of the images to cluster with the momentum encoder ``f~``; the blocks are
all-gathered, so every rank holds the same features and runs the method's epoch hook itself (the
clustering code is deterministic: no broadcast of labels, memory or classifier rows is needed, and
a checksum of the labels across ranks guards it). Per step: a P x K batch of the epoch's clusters
(one augmented view), the method's loss inside the (DDP-wrapped) forward, AdamW with the shared
warm-up + cosine schedule (a function of the step), the EMA of ``f~``, and - for the
cluster-memory methods - the memory update with every rank's momentum keys.

Resume: a checkpoint holds the encoder, ``f~``, the head, the optimizers and the method's state; a
resumed run clusters again at the restored step with the restored ``f~`` and continues that epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

import dynamix_core  # noqa: F401  (the torchvision shim, before anything imports timm)
from dynamix_core.data.images import decode_image
from dynamix_core.data.transforms import sample_generator
from dynamix_core.engine import Checkpointer, Engine, EvalHook, Hook, StepResult
from dynamix_core.training.step import all_gather, unwrap


class ClusterEpochs(Hook):
    """Clustering at every epoch start (and at a resumed step): f~ features of the pool, the
    method's epoch hook, the cross-rank label check; the epoch's statistics in every report."""

    def __init__(self, run: "ClusterStep"):
        self.run = run
        self.stats: dict[str, float] = {}

    def before_train(self, start_step: int) -> None:
        self.start_step = start_step

    def before_step(self, step: int) -> None:
        r = self.run
        if step == self.start_step or step % r.steps_per_epoch == 0:
            t0 = time.perf_counter()
            epoch = step // r.steps_per_epoch
            feat_ND = _embed_sharded(r.momentum, [r.method.pool.data[i] for i in r.method.cluster_rows], r.cfg, r.rt.device,
                                     r.rt.rank, r.rt.world, r.cfg.cluster_method.feature_batch_size,
                                     r.plain.encoder.embed_dim)
            self.stats = r.method.start_epoch(feat_ND, epoch, step, seed=r.cfg.run.seed * 1000003 + epoch)
            _check_same_labels(r.method.labels, r.rt.world, r.rt.device, epoch)
            self.engine.window.time("cluster", time.perf_counter() - t0)
        else:
            self.engine.window.time("cluster", 0.0)

    def at_report(self, done: int, metrics: dict) -> None:
        metrics.update({f"cluster/{k}": float(v) for k, v in self.stats.items()})
        metrics["epoch"] = float((done - 1) // self.run.steps_per_epoch)


class ClusterStep:
    """One step of a clustering recipe: a P x K batch of the epoch's clusters, the method's loss,
    the optimizer of the step's kind, the EMA of f~ and the memory update."""

    def __init__(self, cfg, rt, method, net, momentum, optimizers: dict, steps_per_epoch: int):
        self.cfg, self.rt, self.method, self.net = cfg, rt, method, net
        self.plain = unwrap(net)
        self.momentum, self.optimizers, self.steps_per_epoch = momentum, optimizers, steps_per_epoch
        from dynamix_core.data.transforms import ViewTransform

        self.view = ViewTransform(cfg.data.transform, "standard")
        self.size = (cfg.data.transform.height, cfg.data.transform.width)
        self.decoder = ThreadPoolExecutor(cfg.data.decode_threads)
        self.autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.scaling.precision == "bf16"
                         else contextlib.nullcontext())

    def __call__(self, step: int) -> StepResult:
        from dynamix_core.training.optim import lr_factor

        cfg, rt, method = self.cfg, self.rt, self.method
        t0 = time.perf_counter()
        refs, label = draw_batch(method.sampler, cfg.cluster_method.num_ids_per_batch, rt.world)
        seed = cfg.run.seed * 1000003 + rt.rank + 7919 * step
        # views seeded by (seed, rank, step, key): a batch is reproducible
        img_BCHW = torch.stack(list(self.decoder.map(lambda i: self.view(
            decode_image(method.pool.data[i], self.size), sample_generator(seed, method.pool.keys[i], "standard")),
            refs))).to(rt.device)
        label_B = torch.as_tensor(label, device=rt.device)
        camid_B = torch.as_tensor(method.pool.camid[refs], device=rt.device)
        t1 = time.perf_counter()
        kind = method.step_kind(step)
        lr = cfg.optim.lr * lr_factor(step, cfg.run.max_steps, cfg.optim)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)  # an encoder step leaves gradients in the discriminator too
            for group in opt.param_groups:
                group["lr"] = lr
        self.net.train()
        epoch = step // self.steps_per_epoch
        with self.autocast:
            key_BD = self.momentum.embed(img_BCHW).float() if method.uses_momentum_keys and kind == "encoder" else None
            loss, terms = self.net(img_BCHW, method.loss_fn(label_B, camid_B, epoch, step))
        loss.backward()
        params = [p for g in self.optimizers[kind].param_groups for p in g["params"]]
        clip = cfg.optim.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        self.optimizers[kind].step()
        if kind == "encoder":
            self.momentum.update(self.plain.encoder)
            if key_BD is not None:  # every rank's keys, so the memory replicas stay equal
                keys, labels = (all_gather(key_BD), all_gather(label_B)) if rt.world > 1 else (key_BD, label_B)
                method.after_step(keys, labels, step)
        return StepResult(means={f"loss/{k}": float(v.detach()) for k, v in {"total": loss, **terms}.items()},
                          last={"lr": lr, "grad_norm": grad_norm}, images=len(refs),
                          timers={"data_wait": t1 - t0, "compute": time.perf_counter() - t1})

    def state_dict(self) -> dict:
        return {"model": self.plain.encoder.state_dict(), "momentum": self.momentum.model.state_dict(),
                "head": None if self.plain.head is None else self.plain.head.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.plain.encoder.load_state_dict(state["model"])
        self.momentum.model.load_state_dict(state["momentum"])
        if self.plain.head is not None:
            self.plain.head.load_state_dict(state["head"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)


def run_clustering(cfg, rt, *, reporter, restore_dir=None):
    """Train one worker of a clustering recipe from ``restore_dir`` (or from scratch) to
    ``cfg.run.max_steps``; returns the momentum encoder f~."""
    from dynamix_core.model import MomentumEncoder, build_encoder
    from dynamix_core.training.optim import build_optimizer
    from pipelines.train.cluster_methods import LossNet, build_method
    from dynamix_core.data.train_sets import MultiCameraSet
    from dynamix_core.evaluation.target import TargetSet, evaluate_target

    sec = cfg.cluster_method
    multi = MultiCameraSet.load(cfg.data.multi)
    real = MultiCameraSet.load(cfg.data.single) if cfg.uses_single else None  # DomainMix
    encoder = build_encoder(cfg.model)
    steps_per_epoch = sec.steps_per_epoch(cfg.method, cfg.run.max_steps)
    method = build_method(cfg.method, multi, real, sec, dim=encoder.embed_dim, rank=rt.rank, world=rt.world,
                          steps_per_epoch=steps_per_epoch, seed=cfg.run.seed)
    net = rt.prepare(LossNet(encoder, method.head), method.find_unused_parameters)
    plain = unwrap(net)  # DDP broadcast rank 0's weights: f~ starts from them on every rank
    momentum = MomentumEncoder(plain.encoder, cfg.model.ema_momentum).to(rt.device)
    optimizers = {name: build_optimizer(module, cfg.optim) for name, module in method.optimizer_groups(plain).items()}
    step = ClusterStep(cfg, rt, method, net, momentum, optimizers, steps_per_epoch)

    ckpt = Checkpointer(rt.rank, device=rt.device)
    ckpt.add("trainer.pt", step, shared=True)  # the driver exports f~ from it
    ckpt.add_state("method.json", save=lambda s: method.state_dict(), load=method.load_state_dict, shared=True)
    start_step = ckpt.load(restore_dir) if restore_dir is not None else 0

    hooks: list[Hook] = [ClusterEpochs(step)]
    if cfg.data.target and rt.rank == 0:
        target = TargetSet.load(cfg.data.target, cfg.data.transform)
        hooks.append(EvalHook(lambda: evaluate_target(momentum, target, cfg.eval, rt.device), cfg.run.eval_every))
    engine = Engine.for_run(step, cfg.run, hooks=hooks, checkpointer=ckpt, reporter=reporter,
                            world_size=rt.world)
    try:
        engine.run(start_step)
    finally:
        step.close()
    return momentum


def draw_batch(sampler, num_ids: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_ids`` x K refs and labels for this rank. An epoch with fewer than ``world * num_ids``
    clusters (early, near-random features) repeats draws of fewer distinct clusters, so the batch
    keeps its size; every rank makes the same sequence of calls (the identity stream is shared)."""
    per_call = min(num_ids, sampler.num_identities // world)
    if per_call < 1:
        raise RuntimeError(f"only {sampler.num_identities} clusters this epoch for {world} workers (each needs its "
                           "own): loosen the clustering (cluster eps), start from pre-trained weights, or use fewer workers")
    refs, labels, left = [], [], num_ids
    while left:
        r, lab = sampler.sample(min(per_call, left))
        refs += list(r)
        labels.append(lab)
        left -= min(per_call, left)
    return np.asarray(refs, dtype=np.int64), np.concatenate(labels)


@torch.no_grad()
def _embed_sharded(encoder, data: list[bytes], cfg, device, rank: int, world: int, batch_size: int,
                   dim: int) -> torch.Tensor:
    """(N, D) unit features of ``data`` on ``device``, identical on every rank: each rank embeds one
    contiguous block, the blocks are all-gathered (padded to one length)."""
    from dynamix_core.evaluation.target import embed_images

    per = math.ceil(len(data) / world)
    mine = data[rank * per:(rank + 1) * per]
    feat = embed_images(encoder, mine, cfg.data.transform, device, batch_size).to(device) if mine \
        else torch.zeros(0, dim, device=device)
    if world == 1:
        return feat
    padded = torch.zeros(per, dim, device=device, dtype=feat.dtype)
    padded[:len(feat)] = feat
    return all_gather(padded)[:len(data)]


def _check_same_labels(labels: np.ndarray, world: int, device, epoch: int) -> None:
    """Every rank clustered the same gathered features: their labels must agree (checksums)."""
    if world == 1:
        return
    lab = torch.as_tensor(labels, dtype=torch.int64)
    checksum = torch.stack([lab.sum(), (lab * torch.arange(1, len(lab) + 1)).sum()]).to(device)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"epoch {epoch}: ranks computed different cluster labels from the same features "
                           "(non-deterministic clustering backend); the replicas would diverge")
