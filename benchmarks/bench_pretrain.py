"""Pre-training throughput (MoCo v3 step, ``dynamix_core.pretrain``) on synthetic images: images/s
and model FLOP utilisation, against the bare backbone step measured in the same run.

    .venv/bin/python benchmarks/bench_pretrain.py [--quick] [--compile] [--out FILE.md]

One step = the teacher's EMA, online backbone + projector + predictor forward+backward on both
views, teacher backbone + projector forward on both views, the symmetrised contrastive loss, AdamW.
The reference is the backbone alone, forward+backward on both views + AdamW (the compute ceiling
of any two-view objective), so the cost of the teacher and the heads is a ratio. FLOPs are
counted with ``torch.utils.flop_counter``; MFU is against the GPU's dense bf16 peak (H100 and H200
SXM: 989 TFLOP/s), and on CPU against a float32 matmul measured in the same run.

Sizes: on CUDA the production setting (ViT-B/16 at 256x128, 128 images per GPU, bf16 autocast,
the pretrain.yaml heads: 3-layer projector and 2-layer predictor of width 4096, output 256); on
CPU a ViT-Ti at 64x32 (fp32, 16 images); ``--quick`` timm's test_vit at 32x16.

Legend: B images per step (each seen in two views).
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
from torch.utils.flop_counter import FlopCounterMode

from dynamix_core.model import create_backbone
from dynamix_core.pretrain import MocoConfig, OnlineNetwork, PretrainStep
from dynamix_core.training.optim import OptimConfig

#: dense bf16 peak by device-name fragment (NVIDIA datasheets, SXM parts)
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


@dataclasses.dataclass(frozen=True)
class Size:
    backbone: str
    img_size: tuple[int, int]
    batch: int
    heads: MocoConfig
    warmup: int
    steps: int
    bf16: bool


SIZES = {
    "cuda": Size("vit_base_patch16_224", (256, 128), 128, MocoConfig(), warmup=5, steps=20, bf16=True),
    "cpu": Size("vit_tiny_patch16_224", (64, 32), 16, MocoConfig(dim=128, mlp_dim=512), warmup=1, steps=3, bf16=False),
    "quick": Size("test_vit", (32, 16), 8, MocoConfig(dim=16, mlp_dim=32), warmup=1, steps=3, bf16=False),
}


class Steps:
    """The reference step and the MoCo v3 step over their own networks on one device."""

    def __init__(self, size: Size, device: torch.device, compile_model: bool):
        self.size, self.device = size, device
        torch.manual_seed(0)
        self.backbone = create_backbone(size.backbone, size.img_size, 0.0).to(device)
        fused = device.type == "cuda"
        self.backbone_opt = torch.optim.AdamW(self.backbone.parameters(), lr=1e-4, fused=fused)
        h = size.heads
        online = OnlineNetwork(create_backbone(size.backbone, size.img_size, 0.0), h.dim, h.mlp_dim,
                               h.projector_layers, h.predictor_layers).to(device)
        self.backbone_fn = torch.compile(self.backbone) if compile_model else self.backbone
        self.moco = PretrainStep(torch.compile(online) if compile_model else online, h,
                                 OptimConfig(lr=1e-4, warmup_fraction=0.0), total_steps=10**6, device=device,
                                 bf16=size.bf16)
        self.num_steps = 0

    def reference(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The backbone alone: forward+backward on both views, AdamW."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.size.bf16):
            loss = self.backbone_fn(batch[0]).float().square().mean() + self.backbone_fn(batch[1]).float().square().mean()
        self.backbone_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.backbone_opt.step()

    def pretrain(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.moco(batch[0], batch[1], self.num_steps)
        self.num_steps += 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(steps: list[Callable], batch, size: Size, device: torch.device) -> list[float]:
    """Median step time of each variant, interleaved step by step (a slow spell hits all alike)."""
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


def cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this CPU with the benchmark's threads: the CPU's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="timm's test_vit at 32x16: a smoke run of the harness")
    ap.add_argument("--compile", action="store_true", help="torch.compile both networks (GPU)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the size's)")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES["quick" if args.quick else device.type]
    if args.batch:
        size = dataclasses.replace(size, batch=args.batch)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = Steps(size, device, args.compile)
    gen = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(size.batch, 3, *size.img_size, generator=gen).to(device) for _ in range(2))

    variants = [("backbone fwd+bwd, 2 views (reference)", steps.reference),
                ("MoCo v3 step (online 2 views + teacher 2 views + heads)", steps.pretrain)]
    # FLOPs are counted eagerly on the plain modules (the compiled ones count the same model FLOPs)
    flops = [counted_flops(fn, batch) for _, fn in variants]
    seconds = median_seconds([fn for _, fn in variants], batch, size, device)

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in device_name), None)
        peak_note = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown peak"
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
        peak = cpu_matmul_flops()
        peak_note = f"{peak / 1e9:.0f} GFLOP/s measured fp32 matmul"
    ref = seconds[0]
    lines = [
        f"# Pre-training step (MoCo v3): {size.backbone} at {size.img_size[0]}x{size.img_size[1]}, "
        f"{size.batch} images x 2 views, heads {size.heads.projector_layers}+{size.heads.predictor_layers} layers "
        f"width {size.heads.mlp_dim} -> {size.heads.dim}, {'bf16 autocast' if size.bf16 else 'fp32'}"
        f"{', compiled' if args.compile else ''}, {device_name}",
        "",
        f"| variant | ms/step | images/s | time vs reference | counted GFLOP/image | TFLOP/s | MFU ({peak_note}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, _), sec, flop in zip(variants, seconds, flops):
        mfu = f"{flop / sec / peak:.1%}" if peak else "n/a"
        lines.append(f"| {name} | {sec * 1e3:.1f} | {size.batch / sec:.1f} | {sec / ref:.2f}x | "
                     f"{flop / size.batch / 1e9:.2f} | {flop / sec / 1e12:.3g} | {mfu} |")
    lines += ["", "images/s counts source images: each passes the online network twice (forward+backward) and "
              "the teacher twice (forward). SPEC 4 scale at ViT-B/16 256x128: ~68 GFLOP/image fwd+bwd, ~23 fwd, "
              "so ~2 x 68 + 2 x 23 = 182 GFLOP/image for the MoCo v3 step."]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
