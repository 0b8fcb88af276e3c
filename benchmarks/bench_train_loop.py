"""Ray Train overhead: the DynaMix worker step under a 1-worker TorchTrainer vs the same step run
bare in this process, on the same in-memory batches (the goal: ratio >= 0.9,
Ray Train costing at most a tenth of the step).

    .venv/bin/python benchmarks/bench_train_loop.py [--quick] [--steps 30] [--out FILE.md]

Both variants run TrainStep (encoder on two views, momentum keys, the four losses, AdamW, EMA, bank
update) with identical model, bank and batches, one torch thread each, reporting metrics every
`--report-every` steps like the real loop (ray.train.report is a barrier). The batches are built
before timing in both, so the ratio isolates the harness (worker process, report/checkpoint calls).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def build(cfg: dict):
    import torch

    import dynamix_core  # noqa: F401
    from dynamix_core.centroids import CentroidBank, CentroidBankConfig
    from dynamix_core.losses import LossConfig
    from dynamix_core.model import ModelConfig, build_encoder
    from dynamix_core.training import OptimConfig, StepBatch, TrainStep

    torch.manual_seed(0)
    torch.set_num_threads(1)
    h, w = cfg["img"]
    model = build_encoder(ModelConfig(backbone=cfg["backbone"], img_size=(h, w), drop_path_rate=0.0))
    bank = CentroidBank(cfg["ids"], model.embed_dim, CentroidBankConfig(mask_same_video=True))
    bank.load_rows(torch.arange(cfg["ids"]), torch.randn(cfg["ids"], model.embed_dim), step=0)
    step = TrainStep(model, bank, loss_cfg=LossConfig(), optim_cfg=OptimConfig(), ema_momentum=0.999,
                     total_steps=cfg["steps"] + cfg["warmup"], device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        B = cfg["batch"]
        pid = torch.randint(0, cfg["ids"], (B // 4,), generator=g).repeat_interleave(4)
        batches.append(StepBatch(torch.randn(B, 3, h, w, generator=g), torch.randn(B, 3, h, w, generator=g), pid,
                                 torch.randint(0, 6, (B,), generator=g), torch.arange(B) >= B // 2,
                                 torch.where(torch.arange(B) >= B // 2, pid % 7, -1)))
    step.set_camera_centroids(torch.randn(32, model.embed_dim), torch.arange(32) % cfg["ids"], torch.arange(32) % 6)
    return step, batches


def timed_loop(cfg: dict, report=None) -> float:
    step, batches = build(cfg)
    for i in range(cfg["warmup"]):
        step(batches[i % len(batches)], i)
    t0 = time.perf_counter()
    for i in range(cfg["steps"]):
        step(batches[i % len(batches)], cfg["warmup"] + i)
        if report is not None and (i + 1) % cfg["report_every"] == 0:
            report({"step": i + 1})
    return cfg["steps"] / (time.perf_counter() - t0)


def ray_worker(config: dict) -> None:
    import ray.train

    rate = timed_loop(config, report=lambda m: ray.train.report(m))
    # Ray Train V2 keeps result.metrics only for reports that carry a checkpoint: hand the figure over by file
    with open(config["result_file"], "w") as fh:
        fh.write(str(rate))


def run_ray(cfg: dict) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        import tempfile

        result_file = os.path.join(tempfile.mkdtemp(), "steps_per_s")
        trainer = TorchTrainer(ray_worker, train_loop_config={**cfg, "result_file": result_file},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="bench_train_loop", storage_path=tempfile.mkdtemp()))
        trainer.fit()
        with open(result_file) as fh:
            return float(fh.read())
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (harness smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    cfg = {"backbone": "vit_tiny_patch16_224", "img": (128, 64), "batch": 64, "ids": 2000, "warmup": 3,
           "steps": 30, "report_every": 10}
    if args.quick:
        cfg.update({"backbone": "test_vit", "img": (32, 16), "batch": 32, "steps": 20})
    if args.steps:
        cfg["steps"] = args.steps
    # interleave: bare, ray, bare -> the bare rate is the mean of the two around the Ray run
    bare1 = timed_loop(cfg)
    ray_rate = run_ray(cfg)
    bare2 = timed_loop(cfg)
    bare = (bare1 + bare2) / 2
    table = "\n".join([
        f"# Worker loop under TorchTrainer vs bare ({cfg['backbone']} {cfg['img'][0]}x{cfg['img'][1]}, batch "
        f"{cfg['batch']} x 2 views, {cfg['steps']} timed steps, 1 thread, report every {cfg['report_every']})",
        "",
        "| variant | steps/s | ratio vs bare |",
        "|---|---:|---:|",
        f"| bare, one process (mean of runs before/after: {bare1:.3f}, {bare2:.3f}) | {bare:.3f} | 1.00 |",
        f"| Ray Train TorchTrainer, 1 worker | {ray_rate:.3f} | {ray_rate / bare:.2f} |",
        "",
        "target: ratio >= 0.9",
    ])
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
