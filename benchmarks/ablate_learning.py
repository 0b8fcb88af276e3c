"""One row of the plain-loop learning ablations of docs/learning.md (not part of ``make bench``: a
row trains for minutes).

The demo recipe's optimisation step (multi-camera part: sampler, two views, TrainStep with its four
losses and EMA, centroid refresh) in one process on the three multi-camera sets of an existing
``dynamix demo`` data folder; then the in-domain (synth_m0) and target mAP of the momentum encoder
f~, computed with scikit-learn (tests/test_learning.py's helpers), next to the colour histogram.

    .venv/bin/python benchmarks/ablate_learning.py --steps 1500 \\
        --set data.transform.height=64 --set data.transform.width=32 --set model.img_size=[64,32] \\
        --set model.num_stripes=2 --set model.ibn=true
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from test_learning import colour_histogram, embed, read_market, read_train_sets, sklearn_map  # noqa: E402

SETS = ("synth_m0", "synth_m1", "synth_m2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data", help="a `dynamix demo` data folder (SynthReID)")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "multicam_baseline_demo.yaml"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from dynamix_core.centroids import build_centroid_bank
    from dynamix_core.config import load_config
    from dynamix_core.data.images import decode_image
    from dynamix_core.data.transforms import ViewTransform, sample_generator
    from dynamix_core.model import build_encoder
    from dynamix_core.sampling.multicam import MultiCameraSampler
    from dynamix_core.training import TrainStep
    from dynamix_core.training.step import StepBatch
    from pipelines.train.config import TrainConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data_root = Path(args.data)
    if not (data_root / "multi" / SETS[0]).is_dir():
        print(f"ablate_learning: {data_root}/multi/{SETS[0]} not found: run `make demo` first or pass --data", file=sys.stderr)
        return 2
    cfg = load_config(TrainConfig, args.recipe, [f"run.max_steps={args.steps}", *args.overrides])
    data, pid, cam, dataset = read_train_sets(data_root / "multi", SETS)
    num_ids = int(pid.max()) + 1
    size = (cfg.data.transform.height, cfg.data.transform.width)
    images = [decode_image(b, size) for b in data]
    standard, strong = ViewTransform(cfg.data.transform, "standard"), ViewTransform(cfg.data.transform, "strong")
    test_view = ViewTransform(cfg.data.transform, "test")
    model = build_encoder(cfg.model)
    bank = build_centroid_bank(cfg.centroids, num_ids, model.embed_dim)
    step_fn = TrainStep(model, bank, loss_cfg=cfg.loss, optim_cfg=cfg.optim, ema_momentum=cfg.model.ema_momentum,
                        total_steps=args.steps, device=torch.device("cpu"))
    sampler = MultiCameraSampler(np.arange(len(data)), pid, cam, dataset,
                                 images_per_id=cfg.sampler.multi_images_per_id, seed=args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step % 25 == 0:  # centroids of every train identity from f~
            with torch.no_grad():
                feats = torch.cat([step_fn.momentum.embed(torch.stack([test_view(im) for im in images[i:i + 256]]))
                                   for i in range(0, len(images), 256)])
            bank.reinit(feats, torch.as_tensor(pid), step=step, video_M=torch.full((len(pid),), -1))
        refs, pids = sampler.sample(cfg.sampler.num_multi_ids)
        refs = np.asarray(refs)
        step_fn(StepBatch(
            torch.stack([standard(images[i], sample_generator(step, str(i), "standard")) for i in refs]),
            torch.stack([strong(images[i], sample_generator(step, str(i), "strong")) for i in refs]),
            torch.as_tensor(pids), torch.as_tensor(cam[refs]),
            torch.zeros(len(refs), dtype=torch.bool), torch.full((len(refs),), -1)), step)
    seconds = time.perf_counter() - t0

    row = {"steps": args.steps, "overrides": args.overrides, "train_seconds": round(seconds)}
    for name, root in (("in_domain", data_root / "multi" / "synth_m0"), ("target", data_root / "target" / "synth_target")):
        (qd, qp, qc), (gd, gp, gc) = (read_market(root, f) for f in ("query", "bounding_box_test"))
        row[f"{name}_mAP"] = sklearn_map(embed(step_fn.momentum, qd, cfg), embed(step_fn.momentum, gd, cfg), qp, gp, qc, gc)
        row[f"{name}_colour_mAP"] = sklearn_map(colour_histogram(qd), colour_histogram(gd), qp, gp, qc, gc)
    print(json.dumps(row))
    print(f"| {' '.join(args.overrides) or 'recipe'} | {args.steps} | {row['train_seconds']} | "
          f"{100 * row['in_domain_mAP']:.1f} | {100 * row['target_mAP']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
