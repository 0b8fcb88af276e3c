"""Does self-supervised pre-training on the single-camera set help re-identification by itself?
The bare backbone (no fine-tuning) after MoCo v3 pre-training against the same backbone at random
init, on the held-out target domain and an in-domain test split of the demo's SynthReID.

    .venv/bin/python benchmarks/bench_pretrain_knn.py [--quick] [--data DIR] [--steps N] [--seeds 0,1,2]

Pre-training runs in one process (``dynamix_core.pretrain.local``: the sampler, views and step of
``dynamix pretrain``) with the settings of ``recipes/pretrain_demo.yaml``. mAP is computed here by an
independent numpy loop (non-interpolated AP, same-pid-same-camera gallery entries removed; SPEC 3),
not by ``dynamix_core.evaluation``. The reference is measured in the same run: the random-init
backbone with the same seed, and chance (the expected mAP of a random ranking).

Data: ``--data`` names a folder prepared by ``dynamix demo`` (its ``shards/``); by default the demo's
SynthReID is generated and ingested under ``bench_results/pretrain_knn_data``. ``--quick`` trains 40
steps at 64x32 on one seed: a smoke run of the harness.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import dynamix_core  # noqa: F401  (torchvision shim before timm)

import numpy as np
import torch

from dynamix_core.config import load_config
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.model import create_backbone
from dynamix_core.pretrain.local import LocalPretrainConfig, LocalVideos, pretrain_local

REPO = Path(__file__).resolve().parents[1]
SETS = ("synth_target", "synth_m0")


def average_precision_loop(q_QD, g_GD, q_pid, g_pid, q_cam, g_cam) -> float:
    """mAP by the definition: per query, drop same-pid same-camera gallery entries, rank by cosine
    distance (stable), AP = mean over positives of precision at the positive's rank."""
    aps = []
    for i in range(len(q_QD)):
        keep = ~((g_pid == q_pid[i]) & (g_cam == q_cam[i]))
        order = np.argsort(1.0 - g_GD[keep] @ q_QD[i], kind="stable")
        relevant = g_pid[keep][order] == q_pid[i]
        if relevant.any():
            ranks = np.flatnonzero(relevant) + 1
            aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    return float(np.mean(aps))


def chance_map(q_pid, g_pid, q_cam, g_cam, draws: int = 50, seed: int = 0) -> float:
    """The expected mAP of a random ranking (mean over ``draws`` random feature draws)."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(draws):
        q, g = rng.standard_normal((len(q_pid), 16)), rng.standard_normal((len(g_pid), 16))
        maps.append(average_precision_loop(q / np.linalg.norm(q, axis=1, keepdims=True),
                                           g / np.linalg.norm(g, axis=1, keepdims=True), q_pid, g_pid, q_cam, g_cam))
    return statistics.fmean(maps)


def features(backbone, target, device) -> tuple[np.ndarray, np.ndarray]:
    from dynamix_core.evaluation.target import embed_images

    backbone.eval()
    return (embed_images(backbone, target.q_data, target.transform, device).numpy(),
            embed_images(backbone, target.g_data, target.transform, device).numpy())


def main() -> int:
    from pipelines.pretrain.config import PretrainConfig
    from dynamix_core.evaluation.target import TargetSet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 steps at 64x32, one seed: a smoke run")
    ap.add_argument("--data", type=Path, default=None, help="a folder prepared by `dynamix demo` (default: generate)")
    ap.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the demo recipe's)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (init and sampling)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the recipe's)")
    ap.add_argument("--max-images-per-video", type=int, default=None,
                    help="frames of one video in a batch (default: the recipe's; more = negatives sharing a background)")
    ap.add_argument("--buffer-videos", type=int, default=None, help="videos the sampler draws from (default: the recipe's)")
    ap.add_argument("--crop-min", type=float, default=None, help="smallest random-crop scale of both views (default: the recipe's)")
    ap.add_argument("--view-threads", type=int, default=1, help="threads decoding and augmenting each batch")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = load_config(PretrainConfig, REPO / "recipes" / "pretrain_demo.yaml")
    height, width = (64, 32) if args.quick else recipe.model.img_size
    steps = args.steps or (40 if args.quick else recipe.run.max_steps)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    data = args.data
    if data is None:
        from pipelines.demo import prepare_data

        data = REPO / "bench_results" / "pretrain_knn_data"
        prepare_data(data, progress=False)
    shards = data / "shards"
    size = {"height": height, "width": width}
    crop = {} if args.crop_min is None else {"crop_scale": (args.crop_min, 1.0)}
    views = [TransformConfig(**{**vars(v), **size, **crop}) for v in (recipe.data.view1, recipe.data.view2)]
    batch = args.batch or recipe.data.batch_size
    per_video = args.max_images_per_video or recipe.data.max_images_per_video
    buffer_videos = args.buffer_videos or recipe.data.buffer_videos
    targets = {name: TargetSet.load(str(shards / name), TransformConfig(**size)) for name in SETS}
    videos = LocalVideos.from_shards([shards / "synth_video"])
    results: dict[str, dict[str, list[float]]] = {name: {"random": [], "pretrained": []} for name in SETS}
    t0 = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        backbone = create_backbone(recipe.model.backbone, (height, width), 0.0).to(device)
        for name, target in targets.items():
            results[name]["random"].append(average_precision_loop(*features(backbone, target, device), target.q_pid,
                                                                  target.g_pid, target.q_cam, target.g_cam))
        cfg = LocalPretrainConfig(steps=steps, batch_size=batch, buffer_videos=buffer_videos,
                                  max_images_per_video=per_video, seed=seed, objective=recipe.objective,
                                  optim=recipe.optim, view1=views[0], view2=views[1], view_threads=args.view_threads)
        trained = pretrain_local(backbone, videos, cfg, device=device).backbone()
        for name, target in targets.items():
            results[name]["pretrained"].append(average_precision_loop(*features(trained, target, device), target.q_pid,
                                                                      target.g_pid, target.q_cam, target.g_cam))
        print(f"seed {seed}: " + ", ".join(f"{n} {100 * r['random'][-1]:.1f} -> {100 * r['pretrained'][-1]:.1f}"
                                           for n, r in results.items()), flush=True)
    minutes = (time.perf_counter() - t0) / 60

    def pct(values: list[float]) -> str:
        return f"{100 * statistics.fmean(values):.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")

    lines = [f"# Bare backbone mAP (%), no fine-tuning: {recipe.model.backbone} at {height}x{width}, MoCo v3 "
             f"pre-training {steps} steps x {batch} images ({per_video} per video, {buffer_videos} videos buffered, "
             f"crop scale {views[0].crop_scale}) on SynthReID's single-camera set, "
             f"seeds {seeds}, {minutes:.1f} min on {device.type}", "",
             "| split | chance | random init | pre-trained | pre-trained - random |", "|---|---:|---:|---:|---:|"]
    for name, target in targets.items():
        r = results[name]
        chance = chance_map(target.q_pid, target.g_pid, target.q_cam, target.g_cam)
        gain = [p - q for p, q in zip(r["pretrained"], r["random"])]
        lines.append(f"| {name} | {100 * chance:.1f} | {pct(r['random'])} | {pct(r['pretrained'])} | {pct(gain)} |")
    lines += ["", "mAP by an independent numpy loop (SPEC 3 semantics); chance = mean mAP of 50 random rankings."]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
