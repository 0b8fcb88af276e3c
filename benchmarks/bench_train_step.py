"""Training-step throughput of the DynaMix step on synthetic data, against the bare encoder step.

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--out FILE.md]

One step = online encoder forward+backward on the standard and the strong view of every image,
momentum-encoder forward on the standard views, the four losses (Instance, Augmentation, Centroids
over the whole centroid bank, Camera centroids), AdamW step, EMA update, centroid-bank update.
It is timed next to two references from the same run: the encoder step alone (forward+backward on
both views + AdamW: the compute ceiling) and that step plus the momentum forward and EMA, so the
cost of the losses and the bank is a ratio. FLOPs are counted with ``torch.utils.flop_counter``
(SPEC 4 estimates ~68 GFLOP/image fwd+bwd and ~23 GFLOP/image for the momentum forward at ViT-B/16
256x128); MFU is against the H200's 989 TFLOP/s dense bf16 peak.

Sizes: on CUDA the production step (ViT-B/16 at 256x128, 16x4 multi-camera + 16x4 single-camera
images, bf16 autocast, a 434K x 768 fp16 bank); on CPU a small ViT-S step at 64x32 (fp32);
``--quick`` a ViT-Ti smoke run at 32x16.

Legend: B images per step (each seen in two views), D embedding dim, C camera centroids.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import dynamix_core  # noqa: F401  (torchvision shim before timm)

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dynamix_core.centroids import CentroidBank, CentroidBankConfig
from dynamix_core.losses import (
    LossConfig,
    anchor_temperatures,
    augmentation_loss,
    camera_centroid_loss,
    instance_loss,
    total_loss,
)
from dynamix_core.model import ModelConfig, MomentumEncoder, build_encoder

H200_PEAK_BF16_FLOPS = 989e12
NUM_MULTI_IDENTITIES = 5000  # multi-camera identities (own the camera centroids); the rest are single-camera
CAMERAS_PER_IDENTITY = 4
IMAGES_PER_VIDEO_IDENTITIES = 20  # single-camera identities per video (sets the same-video mask)


@dataclasses.dataclass(frozen=True)
class Size:
    backbone: str
    img_size: tuple[int, int]
    identities_per_domain: int  # N_P^m = N_P^s
    images_per_identity: int  # N_K^m = N_K^s
    num_identities: int  # rows of the centroid bank
    warmup: int
    steps: int
    bf16: bool

    @property
    def batch(self) -> int:
        return 2 * self.identities_per_domain * self.images_per_identity


SIZES = {
    "cuda": Size("vit_base_patch16_224", (256, 128), 16, 4, 434_000, warmup=5, steps=20, bf16=True),
    "cpu": Size("vit_small_patch16_224", (64, 32), 4, 2, 50_000, warmup=1, steps=3, bf16=False),
    "quick": Size("vit_tiny_patch16_224", (32, 16), 2, 2, 20_000, warmup=1, steps=3, bf16=False),
}


def make_batch(size: Size, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A mixed batch: multi-camera identities (each image from another camera), then single-camera ones."""
    p, k = size.identities_per_domain, size.images_per_identity
    multi_pid = torch.randperm(NUM_MULTI_IDENTITIES, generator=gen)[:p].repeat_interleave(k)
    single_pid = NUM_MULTI_IDENTITIES + torch.randperm(size.num_identities - NUM_MULTI_IDENTITIES, generator=gen)[:p]
    single_pid = single_pid.repeat_interleave(k)
    multi_cam = multi_pid * CAMERAS_PER_IDENTITY + torch.arange(k).repeat(p) % CAMERAS_PER_IDENTITY
    single_video = (single_pid - NUM_MULTI_IDENTITIES) // IMAGES_PER_VIDEO_IDENTITIES
    batch = {
        "img_std": torch.randn(size.batch, 3, *size.img_size, generator=gen),
        "img_str": torch.randn(size.batch, 3, *size.img_size, generator=gen),
        "pid": torch.cat([multi_pid, single_pid]),
        "camid": torch.cat([multi_cam, 10**6 + single_video]),  # a video is one camera
        "video": torch.cat([torch.full((p * k,), -1), single_video]),
        "is_multi": torch.arange(size.batch) < p * k,
    }
    return {name: t.to(device) for name, t in batch.items()}


class TrainStep:
    """The three step variants over one encoder, momentum encoder, optimizer and centroid memories."""

    def __init__(self, size: Size, device: torch.device, gen: torch.Generator, compile_model: bool = False):
        self.size, self.device = size, device
        self.encoder = build_encoder(ModelConfig(backbone=size.backbone, img_size=size.img_size)).to(device)
        # as the train worker does with scaling.compile: the online encoder's forward is compiled
        self.forward = torch.compile(self.encoder) if compile_model else self.encoder
        self.momentum = MomentumEncoder(self.encoder).to(device)
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=3.5e-4, fused=device.type == "cuda")
        self.loss_cfg = LossConfig()
        dim = self.encoder.embed_dim
        self.bank = CentroidBank(size.num_identities, dim, CentroidBankConfig(), device=device)
        pid_N = torch.arange(size.num_identities)
        video_N = torch.where(pid_N < NUM_MULTI_IDENTITIES, -1, (pid_N - NUM_MULTI_IDENTITIES) // IMAGES_PER_VIDEO_IDENTITIES)
        self.bank.load_rows(pid_N.to(device), torch.randn(size.num_identities, dim, generator=gen).to(device),
                            step=0, video_M=video_N.to(device))
        # (identity, camera) centroids of the multi-camera identities, as recomputed each epoch with f~
        cam_pid_C = torch.arange(NUM_MULTI_IDENTITIES).repeat_interleave(CAMERAS_PER_IDENTITY)
        self.cam_pid_C = cam_pid_C.to(device)
        self.cam_camid_C = (cam_pid_C * CAMERAS_PER_IDENTITY + torch.arange(CAMERAS_PER_IDENTITY).repeat(NUM_MULTI_IDENTITIES)).to(device)
        self.cam_centroid_CD = F.normalize(torch.randn(len(cam_pid_C), dim, generator=gen), dim=1).to(device)
        self.num_steps = 0

    def embed(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward(img_BCHW), dim=1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.size.bf16)

    def _optimize(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.num_steps += 1

    def encoder_only(self, batch: dict[str, torch.Tensor]) -> None:
        """Reference: forward+backward of both views and the optimizer step, nothing else."""
        with self._autocast():
            z = self.embed(torch.cat([batch["img_std"], batch["img_str"]]))
            loss = z.float().square().mean()
        self._optimize(loss)

    def with_momentum(self, batch: dict[str, torch.Tensor]) -> None:
        """Reference: the encoder step plus the momentum forward and the EMA update."""
        with self._autocast():
            z = self.embed(torch.cat([batch["img_std"], batch["img_str"]]))
            key = self.momentum.embed(batch["img_std"])
            loss = (z[: len(key)].float() * key.float()).sum(dim=1).mean()
        self._optimize(loss)
        self.momentum.update(self.encoder)

    def full(self, batch: dict[str, torch.Tensor]) -> None:
        """The DynaMix step: both views, momentum keys, the four losses, AdamW, EMA, bank update."""
        cfg, pid, is_multi = self.loss_cfg, batch["pid"], batch["is_multi"]
        with self._autocast():
            z_2BD = self.embed(torch.cat([batch["img_std"], batch["img_str"]]))
            key_BD = self.momentum.embed(batch["img_std"])
            z_BD, z_str_BD = z_2BD.chunk(2)
            terms = {
                "instance": instance_loss(z_BD, pid, key_BD, pid, anchor_temperatures(is_multi, cfg.tau_ins_multi, cfg.tau_ins_single)),
                "augmentation": augmentation_loss(z_str_BD, key_BD, pid, cfg.tau_aug),
                "centroid": self.bank.loss(z_BD, pid, self.bank.temperatures(~is_multi), batch["video"]),
                "camera_centroid": camera_centroid_loss(z_BD, pid, batch["camid"], is_multi, self.cam_centroid_CD,
                                                        self.cam_pid_C, self.cam_camid_C, cfg.tau_camera),
            }
            loss, _ = total_loss(terms, cfg)
        self._optimize(loss)
        self.momentum.update(self.encoder)
        self.bank.update(key_BD, pid, self.num_steps)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds_per_step(steps: list[Callable], batch, size: Size, device: torch.device) -> list[float]:
    """Median step time of each variant. Variants are interleaved step by step, so a slow spell of a
    shared machine hits all of them alike and the ratios stay meaningful."""
    for step in steps:
        for _ in range(size.warmup):
            step(batch)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(size.steps):
        for step, spent in zip(steps, times):
            synchronize(device)
            start = time.perf_counter()
            step(batch)
            synchronize(device)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def counted_flops(step: Callable, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ViT-Ti at 32x16: a smoke run of the harness")
    ap.add_argument("--compile", action="store_true", help="torch.compile the online encoder, as scaling.compile does (GPU)")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES["quick" if args.quick else device.type]
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(0)
    step = TrainStep(size, device, gen, compile_model=args.compile)
    batch = make_batch(size, device, gen)

    variants = [("encoder fwd+bwd (reference)", step.encoder_only),
                ("+ momentum fwd + EMA", step.with_momentum),
                ("full DynaMix step (4 losses, bank)", step.full)]
    compiled, step.forward = step.forward, step.encoder  # FLOPs counted eagerly (the same model)
    flops = [counted_flops(fn, batch) for _, fn in variants]
    step.forward = compiled
    if args.compile:  # compile outside the timed steps
        for _, fn in variants:
            fn(batch)
    seconds = median_seconds_per_step([fn for _, fn in variants], batch, size, device)
    rows = [(name, sec, flop) for (name, _), sec, flop in zip(variants, seconds, flops)]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ref_sec = rows[0][1]
    lines = [
        f"# Training step: {size.backbone} at {size.img_size[0]}x{size.img_size[1]}, batch {size.batch} images x 2 views, "
        f"bank {size.num_identities:,} x {step.encoder.embed_dim}, {'bf16 autocast' if size.bf16 else 'fp32'}"
        f"{', torch.compile' if args.compile else ''}, {device_name}",
        "",
        "| variant | ms/step | images/s | time vs reference | counted GFLOP/image | TFLOP/s | MFU (989 TFLOP/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sec, flops in rows:
        mfu = f"{flops / sec / H200_PEAK_BF16_FLOPS:.1%}" if device.type == "cuda" else "n/a (CPU)"
        lines.append(f"| {name} | {sec * 1e3:.1f} | {size.batch / sec:.1f} | {sec / ref_sec:.2f}x | "
                     f"{flops / size.batch / 1e9:.1f} | {flops / sec / 1e12:.3g} | {mfu} |")
    lines += ["", "images/s counts source images (each passes the online encoder twice and the momentum encoder once). "
              "SPEC 4 estimate at ViT-B/16 256x128: 2 x 68 + 23 = 159 GFLOP/image for the full step."]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
