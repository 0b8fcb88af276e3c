"""Retrieval evaluation: chunked exact ranking (``evaluate_features``) vs the dense reference.

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--out FILE.md] [--dim 768]

Reference = torchreid's python ``eval_market1501``: full query x gallery distance matrix, full
argsort of every row (``kind="stable"``, which SPEC 3's tie rule needs), then a per-query loop
(its AP list comprehension written as the equivalent numpy expression, so the reference is not
handicapped by a Python loop over gallery entries). Both sides use the same float32 distances.

Data: gallery/query sizes of Market-1501 (3,368 x 15,913; 751 test ids, 6 cameras, plus
distractor images) and MSMT17 (11,659 x 82,161; 3,060 ids, 15 cameras); every identity has images
under several cameras. Features: random unit vectors of dimension ``--dim`` (768 = ViT-B)
drawn around one random centre per identity, so metrics land in a realistic range.

Every measured configuration runs in its own subprocess; time is wall clock of the evaluation
(distances included), peak memory is the subprocess's ru_maxrss. At MSMT17 size the reference
would need ~20 GB, so it is measured on a query subset and extrapolated linearly (the output
says so); the chunked implementation runs on the full query set and on the same subset, whose
metrics must agree with the reference's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {  # name: (queries, gallery, identities, cameras, distractor gallery images)
    "market1501": (3368, 15913, 751, 6, 2793),
    "msmt17": (11659, 82161, 3060, 15, 0),
}
QUICK_SIZES = {"market1501": (842, 3978, 188, 6, 698), "msmt17": (2915, 20540, 765, 15, 0)}


def make_data(name: str, sizes: dict, dim: int):
    """Deterministic labels and unit features for one benchmark size."""
    import torch

    num_q, num_g, num_ids, num_cams, num_distractors = sizes[name]
    rng = np.random.default_rng(0)
    g_pids = np.concatenate([rng.integers(0, num_ids, num_g - num_distractors), np.full(num_distractors, num_ids)])
    g_camids = rng.integers(0, num_cams, num_g)
    q_pids = rng.integers(0, num_ids, num_q)
    q_camids = rng.integers(0, num_cams, num_q)
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(num_ids + 1, dim, generator=gen), dim=1)
    g_feat = torch.nn.functional.normalize(centres[g_pids] + 0.09 * torch.randn(num_g, dim, generator=gen), dim=1)
    q_feat = torch.nn.functional.normalize(centres[q_pids] + 0.09 * torch.randn(num_q, dim, generator=gen), dim=1)
    return q_feat, g_feat, q_pids, g_pids, q_camids, g_camids


def reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid ``eval_market1501`` (python version) with a stable argsort; returns the metrics."""
    num_q = distmat.shape[0]
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        max_pos_idx = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum() / np.arange(1, len(raw_cmc) + 1) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    return {"mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)),
            "cmc": np.asarray(all_cmc, dtype=np.float64).mean(0).tolist(), "num_valid_queries": len(all_ap)}


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: ``spec`` = {size, quick, dim, impl, num_queries}."""
    import torch

    from dynamix_core.evaluation.features import distance_to_gallery, pairwise_distance, prepare_gallery
    from dynamix_core.evaluation.rank import RankAccumulator

    torch.set_num_threads(spec["threads"])
    sizes = QUICK_SIZES if spec["quick"] else SIZES
    q_feat, g_feat, q_pids, g_pids, q_camids, g_camids = make_data(spec["size"], sizes, spec["dim"])
    nq = spec["num_queries"]
    q_feat, q_pids, q_camids = q_feat[:nq], q_pids[:nq], q_camids[:nq]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    out = {}
    t0 = time.perf_counter()
    if spec["impl"] == "chunked":
        # evaluate_features' loop, spelled out to time the distance and ranking stages separately.
        gallery = prepare_gallery(g_feat, "cosine")
        acc = RankAccumulator(q_pids, g_pids, q_camids, g_camids)
        out["distance_s"] = 0.0
        for start in range(0, nq, 64):
            t = time.perf_counter()
            dist_QG = distance_to_gallery(q_feat[start:start + 64], gallery, "cosine")
            out["distance_s"] += time.perf_counter() - t
            acc.add_chunk(start, dist_QG)
        m = acc.result(50)
        out["total_s"] = time.perf_counter() - t0
        metrics = {"mAP": m["mAP"], "mINP": m["mINP"], "cmc": m["cmc"].tolist(), "num_valid_queries": m["num_valid_queries"]}
    else:
        distmat = pairwise_distance(q_feat, g_feat, "cosine").numpy()
        out["distance_s"] = time.perf_counter() - t0
        metrics = reference_eval(distmat, q_pids, g_pids, q_camids, g_camids)
        out["total_s"] = time.perf_counter() - t0
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["base_gib"] = base_rss
    out["threads"] = torch.get_num_threads()
    out["metrics"] = metrics
    return out


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def agree(a: dict, b: dict) -> str:
    diff = max(abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"]),
               float(np.max(np.abs(np.asarray(a["cmc"]) - np.asarray(b["cmc"])))))
    same = a["num_valid_queries"] == b["num_valid_queries"] and diff <= 1e-6
    return f"{'yes' if same else 'NO'} (max |diff| {diff:.1e})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quarter-size data (a smoke run)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--dim", type=int, default=768, help="feature dimension (768 = ViT-B/16 embedding)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each measurement (numpy's argsort is single-threaded; 1 = like for like)")
    ap.add_argument("--ref-queries", type=int, default=1000, help="MSMT17 query subset for the dense reference")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sizes = QUICK_SIZES if args.quick else SIZES
    rows, notes, ok = [], [], True
    for name, (num_q, num_g, *_rest) in sizes.items():
        sub_q = num_q if name == "market1501" else min(num_q, args.ref_queries // (4 if args.quick else 1))
        spec = {"size": name, "quick": args.quick, "dim": args.dim, "threads": args.threads}
        mine_full = run_worker({**spec, "impl": "chunked", "num_queries": num_q})
        mine_sub = mine_full if sub_q == num_q else run_worker({**spec, "impl": "chunked", "num_queries": sub_q})
        ref = run_worker({**spec, "impl": "reference", "num_queries": sub_q})
        scale = num_q / sub_q
        ref_s = ref["total_s"] * scale
        ref_peak = ref["base_gib"] + (ref["peak_gib"] - ref["base_gib"]) * scale
        extrap = " (extrapolated)" if scale > 1 else ""
        agreement = agree(mine_sub["metrics"], ref["metrics"])
        ok &= agreement.startswith("yes")
        mine_rank_s = mine_full["total_s"] - mine_full["distance_s"]
        ref_rank_s = (ref["total_s"] - ref["distance_s"]) * scale
        rows.append(f"| {name} | {num_q:,} x {num_g:,} | {mine_full['total_s']:.1f} | {mine_rank_s:.1f} "
                    f"| {mine_full['peak_gib']:.2f} | {ref_s:.1f}{extrap} | {ref_rank_s:.1f}{extrap} "
                    f"| {ref_peak:.1f}{extrap} | {ref_s / mine_full['total_s']:.1f}x | {ref_rank_s / mine_rank_s:.1f}x "
                    f"| {mine_full['metrics']['mAP']:.4f} | {agreement} |")
        notes.append(f"- {name}: reference measured on {sub_q:,} of {num_q:,} queries"
                     + (f", its times and its memory above the baseline SCALED LINEARLY by {scale:.2f}" if scale > 1 else "")
                     + f"; distances {mine_full['distance_s']:.1f} s (chunked) vs {ref['distance_s'] * scale:.1f} s "
                     f"(reference); baseline RSS (interpreter, torch, features) {ref['base_gib']:.2f} GiB.")
    table = "\n".join([
        f"## Evaluation: chunked exact ranking vs dense reference (cosine, d={args.dim}, "
        f"torch threads {args.threads}{', QUICK sizes' if args.quick else ''})",
        "",
        "| data | queries x gallery | chunked total s | chunked ranking s | chunked peak GiB | reference total s "
        "| reference ranking s | reference peak GiB | speed-up total | speed-up ranking | mAP | metrics agree (same queries) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "- total = float32 distance matmul + ranking (the matmul is the same work on both sides, so it caps the "
        "total speed-up); ranking = everything after the distances (reference: argsort of full rows + per-query "
        "loop; chunked: histogram ranking). Peak = ru_maxrss of one subprocess per configuration.",
    ])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
