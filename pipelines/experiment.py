"""Comparison runs on SynthReID under one budget (``dynamix experiment recipes|mixing``).

Every recipe of a suite is trained on the same demo data (:func:`pipelines.demo.prepare_data`) with
the same ``run.max_steps`` and its demo recipe's batch of 64 images per worker on 2 workers, then
evaluated on the held-out target domain; one markdown row per recipe (mAP, Rank-1) is printed and
saved under ``OUT/experiments/``. Runs are named by suite, recipe and steps, so a re-run skips the
recipes that already finished and resumes an interrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.demo import REPO, demo_config, prepare_data

#: suite -> (row name, demo recipe); every demo recipe trains 64 images per step on each worker
SUITES: dict[str, list[tuple[str, str]]] = {
    "recipes": [("multicam", "multicam_baseline_demo.yaml"), ("cluster_contrast", "cluster_contrast_demo.yaml"),
                ("domainmix", "domainmix_demo.yaml"), ("calr", "calr_demo.yaml"), ("remix", "remix_demo.yaml"),
                ("dynamix", "dynamix_demo.yaml")],
    "mixing": [("multicam", "multicam_baseline_demo.yaml"), ("remix", "remix_demo.yaml"),
               ("dynamix", "dynamix_demo.yaml")],
}


def run_suite(suite: str, out: Path, *, steps: int, overrides: list[str] = (), address: str | None = None) -> list[dict]:
    """Train and evaluate every recipe of ``suite``; returns one row per recipe."""
    from pipelines.train.driver import run_training

    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: expected one of {sorted(SUITES)}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    out = out.resolve()
    prepare_data(out)
    rows = []
    for name, recipe in SUITES[suite]:
        run_name = f"{suite}-{name}-{steps}"
        storage = out / "experiments" / "runs"
        done = storage / run_name / "result.json"
        t0 = time.perf_counter()
        if done.is_file() and "eval/mAP" in json.loads(done.read_text())["metrics"]:
            metrics = json.loads(done.read_text())["metrics"]  # finished earlier: a resumed run reports nothing
            print(f"[experiment] {name}: finished earlier ({done})", flush=True)
        else:
            extra = [f"run.name={run_name}", f"run.storage={storage}", f"run.max_steps={steps}", "run.eval_every=0"]
            extra += list(overrides) + ([f"scaling.address={address}"] if address else [])
            cfg = demo_config(out, str(REPO / "recipes" / recipe), extra)
            print(f"[experiment] {name}: {cfg.method}, {steps} steps on {cfg.scaling.num_workers} workers", flush=True)
            metrics = run_training(cfg).metrics
        rows.append({"recipe": name, "mAP": float(metrics["eval/mAP"]), "rank1": float(metrics["eval/rank1"]),
                     "minutes": (time.perf_counter() - t0) / 60})
    table = format_table(rows, suite, steps)
    folder = out / "experiments"
    (folder / f"{suite}_{steps}.md").write_text(table + "\n")
    (folder / f"{suite}_{steps}.json").write_text(json.dumps(rows, indent=2))
    print(table, flush=True)
    return rows


def format_table(rows: list[dict], suite: str, steps: int) -> str:
    lines = [f"SynthReID target domain, suite `{suite}`: {steps} steps x 64 images per worker, 2 workers, "
             "vit_tiny 128x64 from scratch",
             "", "| recipe | mAP | Rank-1 |", "|---|---:|---:|"]
    lines += [f"| {r['recipe']} | {100 * r['mAP']:.1f} | {100 * r['rank1']:.1f} |" for r in rows]
    return "\n".join(lines)
