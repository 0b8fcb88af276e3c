"""The Ray Train worker loop of the clustering recipes (Cluster-Contrast, DomainMix, CALR): plain
PyTorch in the middle, Ray for the checkpoint/report barrier only.

Per epoch (a fixed number of steps, :mod:`pipelines.train.methods_config`): every rank embeds its
contiguous block of the images to cluster with the momentum encoder ``f~``; the blocks are
all-gathered, so every rank holds the same features and runs the method's epoch hook itself (the
clustering code is deterministic: no broadcast of labels, memory or classifier rows is needed, and
a checksum of the labels across ranks guards it). Per step: a P x K batch of the epoch's clusters
(one augmented view), the method's loss inside the (DDP-wrapped) forward, AdamW with the shared
warm-up + cosine schedule, the EMA of ``f~``, and - for the cluster-memory methods - the memory
update with every rank's momentum keys. Reports, MLflow logging (rank 0), target evaluation and
checkpoints follow the cadences of the DynaMix worker (:mod:`pipelines.train.worker`).

Resume: a checkpoint holds the encoder, ``f~``, the head, the optimizers and the method's state; a
resumed run clusters again at the restored step with the restored ``f~`` and continues that epoch.
"""

from __future__ import annotations

import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import dynamix_core  # noqa: F401  (the torchvision shim, before anything imports timm)
from dynamix_core.data.images import decode_image
from dynamix_core.data.transforms import sample_generator
from dynamix_core.training.step import _all_gather, unwrap
from pipelines.train.run_files import load_json, load_tensors, rng_state, save_json, set_rng_state
from pipelines.train.worker import open_rank0_records, record_metrics, worker_context


def train_loop_per_worker(config: dict) -> None:
    import contextlib

    import ray.train
    import ray.train.torch

    from dynamix_core.config import from_dict
    from dynamix_core.data.transforms import ViewTransform
    from dynamix_core.model import MomentumEncoder, build_encoder
    from dynamix_core.training.optim import build_optimizer, lr_factor
    from pipelines.train.cluster_methods import LossNet, build_method
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import MultiCameraSet
    from pipelines.train.evaluate import TargetSet, evaluate_target

    cfg = from_dict(TrainConfig, config["train"])
    sec = cfg.cluster_method
    rank, world, device = worker_context(cfg.run.seed)

    multi = MultiCameraSet.load(cfg.data.multi)
    real = MultiCameraSet.load(cfg.data.single) if cfg.method == "domainmix" else None
    encoder = build_encoder(cfg.model)
    steps_per_epoch = sec.steps_per_epoch(cfg.method, cfg.run.max_steps)
    method = build_method(cfg.method, multi, real, sec, dim=encoder.embed_dim, rank=rank, world=world,
                          steps_per_epoch=steps_per_epoch, seed=cfg.run.seed)
    net = LossNet(encoder, method.head)
    net = ray.train.torch.prepare_model(
        net, parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters}) \
        if world > 1 else net.to(device)
    plain = unwrap(net)  # DDP broadcast rank 0's weights: f~ starts from them on every rank
    momentum = MomentumEncoder(plain.encoder, cfg.model.ema_momentum).to(device)
    optimizers = {name: build_optimizer(module, cfg.optim) for name, module in method.optimizer_groups(plain).items()}

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_tensors(Path(ckpt_dir) / "trainer.pt", device)
            plain.encoder.load_state_dict(state["model"])
            momentum.model.load_state_dict(state["momentum"])
            if plain.head is not None:
                plain.head.load_state_dict(state["head"])
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            progress = load_json(Path(ckpt_dir) / "progress.json")
            method.load_state_dict(progress["method"])
            set_rng_state(load_json(Path(ckpt_dir) / f"state_rank{rank}.json")["rng"])
            start_step = int(progress["step"])

    target = TargetSet.load(cfg.data.target, cfg.data.transform) if (cfg.data.target and rank == 0) else None
    view = ViewTransform(cfg.data.transform, "standard")
    size = (cfg.data.transform.height, cfg.data.transform.width)
    decoder = ThreadPoolExecutor(cfg.data.decode_threads)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.scaling.precision == "bf16"
                else contextlib.nullcontext())
    tracker, history = (open_rank0_records(config, cfg, start_step) if rank == 0 else (None, None))
    window = {"data": 0.0, "compute": 0.0, "cluster": 0.0, "images": 0, "t0": time.perf_counter()}
    sums: dict[str, list[float]] = {}
    epoch_stats: dict[str, float] = {}
    try:
        for step in range(start_step, cfg.run.max_steps):
            epoch = step // steps_per_epoch
            if step == start_step or step % steps_per_epoch == 0:
                t0 = time.perf_counter()
                feat_ND = _embed_sharded(momentum, [method.pool.data[i] for i in method.cluster_rows], cfg, device,
                                         rank, world, sec.feature_batch_size, plain.encoder.embed_dim)
                epoch_stats = method.start_epoch(feat_ND, epoch, step, seed=cfg.run.seed * 1000003 + epoch)
                _check_same_labels(method.labels, world, device, epoch)
                window["cluster"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            refs, label = draw_batch(method.sampler, sec.num_ids_per_batch, world)
            seed = cfg.run.seed * 1000003 + rank + 7919 * step
            # views seeded by (seed, rank, step, key): a batch is reproducible
            img_BCHW = torch.stack(list(decoder.map(lambda i: view(
                decode_image(method.pool.data[i], size), sample_generator(seed, method.pool.keys[i], "standard")),
                refs))).to(device)
            label_B = torch.as_tensor(label, device=device)
            camid_B = torch.as_tensor(method.pool.camid[refs], device=device)
            t1 = time.perf_counter()
            kind = method.step_kind(step)
            lr = cfg.optim.lr * lr_factor(step, cfg.run.max_steps, cfg.optim)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)  # an encoder step leaves gradients in the discriminator too
                for group in opt.param_groups:
                    group["lr"] = lr
            net.train()
            with autocast:
                key_BD = momentum.embed(img_BCHW).float() if method.uses_momentum_keys and kind == "encoder" else None
                loss, terms = net(img_BCHW, method.loss_fn(label_B, camid_B, epoch, step))
            loss.backward()
            params = [p for g in optimizers[kind].param_groups for p in g["params"]]
            clip = cfg.optim.grad_clip
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
            optimizers[kind].step()
            if kind == "encoder":
                momentum.update(plain.encoder)
                if key_BD is not None:  # every rank's keys, so the memory replicas stay equal
                    keys, labels = (_all_gather(key_BD), _all_gather(label_B)) if world > 1 else (key_BD, label_B)
                    method.after_step(keys, labels, step)
            window["data"] += t1 - t0
            window["compute"] += time.perf_counter() - t1
            window["images"] += len(refs)
            for k, v in {"total": loss, **terms}.items():
                sums.setdefault(k, []).append(float(v.detach()))
            done = step + 1
            if done % cfg.run.log_every and done != cfg.run.max_steps:
                continue
            elapsed = time.perf_counter() - window["t0"]
            metrics = {f"loss/{k}": float(np.mean(v)) for k, v in sums.items()}
            metrics.update({f"cluster/{k}": float(v) for k, v in epoch_stats.items()})
            metrics.update({
                "step": done, "epoch": float(epoch), "lr": lr, "grad_norm": grad_norm,
                "images_per_s": window["images"] * world / elapsed, "data_wait_fraction": window["data"] / elapsed,
                "compute_fraction": window["compute"] / elapsed, "cluster_fraction": window["cluster"] / elapsed,
            })
            if target is not None and (done == cfg.run.max_steps or (cfg.run.eval_every and done % cfg.run.eval_every == 0)):
                metrics.update({f"eval/{k}": v for k, v in evaluate_target(momentum, target, cfg.eval, device).items()})
            ckpt = None
            if done % cfg.run.checkpoint_every == 0 or done == cfg.run.max_steps:
                ckpt = _write_checkpoint(plain, momentum, optimizers, method, done, rank)
            if rank == 0:
                record_metrics(tracker, history, metrics, done)
            ray.train.report(metrics, checkpoint=ckpt)
            if ckpt is not None:
                import shutil

                shutil.rmtree(ckpt.path, ignore_errors=True)  # report() copied it to storage
            sums.clear()
            window.update({"data": 0.0, "compute": 0.0, "cluster": 0.0, "images": 0, "t0": time.perf_counter()})
    finally:
        decoder.shutdown(wait=False, cancel_futures=True)
        if tracker is not None:
            tracker.close()
            history.close()


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
    from pipelines.train.evaluate import embed_images

    per = math.ceil(len(data) / world)
    mine = data[rank * per:(rank + 1) * per]
    feat = embed_images(encoder, mine, cfg.data.transform, device, batch_size).to(device) if mine \
        else torch.zeros(0, dim, device=device)
    if world == 1:
        return feat
    padded = torch.zeros(per, dim, device=device, dtype=feat.dtype)
    padded[:len(feat)] = feat
    return _all_gather(padded)[:len(data)]


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


def _write_checkpoint(plain, momentum, optimizers: dict, method, step: int, rank: int):
    """Rank 0 writes the shared state (``trainer.pt``: what the driver exports), every rank its RNG."""
    from ray.train import Checkpoint

    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dynamix-ckpt-{step}-r{rank}-"))
    if rank == 0:
        state = {"model": plain.encoder.state_dict(), "momentum": momentum.model.state_dict(),
                 "head": None if plain.head is None else plain.head.state_dict(),
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
        torch.save(state, ckpt_dir / "trainer.pt")  # tensors (weights_only=True); the rest as JSON
        save_json(ckpt_dir / "progress.json", {"step": step, "method": method.state_dict()})
    save_json(ckpt_dir / f"state_rank{rank}.json", {"rng": rng_state()})
    return Checkpoint.from_directory(str(ckpt_dir))
