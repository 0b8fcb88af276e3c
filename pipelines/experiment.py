"""Comparison runs on SynthReID under one budget (``dynamix experiment recipes|mixing``).

Every recipe of a suite is trained on the same SynthReID data (:func:`pipelines.demo.prepare_data`,
``--preset demo`` or ``real``) with the same ``run.max_steps`` on 2 workers, then evaluated on the
held-out target domain, once per seed (``--seeds``, default 3; a seed sets the initialisation and the
data order, :func:`seed_overrides`). Every recipe trains the same 16x4 multi-camera images per worker
and step; the mixing recipes add their videos on top (``sampler.videos: add``). One markdown row per
recipe (mean ± std of mAP and Rank-1 over seeds, and each seed's mAP) is printed and saved with a bar
plot under ``OUT/experiments/``; the ``mixing`` suite also prints the paired per-seed differences
with 95 % t-intervals and writes them with the per-seed mAPs as JSON (``--json``). Runs are named by
recipe, seed, steps and a hash of the recipe file, the seed settings and any ``--set`` overrides (not
by suite), so a re-run skips the runs that already finished and resumes an interrupted one, and
``recipes`` reuses the three runs per seed that ``mixing`` already trained. The ``--json`` file is
rewritten after every finished run and lists each run's result by name, so a suite longer than one
sitting continues on another machine from that file alone (committed with the repository, say):
the runs it names are not trained again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

from dynamix_core.atomic import write_atomic
from pipelines.demo import demo_config, prepare_data
from pipelines.recipes import RECIPES_DIR

#: suite -> (row name, demo recipe); every demo recipe trains 16x4 multi-camera images per step on each worker
SUITES: dict[str, list[tuple[str, str]]] = {
    "recipes": [("multicam", "multicam_baseline_demo.yaml"), ("cluster_contrast", "cluster_contrast_demo.yaml"),
                ("domainmix", "domainmix_demo.yaml"), ("calr", "calr_demo.yaml"), ("remix", "remix_demo.yaml"),
                ("dynamix", "dynamix_demo.yaml")],
    "mixing": [("multicam", "multicam_baseline_demo.yaml"), ("remix", "remix_demo.yaml"),
               ("dynamix", "dynamix_demo.yaml")],
}


#: row of the mixing suite -> its key in the JSON of ``--json``
MIXING_KEYS = {"multicam": "multi_only", "remix": "remix", "dynamix": "dynamix"}
#: paired differences of the mixing suite: (name, minuend, subtrahend), JSON keys
PAIRS = [("dynamix - multi_only", "dynamix", "multi_only"), ("remix - multi_only", "remix", "multi_only"),
         ("dynamix - remix", "dynamix", "remix")]


def run_suite(suite: str, out: Path, *, steps: int, seeds: int = 3, overrides: list[str] = (),
              address: str | None = None, preset: str = "demo", json_path: Path | None = None) -> list[dict]:
    """Train and evaluate every recipe of ``suite`` with ``seeds`` seeds (0..seeds-1, each setting
    ``run.seed`` and ``sampler.seed``: :func:`seed_overrides`);
    returns one row per recipe with the mean and standard deviation over seeds."""
    from pipelines.train.driver import run_training

    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: expected one of {sorted(SUITES)}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    out = out.resolve()
    recorded = read_recorded_runs(json_path, preset=preset, steps=steps) if suite == "mixing" else {}
    prepare_data(out, preset=preset)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name, _ in SUITES[suite]}
    for seed in range(seeds):  # seed by seed: an interrupted suite has whole pairs for the seeds it finished
        for name, recipe in SUITES[suite]:
            settings = list(overrides) + seed_overrides(seed) + [f"recipe:{(RECIPES_DIR / recipe).read_text()}"]
            run_name = run_name_for(name, seed, steps, settings)
            storage = out / "experiments" / "runs"
            done = storage / run_name / "result.json"
            if run_name in recorded:  # finished in an earlier sitting, perhaps on another machine
                metrics = {"eval/mAP": recorded[run_name]["mAP"], "eval/rank1": recorded[run_name]["rank1"]}
                print(f"[experiment] {name} seed {seed}: recorded in {json_path}", flush=True)
            elif done.is_file() and "eval/mAP" in json.loads(done.read_text())["metrics"]:
                metrics = json.loads(done.read_text())["metrics"]  # finished earlier: a resumed run reports nothing
                print(f"[experiment] {name} seed {seed}: finished earlier ({done})", flush=True)
            else:
                extra = [f"run.name={run_name}", f"run.storage={storage}", f"run.max_steps={steps}", "run.eval_every=0"]
                extra += seed_overrides(seed)
                extra += list(overrides) + ([f"scaling.address={address}"] if address else [])
                cfg = demo_config(out, str(RECIPES_DIR / recipe), extra)
                print(f"[experiment] {name} seed {seed}: {cfg.method}, {steps} steps on {cfg.scaling.num_workers} "
                      "workers", flush=True)
                metrics = run_training(cfg).metrics
            runs[name].append({"seed": seed, "mAP": float(metrics["eval/mAP"]), "rank1": float(metrics["eval/rank1"])})
            if suite == "mixing" and json_path:
                recorded[run_name] = {"row": name, **runs[name][-1]}
                _write_json(json_path, partial_mixing_result(runs, recorded, preset=preset, steps=steps, seeds=seeds))
    rows = [aggregate(name, recipe, runs[name]) for name, recipe in SUITES[suite]]
    folder = out / "experiments"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}_{preset}_{steps}_{seeds}seeds"
    table = format_table(rows, suite, steps, seeds, (time.perf_counter() - t0) / 60, preset=preset)
    if suite == "mixing":
        result = mixing_result(rows, preset=preset, steps=steps)
        table += "\n\n" + format_differences(result)
        result.update(finished=True, seeds_planned=seeds, runs=recorded)
        for path in [folder / f"{stem}_paired.json"] + ([Path(json_path)] if json_path else []):
            _write_json(path, result)
    (folder / f"{stem}.md").write_text(table + "\n")
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    plot_rows(rows, folder / f"{stem}.png",
              title=f"SynthReID ({preset}) target, suite {suite}, {steps} steps, {seeds} seeds")
    print(table, flush=True)
    print(f"[experiment] table and plot: {folder / stem}.md / .png", flush=True)
    return rows


def _write_json(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_recorded_runs(json_path: Path | None, *, preset: str, steps: int) -> dict[str, dict]:
    """The runs a mixing suite's ``--json`` file already records (``{run name: {row, seed, mAP, rank1}}``);
    none when the file does not exist. A file of another preset or budget is refused, not mixed in."""
    if not json_path or not Path(json_path).is_file():
        return {}
    try:
        got = json.loads(Path(json_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--json {json_path}: not a readable mixing-suite JSON ({e}); move it away to start afresh") from e
    if (got.get("preset"), got.get("steps")) != (preset, steps):
        raise ValueError(f"--json {json_path}: it records preset {got.get('preset')!r} and {got.get('steps')} steps, "
                         f"this suite is preset {preset!r} and {steps} steps; pass another --json file")
    return dict(got.get("runs", {}))


def partial_mixing_result(runs: dict[str, list[dict]], recorded: dict[str, dict], *, preset: str, steps: int,
                          seeds: int) -> dict:
    """The mixing JSON of an unfinished suite: the differences over the seeds every arm has finished
    (none yet: an empty ``seeds``), the planned seed count and every recorded run."""
    done = set.intersection(*({r["seed"] for r in arm} for arm in runs.values()))
    rows = [{"row": name, "runs": [r for r in arm if r["seed"] in done]} for name, arm in runs.items()]
    result = mixing_result(rows, preset=preset, steps=steps) if done else {
        "preset": preset, "steps": steps, "seeds": [], "target_mAP": {}, "paired_differences": {}}
    result.update(finished=False, seeds_planned=seeds, runs=recorded)
    return result


def seed_overrides(seed: int) -> list[str]:
    """What one seed of an experiment sets: the initialisation and augmentations (``run.seed``) and
    the data order, i.e. which identities, videos and images every batch holds (``sampler.seed``)."""
    return [f"run.seed={seed}", f"sampler.seed={seed}"]


def run_name_for(row: str, seed: int, steps: int, overrides: list[str] = ()) -> str:
    """One run per (recipe, seed, steps, overrides), shared by every suite that contains the recipe."""
    name = f"{row}-s{seed}-{steps}"
    if overrides:
        name += "-" + hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return name


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided ``level`` Student-t confidence interval of the mean of ``values``
    (``mean -+ t_{(1+level)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation);
    with one value the interval is unbounded."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("-inf"), float("inf")
    half = float(stats.t.ppf((1.0 + level) / 2.0, n - 1)) * statistics.stdev(values) / n ** 0.5
    return mean, mean - half, mean + half


def mixing_result(rows: list[dict], *, preset: str, steps: int) -> dict:
    """The mixing suite's JSON: per-seed target mAPs of each arm (in seed order) and the paired
    per-seed differences with their mean and 95 % t-interval."""
    by_key = {MIXING_KEYS[r["row"]]: sorted(r["runs"], key=lambda x: x["seed"]) for r in rows}
    seeds = [x["seed"] for x in by_key["multi_only"]]
    if any([x["seed"] for x in runs] != seeds for runs in by_key.values()):
        raise ValueError("the arms of the mixing suite ran different seeds; differences need pairs")
    maps = {key: [x["mAP"] for x in runs] for key, runs in by_key.items()}
    paired = {}
    for name, a, b in PAIRS:
        diffs = [x - y for x, y in zip(maps[a], maps[b])]
        mean, lo, hi = t_interval(diffs)
        paired[name] = {"per_seed": diffs, "mean": mean, "ci95": [lo, hi]}
    return {"preset": preset, "steps": steps, "seeds": seeds, "target_mAP": maps, "paired_differences": paired}


def format_differences(result: dict) -> str:
    """Markdown table of the paired differences (mAP points) with their 95 % t-intervals."""
    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    n = len(result["seeds"])
    lines = [f"Paired differences of target mAP over {n} seed{'s' if n != 1 else ''} (same seed = same init and "
             "data order), mean and 95 % t-interval, in points:", "",
             "| difference | mean | 95 % interval | per seed |", "|---|---:|---|---|"]
    for name, d in result["paired_differences"].items():
        lo, hi = d["ci95"]
        interval = f"[{pts(lo)}, {pts(hi)}]" if n > 1 else "(one seed: none)"
        lines.append(f"| {name} | {pts(d['mean'])} | {interval} | {', '.join(pts(x) for x in d['per_seed'])} |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(row: str, description: str, runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of a row's runs (``{"mAP", "rank1"}`` each)."""
    m_mean, m_std = mean_std([r["mAP"] for r in runs])
    r_mean, r_std = mean_std([r["rank1"] for r in runs])
    return {"row": row, "setting": description, "mAP_mean": m_mean, "mAP_std": m_std, "rank1_mean": r_mean,
            "rank1_std": r_std, "runs": runs}


def format_table(rows: list[dict], suite: str, steps: int, seeds: int, minutes: float, preset: str = "demo") -> str:
    pct = lambda mean, std: f"{100 * mean:.1f} ± {100 * std:.1f}"  # noqa: E731
    lines = [f"SynthReID (preset `{preset}`) target domain, suite `{suite}`: {steps} steps x 16x4 multi-camera "
             f"images per worker (+ videos for the mixing recipes), 2 workers, from scratch, {seeds} seeds, "
             f"mean ± std ({minutes:.0f} min)",
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
