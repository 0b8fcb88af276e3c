"""Pseudo-labelling and relabeling: batched torch DBSCAN vs a per-video scikit-learn loop, and label
quality before/after the DynaMix Relabeling Module.

    .venv/bin/python benchmarks/bench_labeling.py [--quick] [--device cuda] [--out FILE.md]

1. ReMix pseudo-labelling: unit embeddings (d 256) in videos of 60-140 images (2-6 identities per
   video sharing a video style, plus 10% outliers), DBSCAN cosine eps 0.5 min_samples 4 per video.
   Default 200K images in 2K videos (--quick: 20K in 200). Both backends must return identical labels.
2. Relabeling on SynthReID's single-camera tracklet structure (dynamix_core.data.synth plans: real
   fragmentation and identity switches with ground truth) with *simulated* features: a prototype per
   person + a video style + per-image noise (no images are rendered). Pairwise F-score of the tracker
   labels before and after one relabel pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamix_core.data.synth.config import SynthConfig  # noqa: E402
from dynamix_core.data.synth.videos import video_plans  # noqa: E402
from dynamix_core.labeling import RelabelConfig, cluster_videos, relabel_videos, round_report  # noqa: E402

DIM = 256


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pseudo_label_data(num_videos: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    sizes = rng.integers(60, 141, num_videos)
    vid = np.repeat(np.arange(num_videos), sizes)
    style = unit(rng.normal(size=(num_videos, DIM)))
    people = rng.integers(2, 7, num_videos)
    person = (rng.random(len(vid)) * people[vid]).astype(np.int64)
    proto = unit(rng.normal(size=(num_videos, 6, DIM)))
    x = proto[vid, person] + 0.6 * style[vid] + 0.55 * rng.normal(size=(len(vid), DIM)) / np.sqrt(DIM)
    outlier = rng.random(len(vid)) < 0.1
    x[outlier] = 0.6 * style[vid[outlier]] + 1.2 * rng.normal(size=(outlier.sum(), DIM)) / np.sqrt(DIM)
    return unit(x).astype(np.float32), vid


def bench_pseudo_labels(num_videos: int, device: torch.device) -> list[str]:
    x, vid = pseudo_label_data(num_videos, np.random.default_rng(0))
    if device.type == "cuda":  # CUDA context and kernels loaded outside the timing
        cluster_videos(torch.from_numpy(x[vid < 4]).to(device), vid[vid < 4], 0.5, 4, backend="torch")
    t0 = time.perf_counter()
    got = cluster_videos(torch.from_numpy(x).to(device), vid, 0.5, 4, backend="torch")  # labels return on the CPU
    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = cluster_videos(x, vid, 0.5, 4, backend="sklearn")
    t_sk = time.perf_counter() - t0
    identical = bool(np.array_equal(got, ref))
    print(f"pseudo-labels: {len(x)} images, {num_videos} videos: torch {t_torch:.2f}s, sklearn loop {t_sk:.2f}s, "
          f"identical labels: {identical}", flush=True)
    if not identical:
        raise SystemExit("torch and sklearn backends disagree")
    return [
        f"| per-video DBSCAN, {len(x)} x {DIM} in {num_videos} videos | sklearn loop | {t_sk:.2f} | 1.0 | "
        f"{ref.max() + 1} clusters, noise {np.mean(ref < 0):.3f} |",
        f"| per-video DBSCAN, {len(x)} x {DIM} in {num_videos} videos | torch batched ({device.type}) | {t_torch:.2f} | "
        f"{t_sk / t_torch:.1f}x | identical labels: {identical} |",
    ]


def synth_tracklets(num_videos: int, rng: np.random.Generator):
    """SynthReID plans -> per box: video, tracker label, frame, true pid, simulated feature."""
    cfg = SynthConfig(num_videos=num_videos, fragment_rate=0.3, switch_rate=0.15)
    vid, tracklet, frame, true = [], [], [], []
    for plan in video_plans(cfg):
        for box in plan.boxes:
            vid.append(plan.video)
            tracklet.append(plan.first_tracker_pid + box.tracklet)
            frame.append(box.frame)
            true.append(plan.walks[box.person].true_pid)
    vid, tracklet, frame, true = map(np.asarray, (vid, tracklet, frame, true))
    proto = unit(rng.normal(size=(true.max() + 1, DIM)))
    style = unit(rng.normal(size=(vid.max() + 1, DIM)))
    feat = proto[true] + 0.5 * style[vid] + 0.5 * rng.normal(size=(len(true), DIM)) / np.sqrt(DIM)
    return unit(feat).astype(np.float32), vid, tracklet, frame, true


def bench_relabel(num_videos: int) -> list[str]:
    feat, vid, tracklet, frame, true = synth_tracklets(num_videos, np.random.default_rng(1))
    before = round_report(tracklet, true)
    t0 = time.perf_counter()
    result = relabel_videos(feat, vid, tracklet, frame, RelabelConfig(), next_id=int(tracklet.max()) + 1)
    elapsed = time.perf_counter() - t0
    after = round_report(result.labels, true, result.changes)
    print(f"relabel: {len(feat)} images, {num_videos} videos in {elapsed:.2f}s; F {before['pair_f_score']:.3f} -> "
          f"{after['pair_f_score']:.3f}, splits {len(result.changes.splits)}, merges {len(result.changes.merges)}",
          flush=True)
    rows = []
    for name, rep in (("tracker labels", before), ("after one relabel pass", after)):
        rows.append(
            f"| relabel, SynthReID tracklets ({len(feat)} images, {num_videos} videos), simulated features | {name} | "
            f"{elapsed if rep is after else 0:.2f} | - | P {rep['pair_precision']:.3f} R {rep['pair_recall']:.3f} "
            f"F {rep['pair_f_score']:.3f}, purity {rep['purity']:.3f}, fragmentation {rep['fragmentation']:.2f}, "
            f"noise {rep['noise_rate']:.3f}"
            + (f", {int(rep['num_splits'])} splits, {int(rep['num_merges'])} merges |" if "num_splits" in rep else " |")
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20K images / 200 videos and 40 relabel videos")
    ap.add_argument("--device", default="cpu", help="where the torch backend runs: cpu or cuda (the sklearn "
                                                     "reference always runs on the CPU)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = ["| case | implementation | seconds | speed-up | result |", "|---|---|---|---|---|"]
    rows += bench_pseudo_labels(200 if args.quick else 2000, torch.device(args.device))
    rows += bench_relabel(40 if args.quick else 400)
    table = "\n".join(
        [f"# bench_labeling ({'quick' if args.quick else 'default'}; {os.cpu_count()} CPU cores, "
         f"torch {torch.get_num_threads()} threads"
         f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''})", "", *rows, ""]
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
