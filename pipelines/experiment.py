"""Comparison runs on SynthReID under one budget (``dynamix experiment recipes|mixing``).

Every recipe of a suite is trained on the same demo data (:func:`pipelines.demo.prepare_data`) with
the same ``run.max_steps`` and its demo recipe's batch of 64 images per worker on 2 workers, then
evaluated on the held-out target domain, once per seed (``--seeds``, default 3); one markdown row per
recipe (mean ± std of mAP and Rank-1 over seeds, and each seed's mAP) is printed and saved with a bar
plot under ``OUT/experiments/``. Runs are named by recipe, seed, steps and any ``--set`` overrides (not
by suite), so a re-run skips the runs that already finished and resumes an interrupted one, and
``recipes`` reuses the three runs per seed that ``mixing`` already trained.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

from pipelines.demo import demo_config, prepare_data
from pipelines.recipes import RECIPES_DIR

#: suite -> (row name, demo recipe); every demo recipe trains 64 images per step on each worker
SUITES: dict[str, list[tuple[str, str]]] = {
    "recipes": [("multicam", "multicam_baseline_demo.yaml"), ("cluster_contrast", "cluster_contrast_demo.yaml"),
                ("domainmix", "domainmix_demo.yaml"), ("calr", "calr_demo.yaml"), ("remix", "remix_demo.yaml"),
                ("dynamix", "dynamix_demo.yaml")],
    "mixing": [("multicam", "multicam_baseline_demo.yaml"), ("remix", "remix_demo.yaml"),
               ("dynamix", "dynamix_demo.yaml")],
}


def run_suite(suite: str, out: Path, *, steps: int, seeds: int = 3, overrides: list[str] = (),
              address: str | None = None) -> list[dict]:
    """Train and evaluate every recipe of ``suite`` with ``seeds`` seeds (``run.seed`` 0..seeds-1);
    returns one row per recipe with the mean and standard deviation over seeds."""
    from pipelines.train.driver import run_training

    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: expected one of {sorted(SUITES)}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    out = out.resolve()
    prepare_data(out)
    t0 = time.perf_counter()
    rows = []
    for name, recipe in SUITES[suite]:
        runs = []
        for seed in range(seeds):
            run_name = run_name_for(name, seed, steps, overrides)
            storage = out / "experiments" / "runs"
            done = storage / run_name / "result.json"
            if done.is_file() and "eval/mAP" in json.loads(done.read_text())["metrics"]:
                metrics = json.loads(done.read_text())["metrics"]  # finished earlier: a resumed run reports nothing
                print(f"[experiment] {name} seed {seed}: finished earlier ({done})", flush=True)
            else:
                extra = [f"run.name={run_name}", f"run.storage={storage}", f"run.max_steps={steps}", f"run.seed={seed}",
                         "run.eval_every=0"]
                extra += list(overrides) + ([f"scaling.address={address}"] if address else [])
                cfg = demo_config(out, str(RECIPES_DIR / recipe), extra)
                print(f"[experiment] {name} seed {seed}: {cfg.method}, {steps} steps on {cfg.scaling.num_workers} "
                      "workers", flush=True)
                metrics = run_training(cfg).metrics
            runs.append({"seed": seed, "mAP": float(metrics["eval/mAP"]), "rank1": float(metrics["eval/rank1"])})
        rows.append(aggregate(name, recipe, runs))
    folder = out / "experiments"
    stem = f"{suite}_{steps}_{seeds}seeds"
    table = format_table(rows, suite, steps, seeds, (time.perf_counter() - t0) / 60)
    (folder / f"{stem}.md").write_text(table + "\n")
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    plot_rows(rows, folder / f"{stem}.png", title=f"SynthReID target, suite {suite}, {steps} steps, {seeds} seeds")
    print(table, flush=True)
    print(f"[experiment] table and plot: {folder / stem}.md / .png", flush=True)
    return rows


def run_name_for(row: str, seed: int, steps: int, overrides: list[str] = ()) -> str:
    """One run per (recipe, seed, steps, overrides), shared by every suite that contains the recipe."""
    name = f"{row}-s{seed}-{steps}"
    if overrides:
        name += "-" + hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return name


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(row: str, description: str, runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of a row's runs (``{"mAP", "rank1"}`` each)."""
    m_mean, m_std = mean_std([r["mAP"] for r in runs])
    r_mean, r_std = mean_std([r["rank1"] for r in runs])
    return {"row": row, "setting": description, "mAP_mean": m_mean, "mAP_std": m_std, "rank1_mean": r_mean,
            "rank1_std": r_std, "runs": runs}


def format_table(rows: list[dict], suite: str, steps: int, seeds: int, minutes: float) -> str:
    pct = lambda mean, std: f"{100 * mean:.1f} ± {100 * std:.1f}"  # noqa: E731
    lines = [f"SynthReID target domain, suite `{suite}`: {steps} steps x 64 images per worker, 2 workers, "
             f"from scratch, {seeds} seeds, mean ± std ({minutes:.0f} min)",
             "", "| recipe | mAP | Rank-1 | mAP per seed |", "|---|---:|---:|---|"]
    for r in rows:
        per_seed = ", ".join(f"{100 * x['mAP']:.1f}" for x in r["runs"])
        lines.append(f"| {r['row']} | {pct(r['mAP_mean'], r['mAP_std'])} | {pct(r['rank1_mean'], r['rank1_std'])} | "
                     f"{per_seed} |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path, title: str) -> Path:
    """Bars of mean target mAP and Rank-1 per row with the seed standard deviation as error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for offset, metric, label in ((-0.2, "mAP", "mAP"), (0.2, "rank1", "Rank-1")):
        ax.bar(x + offset, [100 * r[f"{metric}_mean"] for r in rows], width=0.4,
               yerr=[100 * r[f"{metric}_std"] for r in rows], capsize=3, label=label)
    ax.set_xticks(x, [str(r["row"]).replace("_", "\n") for r in rows])  # long names would overlap
    ax.set_ylabel("% on the target domain")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
