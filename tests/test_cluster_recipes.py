"""The clustering recipes (Cluster-Contrast, DomainMix, CALR) end to end through the real Ray Train
pipeline on tiny SynthReID (the recipes' own backbone at 32x16, 6 steps = 2 epochs each) and a resume, the batch draw when an
epoch has fewer clusters than the batch needs, and the config rules of the ``cluster_method`` section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynamix_core.config import ConfigError, load_config
from dynamix_core.methods.cluster_contrast import cluster_sampler
from pipelines.train.clustering import draw_batch
from conftest import make_tiny_reid
from pipelines.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("tinyreid_cluster"), num_videos=6)


def tiny_config(root: Path, recipe: str, name: str, *extra: str) -> TrainConfig:
    """The shipped demo recipe, shrunk: tiny data, its backbone at 32x16, 4 x 2 batches, small clusterings."""
    shards = root / "shards"
    overrides = [
        f"run.name={name}", f"run.storage={root / 'runs'}", "run.max_steps=6", "run.log_every=3",
        "run.checkpoint_every=3", "run.eval_every=0",
        f"data.multi=[{shards / 'synth_m0'},{shards / 'synth_m1'}]", f"data.target={shards / 'synth_target'}",
        "data.transform.height=32", "data.transform.width=16",
        "model.img_size=[32,16]", "model.ema_momentum=0.9",
        "optim.lr=1e-3", "optim.warmup_fraction=0.0", "eval.max_rank=10",
        "cluster_method.num_ids_per_batch=4", "cluster_method.images_per_id=2", "cluster_method.feature_batch_size=64",
    ]
    if "domainmix" in recipe:
        overrides.append(f"data.single=[{shards / 'synth_video'}]")
    return load_config(TrainConfig, REPO / "recipes" / recipe, overrides + list(extra))


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


RECIPES = {
    "cluster_contrast": ("cluster_contrast_demo.yaml", [
        "cluster_method.cluster_contrast.num_epochs=2", "cluster_method.cluster_contrast.cluster.k1=8",
        "cluster_method.cluster_contrast.cluster.k2=2", "cluster_method.cluster_contrast.cluster.eps=0.5",
        "cluster_method.cluster_contrast.cluster.min_samples=2"], {"loss/contrast"}),
    "calr": ("calr_demo.yaml", [
        "cluster_method.calr.stage2_epochs=1", "cluster_method.calr.local_k1=4", "cluster_method.calr.local_k2=2",
        "cluster_method.calr.global_dbscan.k1=8", "cluster_method.calr.global_dbscan.k2=2",
        "cluster_method.calr.global_dbscan.min_samples=2", "cluster_method.calr.entropy_warmup_epochs=0"],
        {"loss/contrast", "loss/camera_alignment"}),
    "domainmix": ("domainmix_demo.yaml", [
        "cluster_method.domainmix.num_epochs=2", "cluster_method.domainmix.stage1_epochs=1",
        "cluster_method.domainmix.cluster.k1=8", "cluster_method.domainmix.cluster.k2=2",
        "cluster_method.domainmix.cluster.min_samples=2", "cluster_method.domainmix.min_cluster_size=2"],
        {"loss/identity", "loss/triplet"}),
}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m != "cluster_contrast" else m
                                    for m in RECIPES])
def test_recipe_trains_evaluates_tracks_and_exports(ray_local, tiny_data, method):
    from mlflow.tracking import MlflowClient

    from dynamix_core.model import ModelConfig, build_encoder, load_weights
    from pipelines.train.driver import run_training

    recipe, extra, terms = RECIPES[method]
    cfg = tiny_config(tiny_data, recipe, f"{method}-e2e", *extra)
    assert cfg.method == method
    result = run_training(cfg)
    history = _history(result.run_dir)
    assert [h["step"] for h in history] == [3, 6]
    assert [h["epoch"] for h in history] == [0.0, 1.0]  # 6 steps over 2 epochs: a clustering every 3 steps
    assert terms <= set(history[0]), sorted(history[0])
    assert all(np.isfinite(h["loss/total"]) for h in history)
    assert all(h["cluster/num_clusters"] >= 2 for h in history)
    if method == "calr":  # camera alignment in the first epoch only, stage 2 discards conflicting members
        assert "loss/camera_alignment" not in history[1] and "cluster/discarded" in history[1]
    if method == "domainmix":  # epoch 1 is stage 2: the discriminator step and encoder steps with the balance loss
        assert {"loss/discriminator", "loss/balance"} <= set(history[1])
    assert 0.0 <= result.metrics["eval/mAP"] <= 1.0 and result.metrics["eval/valid_queries"] > 0
    client = MlflowClient(f"sqlite:///{result.run_dir / 'mlflow.db'}")
    assert client.get_run(result.mlflow_run_id).data.params["method"] == method
    assert sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "loss/total")) == [3, 6]
    assert cfg.model.backbone == "test_resnet" and cfg.model.ibn  # the demo recipes' model, as dynamix_demo's
    model = build_encoder(ModelConfig(backbone="test_resnet", img_size=(32, 16), num_stripes=cfg.model.num_stripes,
                                      ibn=True))
    load_weights(model, result.weights_path)  # strict: the export is exactly the encoder


@pytest.mark.slow
def test_a_clustering_run_made_longer_resumes_and_clusters_again_at_its_checkpoint(ray_local, tiny_data):
    """Cluster-Contrast for 6 steps, then the same run to 9: it restarts from the step-6 checkpoint,
    clusters again there, and trains only the new steps."""
    from pipelines.train.driver import run_training

    recipe, extra, _ = RECIPES["cluster_contrast"]
    run_training(tiny_config(tiny_data, recipe, "cluster_contrast-longer", *extra))
    longer = tiny_config(tiny_data, recipe, "cluster_contrast-longer", *extra, "run.max_steps=9",
                         "cluster_method.cluster_contrast.num_epochs=3")
    resumed = run_training(longer)
    assert [h["step"] for h in _history(resumed.run_dir)] == [3, 6, 9]
    assert resumed.metrics["step"] == 9 and resumed.metrics["epoch"] == 2.0
