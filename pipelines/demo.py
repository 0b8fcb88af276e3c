"""The main job on embedded defaults (``make demo``): SynthReID -> ingest -> DynaMix on 2 CPU workers
-> target-domain evaluation -> MLflow registry -> HTML report. Every stage resumes: a re-run skips
finished data, continues the training run, and does not register the same weights twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dynamix_core.config import load_config
from dynamix_core.data.synth.presets import preset_overrides
from pipelines.recipes import RECIPES_DIR
from pipelines.train.config import TrainConfig

#: the demo's SynthReID (preset ``demo``): more single-camera videos than the generator's test-sized
#: default, so the single-camera part has data to add (the method's claim) and 2 workers get 32 videos
#: each; 150 identities per multi-camera set (450 in all) so a network trained from scratch generalises
DEMO_SYNTH = preset_overrides("demo")
SETS = {"multi": ["synth_m0", "synth_m1", "synth_m2"], "single": ["synth_video"], "target": ["synth_target"]}


def prepare_data(out: Path, *, synth_overrides: list[str] = (), progress: bool = True,
                 preset: str = "demo") -> dict[str, Path]:
    """Generate SynthReID (settings of ``preset``, then ``synth_overrides``) under ``out/data`` and
    ingest every set into ``out/shards/<name>``."""
    from dynamix_core.data.synth import SynthConfig, generate
    from pipelines.ingest import IngestConfig, format_result, run_ingest

    t0 = time.perf_counter()
    cfg = load_config(SynthConfig, None, preset_overrides(preset) + list(synth_overrides))
    summary = generate(cfg, out / "data", progress=progress)
    print(f"[demo] SynthReID ({preset}) ready in {out / 'data'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    shards = {}
    for info in summary["sets"]:
        name = info["name"]
        dst = out / "shards" / name
        # each set under its own dataset name: identities are namespaced by (dataset, source id)
        result = run_ingest(IngestConfig(root=out / "data" / info["path"], out=dst, format="auto", dataset=name),
                            progress=progress)
        print(f"[demo] ingest {name}: " + format_result(result).splitlines()[0], flush=True)
        shards[name] = dst
    return shards


def multi_sets(out: Path) -> list[str]:
    """The multi-camera sets of the SynthReID data under ``out/data`` (the demo's three if none is there yet)."""
    from dynamix_core.data.synth import MANIFEST

    manifest = out / "data" / MANIFEST
    if not manifest.is_file():
        return list(SETS["multi"])
    return [s["name"] for s in json.loads(manifest.read_text())["sets"] if s["kind"] == "multi"]


def demo_config(out: Path, recipe: str, overrides: list[str]) -> TrainConfig:
    shards = out / "shards"
    paths = [
        f"data.multi=[{','.join(str(shards / n) for n in multi_sets(out))}]",
        f"data.target={shards / 'synth_target'}",
        f"run.storage={out / 'runs'}",
    ]
    cfg = load_config(TrainConfig, recipe, [])
    if cfg.uses_single:
        paths += [f"data.single=[{shards / 'synth_video'}]",
                  f"labeling.ground_truth=[{out / 'data' / 'single' / 'synth_video' / 'ground_truth.parquet'}]"]
    return load_config(TrainConfig, recipe, paths + list(overrides))


def label_quality(run_dir: str | Path) -> dict[str, float]:
    """Pairwise F-score of the single-camera labels against SynthReID ground truth: tracker labels
    (version 0) and the final version after relabeling (``run_dir``: a folder or an object-store URI)."""
    from dynamix_core import storage
    from dynamix_core.labeling.label_table import LabelTable
    from dynamix_core.labeling.quality import pairwise_scores

    index_path = storage.join(run_dir, "labels", "index.parquet")
    if not storage.exists(index_path):
        return {}
    if "truth" not in storage.read_schema(index_path).names:
        return {}
    truth = storage.read_table(index_path, columns=["truth"])["truth"].to_numpy()  # labels are addressed by its rows
    table = LabelTable(storage.join(run_dir, "labels"))
    out = {}
    for name, version in (("before", 0), ("after", table.latest_version())):
        pids = table.read(version)
        scores = pairwise_scores(pids.astype(np.int64), truth)
        out[f"label_F_{name}"] = scores["pair_f_score"]
        out[f"label_purity_{name}"] = scores["purity"]
    out["label_versions"] = float(table.latest_version())
    return out


def retrieval_strip(weights: Path, cfg: TrainConfig, num_queries: int = 6, top_k: int = 10) -> list[dict]:
    """Queries with their top-k gallery images by the trained momentum encoder, correct ones marked."""
    import torch

    from dynamix_core.data.images import decode_image
    from dynamix_core.model import build_encoder, load_weights
    from dynamix_core.evaluation.target import TargetSet, embed_images

    model = build_encoder(cfg.model).eval()
    load_weights(model, weights)
    target = TargetSet.load(cfg.data.target, cfg.data.transform)
    q = embed_images(model, target.q_data, cfg.data.transform, torch.device("cpu"))
    g = embed_images(model, target.g_data, cfg.data.transform, torch.device("cpu"))
    rows = []
    rng = np.random.default_rng(0)
    for i in sorted(rng.choice(len(q), size=min(num_queries, len(q)), replace=False).tolist()):
        keep = ~((target.g_pid == target.q_pid[i]) & (target.g_cam == target.q_cam[i]))  # SPEC 3 filtering
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(-(g[idx] @ q[i]).numpy(), kind="stable")[:top_k]]
        rows.append({"query": decode_image(target.q_data[i]), "gallery": [decode_image(target.g_data[j]) for j in order],
                     "correct": [bool(target.g_pid[j] == target.q_pid[i]) for j in order]})
    return rows


def target_references(cfg: TrainConfig) -> dict[str, float]:
    """What the trained model's target mAP is read against: chance (random ranking), the colour
    histogram, and the same encoder before training (the workers' rank-0 initialisation)."""
    import torch

    from dynamix_core.evaluation.baselines import random_ranking
    from dynamix_core.model import MomentumEncoder, build_encoder
    from dynamix_core.evaluation.target import TargetSet, colour_baseline, evaluate_target

    target = TargetSet.load(cfg.data.target, cfg.data.transform)
    chance = random_ranking(target.q_pid, target.g_pid, target.q_cam, target.g_cam)
    colour = colour_baseline(target)
    torch.manual_seed(cfg.run.seed)  # the worker seeds (seed + rank) before it builds the encoder
    untrained = evaluate_target(MomentumEncoder(build_encoder(cfg.model)), target, cfg.eval, torch.device("cpu"))
    return {"chance_mAP": chance["mAP"], "colour_hist_mAP": float(colour["mAP"]), "untrained_mAP": untrained["mAP"]}


def register_and_promote(weights: Path, cfg: TrainConfig, run_id: str | None, tracking_uri: str, out: Path,
                         metrics: dict) -> dict:
    from services.promotion import ImageSetSuite, promote
    from services.registry import register_model

    name = "dynamix-demo"
    version = register_model(str(weights), cfg.model, name, tracking_uri, run_id=run_id,
                             preprocessing=cfg.data.transform, eval_metrics={k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/")})
    suite = ImageSetSuite(str(out / "data" / "target" / "synth_target"))
    decision = promote(name, version.version, suite, tracking_uri=tracking_uri)  # one [demo] line says what it decided
    return {"model": name, "version": version.version, "uri": version.uri, "decision": decision.tags()}


def run_demo(out: Path, *, recipe: str | None = None, overrides: list[str] = (), address: str | None = None,
             register: bool = True, synth_overrides: list[str] = ()) -> dict:
    from pipelines.report import print_summary_table, write_report
    from pipelines.train.driver import run_training

    t0 = time.perf_counter()
    out = out.resolve()
    recipe = recipe or str(RECIPES_DIR / "dynamix_demo.yaml")
    extra = list(overrides) + ([f"scaling.address={address}"] if address else [])
    cfg = demo_config(out, recipe, extra)  # every setting checked before minutes of data generation
    prepare_data(out, synth_overrides=synth_overrides)
    print(f"[demo] training {cfg.method} for {cfg.run.max_steps} steps on {cfg.scaling.num_workers} workers "
          f"(run folder {out / 'runs' / cfg.run.name})", flush=True)
    result = run_training(cfg)
    summary = {k.split("/", 1)[-1]: v for k, v in result.metrics.items()
               if k.startswith("eval/") and k != "eval/valid_queries"}
    history = result.history
    summary.update({
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else float("nan"),
        "data_wait_fraction": float(np.mean([h["data_wait_fraction"] for h in history])) if history else float("nan"),
        "label_wait_fraction": float(np.mean([h["label_wait_fraction"] for h in history])) if history else float("nan"),
        "steps": float(cfg.run.max_steps),
    })
    if "mAP" in summary and cfg.data.target:
        refs = target_references(cfg)
        summary.update(refs)
        summary["mAP_x_chance"] = summary["mAP"] / refs["chance_mAP"]
        summary["mAP_minus_colour_points"] = 100.0 * (summary["mAP"] - refs["colour_hist_mAP"])
    summary.update(label_quality(result.run_dir))
    registry = {}
    tracking_uri = result.tracking_uri  # the store the run logged to (tracking.uri, MLFLOW_TRACKING_URI or its own)
    if register and result.weights_path is not None:
        registry = register_and_promote(result.weights_path, cfg, result.mlflow_run_id, tracking_uri, out, result.metrics)
    summary["wall_minutes"] = (time.perf_counter() - t0) / 60
    rounds = result.labeling.get("reports", [])
    strip = retrieval_strip(result.weights_path, cfg) if result.weights_path else None
    report_path = result.run_dir / "report.html"
    write_report(str(report_path), summary=summary, history=history, relabel_rounds=rounds, retrieval=strip,
                 title=f"DynaMix demo: {cfg.method} on SynthReID")
    (result.run_dir / "summary.json").write_text(json.dumps({"summary": summary, "registry": registry}, indent=2,
                                                            default=str))
    if registry:
        decision = registry["decision"]
        print(f"[demo] registered {registry['uri']}: {decision.get('promotion.decision')} "
              f"({decision.get('promotion.message')})")
    print(print_summary_table(summary))
    from pipelines.console import where_lines

    for line in where_lines(str(report_path), tracking_uri):  # last: where to look next
        print(f"[demo] {line}")
    return {"summary": summary, "registry": registry, "report": str(report_path)}
