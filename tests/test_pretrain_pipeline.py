"""``dynamix pretrain`` end to end through the real Ray Train and Ray Data streams (tiny SynthReID,
timm's test_resnet): a worker killed after the first checkpoint, the run resumed from it, the kNN
monitor in history, MLflow and the report, and the exported backbone loaded strictly by a training
config built the way ``dynamix train --set model.weights=<output>`` builds it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, live_actor_pids, make_tiny_reid
from dynamix_core.config import load_config
from pipelines.pretrain.config import PretrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("tinyreid_pretrain"), num_videos=8)


def tiny_pretrain_config(root: Path, name: str, *extra: str) -> PretrainConfig:
    shards = root / "shards"
    view = ["height=32", "width=16"]
    overrides = [
        f"run.name={name}", f"run.storage={root / 'runs'}", "run.log_every=4",
        f"data.single=[{shards / 'synth_video'}]", f"data.monitor=[{shards / 'synth_target'}]",
        "data.batch_size=8", "data.buffer_videos=4", "data.max_images_per_video=2",
        *[f"data.view{i}.{v}" for i in (1, 2) for v in view], "data.decode_threads=1", "data.prefetch_batches=1",
        "model.backbone=test_resnet", "model.img_size=[32,16]", "model.ibn=true",  # as the demo training recipes
        "objective.dim=16", "objective.mlp_dim=32", "objective.projector_layers=2",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "eval.max_rank=10",
        f"tracking.uri=sqlite:///{root / 'runs' / name / 'mlflow.db'}",
    ]
    return load_config(PretrainConfig, None, overrides + list(extra))


@pytest.mark.slow
def test_pretraining_resumes_after_a_killed_worker_and_exports_a_loadable_backbone(ray_local, tiny_data):
    from mlflow.tracking import MlflowClient

    from dynamix_core.model import build_encoder, read_state_dict
    from pipelines.cli import build_parser
    from pipelines.commands import train as train_cmd
    from pipelines.pretrain.driver import run_pretraining

    cfg = tiny_pretrain_config(tiny_data, "pre", "run.max_steps=16", "run.checkpoint_every=8", "run.monitor_every=8",
                               "scaling.max_failures=2")
    run_dir = Path(cfg.run.storage) / cfg.run.name
    killed: dict[str, int] = {}

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            history = run_dir / "history.jsonl"
            steps = [json.loads(ln)["step"] for ln in history.read_text().splitlines()] if history.is_file() else []
            if steps and steps[-1] >= 12:  # past the first checkpoint (step 8)
                pids = live_actor_pids("RayTrainWorker")
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["worker"] = pids[-1]
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_pretraining(cfg, progress=False)
    thread.join(timeout=5)
    assert killed, "no worker was killed: the resume path did not run"

    # every step reported once (the replayed steps' rows were dropped), the untrained monitor row first
    history = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 4, 8, 12, 16]
    assert [h["step"] for h in history if "knn/synth_target/mAP" in h] == [0, 8, 16]
    assert all(0.0 <= h["knn/synth_target/mAP"] <= 1.0 for h in history if "knn/synth_target/mAP" in h)
    assert result.metrics["step"] == 16
    client = MlflowClient(cfg.tracking.uri)
    knn_steps = sorted({m.step for m in client.get_metric_history(result.mlflow_run_id, "knn/synth_target/mAP")})
    assert knn_steps == [0, 8, 16]
    loss_steps = sorted({m.step for m in client.get_metric_history(result.mlflow_run_id, "loss/contrastive")})
    assert loss_steps == [4, 8, 12, 16]
    assert "kNN monitor" in (run_dir / "report.html").read_text()

    # the export is the final checkpoint's online backbone ...
    exported = read_state_dict(result.weights_path)
    ckpt = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 16
    online = torch.load(ckpt / "pretrain.pt", weights_only=True)["online"]
    assert exported.keys() == {k[len("backbone."):] for k in online if k.startswith("backbone.")}
    assert all(torch.equal(v, online[f"backbone.{k}"]) for k, v in exported.items())
    # ... and `dynamix train --set model.weights=<it>` starts from it (strict load, backbone scope)
    args = build_parser("train").parse_args([
        "train", "--config", str(REPO_ROOT / "recipes" / "multicam_baseline_demo.yaml"),
        "--set", "model.backbone=test_resnet", "--set", "model.img_size=[32,16]",
        "--set", "data.transform.height=32", "--set", "data.transform.width=16",
        "--set", f"model.weights={result.weights_path}"])
    train_cfg = train_cmd.resolve(args)
    assert (train_cfg.model.weights_scope, train_cfg.model.strict_weights) == ("backbone", True)
    encoder = build_encoder(train_cfg.model)
    loaded = encoder.backbone.state_dict()
    assert loaded.keys() == exported.keys()
    assert all(torch.equal(loaded[k], v) for k, v in exported.items())
