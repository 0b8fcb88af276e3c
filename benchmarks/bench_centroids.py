"""Centroid bank (fp16 storage, momentum update + Centroids loss) vs a plain fp32 ``nn.Linear``
identity classifier of the same size (forward + backward + SGD step): time per step and memory.

    .venv/bin/python benchmarks/bench_centroids.py [--quick] [--out FILE.md] [--device cuda]

Every (size, method) case runs in a fresh subprocess. Peak memory = the highest footprint during
the timed steps (state + transients), less the process's footprint before any state was built:
peak RSS (Linux ``VmHWM``, reset after set-up) on CPU, ``max_memory_allocated`` on CUDA.
Bank methods: ``all`` (softmax over every centroid), ``sampled-random`` / ``sampled-hard``
(batch identities + K_neg negatives); same-video masking on, as in training.
A bank step = loss on online features (unit, grad) + backward + momentum update from momentum
features; a linear step = logits of the features -> cross-entropy -> backward -> SGD step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("linear-fp32", "all", "sampled-random", "sampled-hard")
DIM = 768
BATCH = 128
NUM_NEGATIVES = 4096
IDS_PER_VIDEO = 20  # single-camera identities are video-local: ~20 per video (430K ids / 21K videos)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so set-up temporaries do not count."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_case(method: str, num_ids: int, steps: int, device: str) -> dict:
    """Time ``steps`` steps (after one warm-up) of one method at one size; returns a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    import dynamix_core  # noqa: F401
    from dynamix_core.centroids import CentroidBank, CentroidBankConfig

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    base_rss = _rss_bytes()
    pid_steps = torch.randint(0, num_ids, (steps + 1, BATCH), device=device)
    feat_steps = F.normalize(torch.randn(steps + 1, BATCH, DIM, device=device), dim=2)

    if method == "linear-fp32":
        classifier = torch.nn.Linear(DIM, num_ids, bias=False, device=device)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01)
        state_bytes = 2 * classifier.weight.numel() * 4  # weight + its gradient

        def step(i: int) -> None:
            feat_BD = feat_steps[i].clone().requires_grad_(True)
            F.cross_entropy(classifier(feat_BD), pid_steps[i]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    else:
        mode, _, sampling = method.partition("-")
        cfg = CentroidBankConfig(loss_mode=mode, negative_sampling=sampling or "random",
                                 num_negatives=NUM_NEGATIVES, mask_same_video=True)
        bank = CentroidBank(num_ids, DIM, cfg, device=device)
        for start in range(0, num_ids, cfg.chunk_rows):  # chunked init: no full fp32 temporary
            stop = min(start + cfg.chunk_rows, num_ids)
            bank.centroids[start:stop] = F.normalize(torch.randn(stop - start, DIM, device=device), dim=1).half()
        bank.row_video = torch.arange(num_ids, device=device) // IDS_PER_VIDEO
        state_bytes = bank.nbytes
        momentum_steps = F.normalize(feat_steps + 0.1 * torch.randn_like(feat_steps), dim=2)

        def step(i: int) -> None:
            feat_BD = feat_steps[i].clone().requires_grad_(True)
            pid_B = pid_steps[i]
            tau_B = bank.temperatures(torch.ones_like(pid_B, dtype=torch.bool))
            bank.loss(feat_BD, pid_B, tau_B, bank.row_video[pid_B]).backward()
            bank.update(momentum_steps[i], pid_B, step=i)

    step(0)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes() - base_rss
    return {"method": method, "num_ids": num_ids, "ms_per_step": seconds * 1e3, "state_bytes": state_bytes,
            "peak_bytes": peak}


def table(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| identities | method | ms/step | state MB | peak MB | time vs linear | state vs linear | peak vs linear |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        ref = next(r for r in results if r["num_ids"] == res["num_ids"] and r["method"] == "linear-fp32")
        lines.append(
            f"| {res['num_ids']:,} | {res['method']} | {res['ms_per_step']:.1f} | {res['state_bytes'] / 2**20:.0f} "
            f"| {res['peak_bytes'] / 2**20:.0f} | {res['ms_per_step'] / ref['ms_per_step']:.2f}x "
            f"| {res['state_bytes'] / ref['state_bytes']:.2f}x | {res['peak_bytes'] / ref['peak_bytes']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (10K, 50K identities)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="identity counts (default 100K 434K 1M)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 1; 3 with --quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: METHOD:N in a subprocess
    args = ap.parse_args()

    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        method, num_ids = args.case.split(":")
        print(json.dumps(run_case(method, int(num_ids), args.steps, args.device)))
        return 0

    sizes = args.sizes or ([10_000, 50_000] if args.quick else [100_000, 434_000, 1_000_000])
    steps = args.steps or (3 if args.quick else 1)
    results = []
    for num_ids in sizes:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--case", f"{method}:{num_ids}", "--steps", str(steps),
                   "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{method:>15} N={num_ids:>9,}: {r['ms_per_step']:9.1f} ms/step, "
                  f"peak {r['peak_bytes'] / 2**20:8.0f} MB", flush=True)
    header = (f"### Centroid bank vs fp32 nn.Linear classifier (D={DIM}, batch {BATCH}, K_neg {NUM_NEGATIVES}, "
              f"{args.device}, {args.threads} threads, mean of {steps} steps after 1 warm-up)")
    report = table(results, header)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
