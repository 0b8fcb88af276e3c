"""ReMix's pre-training ablation on SynthReID (``dynamix experiment pretraining``), several seeds.

Six settings under one training budget, each from scratch or from a self-supervised pre-training
on the single-camera set (``recipes/pretrain_demo.yaml``, one pre-training per seed):

    (a) multi-camera only            (b) pre-train, then multi-camera only (pre-train + fine-tune)
    (c) ReMix joint training          (d) pre-train + ReMix joint training
    (e) DynaMix                       (f) pre-train + DynaMix

ReMix's finding to reproduce: (b) helps less than (c) (joint training beats pre-train + fine-tune),
and (d) is best of its family. Every training run uses the pre-training's backbone and image size,
from scratch too, so the rows differ only in data and initialisation. Per row: mean and standard
deviation over seeds of the target mAP and Rank-1 (markdown table + bar plot under
``OUT/experiments/``), plus the bare pre-trained backbone's target mAP against its random init (the
kNN monitor before and after pre-training). Runs are named by row, seed and steps: a re-run skips
finished runs and resumes an interrupted one; the settings given with ``--set`` and ``--pretrain-set``
are part of the names (a short hash), so other settings never reuse these runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.demo import SETS, demo_config, prepare_data
from pipelines.experiment import _mean_std, aggregate, plot_rows, run_name_for, seed_overrides
from pipelines.recipes import RECIPES_DIR

SUITE = "pretraining"
PRETRAIN_RECIPE = RECIPES_DIR / "pretrain_demo.yaml"

#: (row, description, training recipe, starts from the pre-trained backbone)
ROWS: list[tuple[str, str, str, bool]] = [
    ("a", "multi-camera only, from scratch", "multicam_baseline_demo.yaml", False),
    ("b", "pre-train, then multi-camera only", "multicam_baseline_demo.yaml", True),
    ("c", "ReMix joint training, from scratch", "remix_demo.yaml", False),
    ("d", "pre-train + ReMix joint training", "remix_demo.yaml", True),
    ("e", "DynaMix, from scratch", "dynamix_demo.yaml", False),
    ("f", "pre-train + DynaMix", "dynamix_demo.yaml", True),
]


def add_arguments(p) -> None:
    """The options of this suite on the ``dynamix experiment`` parser (added unless already there)."""
    have = set(p._option_string_actions)
    if "--seeds" not in have:
        p.add_argument("--seeds", type=int, default=3, help="seeds per setting (mean and std over them)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"pretraining suite: pre-training steps (default: {PRETRAIN_RECIPE.name}'s run.max_steps)")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pretraining suite: override a pre-training config value (repeatable)")


def pretrain_config(out: Path, seed: int, steps: int | None, overrides: list[str], address: str | None):
    from dynamix_core.config import load_config
    from pipelines.pretrain.config import PretrainConfig

    shards = out / "shards"
    extra = [f"data.single=[{shards / SETS['single'][0]}]",
             f"data.monitor=[{shards / SETS['target'][0]},{shards / SETS['multi'][0]}]",
             f"run.storage={out / 'experiments' / 'runs'}", f"run.seed={seed}"]
    extra += [f"run.max_steps={steps}"] if steps else []
    extra += list(overrides) + ([f"scaling.address={address}"] if address else [])
    cfg = load_config(PretrainConfig, PRETRAIN_RECIPE, extra)
    name = run_name_for(f"{SUITE}-pretrain", seed, cfg.run.max_steps, list(overrides))  # settings in the name
    return load_config(PretrainConfig, PRETRAIN_RECIPE, extra + [f"run.name={name}"])


def training_run_name(row: str, seed: int, steps: int, *, overrides: list[str], pretrain_overrides: list[str],
                      pretrain_steps: int | None) -> str:
    """One name per row, seed, budget and settings: every row trains the pre-training's backbone and
    image size, so the pre-training settings are part of every row's name (a re-run with other
    settings trains afresh instead of reusing these runs)."""
    settings = list(overrides) + [f"pretrain:{o}" for o in pretrain_overrides]
    settings += [f"pretrain:run.max_steps={pretrain_steps}"] if pretrain_steps else []
    return run_name_for(f"{SUITE}-{row}", seed, steps, settings)


def _pretrained_backbone(cfg) -> tuple[Path, dict]:
    """Run (or reuse) one pre-training; its backbone file and kNN-monitor summary."""
    from pipelines.pretrain.driver import BACKBONE_FILE, run_pretraining

    run_dir = Path(cfg.run.storage) / cfg.run.name
    done = run_dir / "result.json"
    if done.is_file() and (run_dir / BACKBONE_FILE).is_file():
        print(f"[experiment] pre-training {cfg.run.name}: finished earlier", flush=True)
        return run_dir / BACKBONE_FILE, json.loads(done.read_text())["summary"]
    print(f"[experiment] pre-training {cfg.run.name}: {cfg.run.max_steps} steps, {cfg.model.backbone}", flush=True)
    result = run_pretraining(cfg)
    return result.weights_path, json.loads((result.run_dir / "result.json").read_text())["summary"]


def _train(out: Path, recipe: str, run_name: str, overrides: list[str]) -> dict:
    from pipelines.train.driver import run_training

    storage = out / "experiments" / "runs"
    done = storage / run_name / "result.json"
    if done.is_file() and "eval/mAP" in json.loads(done.read_text())["metrics"]:
        print(f"[experiment] {run_name}: finished earlier", flush=True)
        return json.loads(done.read_text())["metrics"]
    cfg = demo_config(out, str(RECIPES_DIR / recipe), [f"run.name={run_name}", f"run.storage={storage}"] + overrides)
    print(f"[experiment] {run_name}: {cfg.method}, {cfg.run.max_steps} steps, {cfg.model.backbone}"
          f"{' from ' + str(cfg.model.weights) if cfg.model.weights else ' from scratch'}", flush=True)
    return run_training(cfg).metrics


def run_ablation(out: Path, *, steps: int, seeds: int, pretrain_steps: int | None = None,
                 overrides: list[str] = (), pretrain_overrides: list[str] = (), address: str | None = None,
                 preset: str = "demo") -> list[dict]:
    """Pre-train once per seed, train the six settings per seed, aggregate; returns one row per setting."""
    if steps < 1 or seeds < 1:
        raise ValueError(f"--steps {steps} and --seeds {seeds}: both must be >= 1")
    out = out.resolve()
    prepare_data(out, preset=preset)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {row: [] for row, *_ in ROWS}
    bare: list[dict] = []
    for seed in range(seeds):
        pre = pretrain_config(out, seed, pretrain_steps, list(pretrain_overrides), address)
        weights, summary = _pretrained_backbone(pre)
        bare.append(summary)
        h, w = pre.model.img_size
        same_model = [f"model.backbone={pre.model.backbone}", f"model.img_size=[{h},{w}]",
                      f"model.ibn={str(pre.model.ibn).lower()}",
                      f"data.transform.height={h}", f"data.transform.width={w}"]
        for row, _, recipe, pretrained in ROWS:
            extra = same_model + seed_overrides(seed) + [f"run.max_steps={steps}", "run.eval_every=0"]
            extra += [f"model.weights={weights}", "model.weights_scope=backbone"] if pretrained else []
            extra += list(overrides) + ([f"scaling.address={address}"] if address else [])
            name = training_run_name(row, seed, steps, overrides=list(overrides),
                                     pretrain_overrides=list(pretrain_overrides), pretrain_steps=pretrain_steps)
            metrics = _train(out, recipe, name, extra)
            runs[row].append({"seed": seed, "mAP": float(metrics["eval/mAP"]), "rank1": float(metrics["eval/rank1"])})
    rows = [aggregate(row, description, runs[row]) for row, description, *_ in ROWS]
    folder = out / "experiments"
    stem = f"{SUITE}_{steps}_s{seeds}"
    table = format_table(rows, bare, steps=steps, seeds=seeds, backbone=pre.model.backbone,
                         pretrain_steps=pre.run.max_steps, minutes=(time.perf_counter() - t0) / 60)
    (folder / f"{stem}.md").write_text(table + "\n")
    (folder / f"{stem}.json").write_text(json.dumps({"rows": rows, "bare_backbone": bare}, indent=2))
    plot_rows(rows, folder / f"{stem}.png", title=f"SynthReID target, {steps} steps, {seeds} seeds")
    print(table, flush=True)
    print(f"[experiment] table and plot: {folder / stem}.md / .png", flush=True)
    return rows


def format_table(rows: list[dict], bare: list[dict], *, steps: int, seeds: int, backbone: str, pretrain_steps: int,
                 minutes: float) -> str:
    pct = lambda mean, std: f"{100 * mean:.1f} ± {100 * std:.1f}"  # noqa: E731
    lines = [f"SynthReID target domain, `dynamix experiment pretraining`: {backbone}, {steps} training steps per run, "
             f"pre-training {pretrain_steps} steps (MoCo v3, single-camera set), {seeds} seeds, mean ± std "
             f"({minutes:.0f} min)", "",
             "| | setting | mAP | Rank-1 | mAP per seed |", "|---|---|---:|---:|---|"]
    for r in rows:
        per_seed = ", ".join(f"{100 * x['mAP']:.1f}" for x in r["runs"])
        lines.append(f"| ({r['row']}) | {r['setting']} | {pct(r['mAP_mean'], r['mAP_std'])} | "
                     f"{pct(r['rank1_mean'], r['rank1_std'])} | {per_seed} |")
    key = "knn/synth_target/mAP"
    before = [b[f"{key}_before"] for b in bare if f"{key}_before" in b]
    after = [b[f"{key}_after"] for b in bare if f"{key}_after" in b]
    if before and after:
        lines += ["", f"Bare backbone, no fine-tuning (kNN monitor, target mAP): random init "
                      f"{pct(*_mean_std(before))}, pre-trained {pct(*_mean_std(after))}."]
    return "\n".join(lines)


