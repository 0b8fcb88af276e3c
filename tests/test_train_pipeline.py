"""The training job end to end through the real Ray Train, Ray Data and labeling pool (tiny model,
tiny SynthReID), and its fault behaviour: a training worker and a labeling actor killed mid-run,
with the tracking server unreachable the whole time."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamix_core.config import load_config
from conftest import live_actor_pids, make_tiny_reid
from pipelines.train.config import TrainConfig

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("tinyreid"), num_videos=8)


def tiny_config(root: Path, name: str, **extra) -> TrainConfig:
    shards = root / "shards"
    overrides = [
        "method=dynamix", f"run.name={name}", f"run.storage={root / 'runs'}", "run.log_every=4",
        f"data.multi=[{shards / 'synth_m0'},{shards / 'synth_m1'}]", f"data.single=[{shards / 'synth_video'}]",
        f"data.target={shards / 'synth_target'}", "data.transform.height=32", "data.transform.width=16",
        "data.decode_threads=1", "data.prefetch_batches=1",
        "model.backbone=test_vit", "model.img_size=[32,16]", "model.drop_path_rate=0.0", "model.ema_momentum=0.9",
        "sampler.num_multi_ids=4", "sampler.multi_images_per_id=4", "sampler.num_videos=2", "sampler.ids_per_video=2",
        "sampler.single_images_per_id=2", "sampler.video_buffer_size=3",
        "loss.tau_ins_multi=0.1", "loss.tau_camera=0.1", "centroids.temp_multi=0.1",
        "optim.lr=1e-3", "optim.warmup_fraction=0.0", "labeling.publish_every=4", "labeling.max_staleness=1000",
        "labeling.relabel.warmup_fraction=0.0", "labeling.embed_batch_size=64",
        f"labeling.ground_truth=[{root / 'data' / 'single' / 'synth_video' / 'ground_truth.parquet'}]",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "eval.max_rank=10",
        f"tracking.uri=sqlite:///{root / 'runs' / name / 'mlflow.db'}",
    ]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, None, overrides)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def test_training_run_end_to_end(ray_local, tiny_data):
    from mlflow.tracking import MlflowClient

    from dynamix_core.model import build_encoder, load_weights
    from pipelines.train.driver import run_training

    # relabeling starts at half time; learning is judged on the target domain below
    cfg = tiny_config(tiny_data, "e2e", run__max_steps=16, run__checkpoint_every=8, run__eval_every=8,
                      labeling__relabel__warmup_fraction=0.5, tracking__registered_model="reid-e2e",
                      data__single_reads="planned")  # the Ray Data stream of whole videos: the cluster jobs' demo recipe
    result = run_training(cfg)
    history = _history(result.run_dir)
    assert [h["step"] for h in history] == [4, 8, 12, 16]
    assert {"loss/instance", "loss/augmentation", "loss/centroid", "loss/camera_centroid"} <= set(history[0])
    assert 0.0 <= result.metrics["eval/mAP"] <= 1.0 and result.metrics["eval/valid_queries"] > 0
    # the labeling pool relabeled videos while training went on, and published versions
    reports = result.labeling["reports"]
    assert reports and all(r["version"] >= 1 for r in reports)
    assert {"pair_f_score", "before_pair_f_score", "num_splits", "num_merges"} <= set(reports[0])
    # MLflow holds the run with every reported step
    client = MlflowClient(f"sqlite:///{result.run_dir / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss/total")]
    assert sorted(steps) == [4, 8, 12, 16]
    assert client.get_run(result.mlflow_run_id).data.params["method"] == "dynamix"
    # the deployable momentum encoder loads strictly into a fresh encoder, and it ranks the held-out
    # target better than the same encoder before training (rank 0's initialisation, seeded alike);
    # mAP by scikit-learn here, not by the pipeline's own evaluation
    model = build_encoder(cfg.model)
    load_weights(model, result.weights_path)
    torch.manual_seed(cfg.run.seed)
    untrained = build_encoder(cfg.model)
    trained_map, untrained_map = (_sklearn_target_map(m.eval(), cfg) for m in (model, untrained))
    print(f"target mAP: trained {trained_map:.3f}, untrained {untrained_map:.3f}; relabel F per round "
          f"{[(round(r['before_pair_f_score'], 3), round(r['pair_f_score'], 3)) for r in reports]}")
    assert trained_map > untrained_map, (trained_map, untrained_map)  # 16 steps: a small margin (0.154 vs 0.139)
    # relabeling raised pairwise F against SynthReID's ground truth in the rounds it ran
    assert np.mean([r["pair_f_score"] for r in reports]) > np.mean([r["before_pair_f_score"] for r in reports])
    assert all(r["pair_f_score"] >= r["before_pair_f_score"] - 1e-9 for r in reports), reports
    # the config names a registered model: version 1 of it, in the run's store, is now champion;
    # registering the same run again (a re-run of the job) creates nothing
    from pipelines.train.registration import register_trained
    from services.registry import registry_client

    registry = registry_client(f"sqlite:///{result.run_dir / 'mlflow.db'}")
    assert result.registered == "registered: models:/reid-e2e/1 (now @champion: the model had none)"
    version = registry.get_model_version("reid-e2e", "1")
    assert version.run_id == result.mlflow_run_id and version.tags["dynamix.run_name"] == "e2e"
    assert {k: str(v) for k, v in registry.get_registered_model("reid-e2e").aliases.items()} == {"champion": "1"}
    again = register_trained(cfg, result.weights_path, f"sqlite:///{result.run_dir / 'mlflow.db'}",
                             result.mlflow_run_id, result.metrics)
    assert again == "already registered: models:/reid-e2e/1"
    assert len(registry.search_model_versions("name = 'reid-e2e'")) == 1


def _sklearn_target_map(encoder, cfg: TrainConfig) -> float:
    from sklearn.metrics import average_precision_score

    from dynamix_core.evaluation.target import TargetSet, embed_images

    target = TargetSet.load(cfg.data.target, cfg.data.transform)
    q = embed_images(encoder, target.q_data, cfg.data.transform, torch.device("cpu")).numpy()
    g = embed_images(encoder, target.g_data, cfg.data.transform, torch.device("cpu")).numpy()
    aps = []
    for i in range(len(q)):
        keep = ~((target.g_pid == target.q_pid[i]) & (target.g_cam == target.q_cam[i]))
        rel = target.g_pid[keep] == target.q_pid[i]
        if rel.any():
            aps.append(average_precision_score(rel, g[keep] @ q[i]))
    return float(np.mean(aps))


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    # the store keeps only the newest label version beyond those the kept checkpoints pinned, and
    # snapshots every 2: the restart must find its checkpoint's version all the same
    pytest.param({"labeling__keep_versions": 1, "labeling__snapshot_every": 2}, id="dynamix-replicated"),
    pytest.param({"centroids__loss_mode": "sharded"}, id="dynamix-sharded"),
    # ReMix's first pseudo-labels come from the untrained encoder: one identity per video is what
    # every video of the tiny set is sure to have (as in recipes/remix_demo.yaml)
    pytest.param({"method": "remix", "sampler__ids_per_video": 1, "sampler__single_images_per_id": 4,
                  "labeling__cluster__eps": 0.2}, id="remix"),
])
def test_worker_and_labeling_actor_killed_tracking_down(ray_local, tiny_data, variant):
    """A Ray Train worker is SIGKILLed after the first checkpoint and a labeling actor mid-run while
    the MLflow server is unreachable: the worker group restarts at the checkpoint's step (not 0),
    every step is recorded exactly once (history and MLflow), the bank replicas agree (or the
    shards hold the published centroids), and every metric reaches MLflow once the server is back."""
    from mlflow.tracking import MlflowClient

    from dynamix_core.labeling import LabelTable
    from pipelines.tracking import flush_spool
    from pipelines.train.driver import run_training
    from dynamix_core.engine import load_json, load_tensors
    from pipelines.runs.files import read_jsonl

    max_steps, checkpoint_every = 48, 8
    name = "faults-" + "-".join(f"{v}" for v in variant.values() if isinstance(v, str)) if variant else "faults"
    name = name if name != "faults-" else "faults"
    cfg = tiny_config(tiny_data, name, run__max_steps=max_steps, run__checkpoint_every=checkpoint_every,
                      tracking__uri=f"http://127.0.0.1:{_dead_port()}", scaling__max_failures=3, **variant)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    killed: dict[str, int] = {}

    def killer():
        # Ray Train registers a reported checkpoint when its controller next polls the workers
        # (every 2 s): kill once the first checkpoint has been in storage for longer than that
        deadline, first_ckpt_seen = time.monotonic() + 600, None
        while time.monotonic() < deadline and "worker" not in killed:
            if first_ckpt_seen is None and any(run_dir.glob("checkpoint_*/progress.json")):
                first_ckpt_seen = time.monotonic()
            steps = [r["step"] for r in read_jsonl(run_dir / "history.jsonl")]
            if first_ckpt_seen is not None and time.monotonic() > first_ckpt_seen + 3 and steps[-1] > checkpoint_every:
                for pid in live_actor_pids("LabelingWorkerService")[:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed["labeling"] = pid
                pids = live_actor_pids("RayTrainWorker")
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["worker"] = pids[-1]
                    killed["last_step"] = steps[-1]
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg)
    thread.join(timeout=5)
    assert "worker" in killed and "labeling" in killed, killed

    # the restart resumed at the checkpoint taken before the kill, not at step 0
    starts = [r["start_step"] for r in read_jsonl(run_dir / "starts.jsonl")]
    assert starts[0] == 0 and len(starts) >= 2, starts
    assert all(0 < s <= killed["last_step"] and s % checkpoint_every == 0 for s in starts[1:]), (starts, killed)
    history = _history(run_dir)
    assert [h["step"] for h in history] == list(range(4, max_steps + 1, 4)), "a step was lost or repeated"
    assert result.metrics["step"] == max_steps
    # consistency after the restart: the final checkpoint's label version is one the store published
    ckpt = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    progress = load_json(ckpt / "progress.json")
    labels = LabelTable(run_dir / "labels")
    versions = labels.committed_versions()
    assert progress["step"] == max_steps and progress["label_version"] in versions
    assert len(labels.read(progress["label_version"])) > 0  # readable: pinned by the checkpoint
    if cfg.labeling.keep_versions == 1:  # retention ran: versions between the pins and the latest are gone
        history_versions = [r["version"] for r in labels.history()]
        assert max(versions) == max(history_versions) and len(versions) < len(history_versions), (versions, history_versions)
    banks = [load_tensors(ckpt / f"bank_rank{r}.pt") for r in (0, 1)]
    assert banks[0]["num_identities"] == banks[1]["num_identities"]
    if cfg.centroids.loss_mode == "sharded":  # each shard holds rows written during training
        assert all((b["last_updated_step"] > checkpoint_every).any() for b in banks)
    else:  # the replicated banks of the two ranks are identical
        assert torch.equal(banks[0]["centroids"], banks[1]["centroids"])
    assert all((b["last_updated_step"] <= max_steps).all() for b in banks)
    if cfg.method == "remix":  # the first round labelled videos before step 0, and rounds went on
        assert result.labeling["counters"]["rounds"] >= 2 and max(versions) >= 2
        # a round can only have failed because of the kills (its weights' publisher or its actor died)
        assert all("died" in e or "lost" in e for e in result.labeling["errors"]), result.labeling["errors"]
    # tracking was down: everything is spooled, then delivered exactly once
    store = f"sqlite:///{run_dir / 'mlflow_recovered.db'}"
    for spool in ("spool_rank0", "spool_driver"):
        assert flush_spool(run_dir / spool, store, timeout_s=120) == 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("dynamix").experiment_id],
                              filter_string=f"tags.`dynamix.run_name` = '{name}'")
    assert len(runs) == 1
    logged = client.get_metric_history(runs[0].info.run_id, "loss/total")
    assert sorted(m.step for m in logged) == list(range(4, max_steps + 1, 4)), "a step reached MLflow twice or never"
    values = {m.step: m.value for m in logged}
    assert all(np.isclose(values[h["step"]], h["loss/total"]) for h in history)


def test_a_missing_ground_truth_is_dropped_with_one_warning_and_a_missing_input_stops(tiny_data, caplog):
    """labeling.ground_truth only measures pseudo-label quality: a recipe written on a laptop names a local
    file that a cluster node lacks, and the job goes on without the measurement (one warning naming the
    file). A missing training input (data, weights) still stops the job with its field and path."""
    from pipelines.train.driver import resolve_paths

    truth = tiny_data / "data" / "single" / "synth_video" / "ground_truth.parquet"
    cfg = tiny_config(tiny_data, "paths", labeling__ground_truth=f"[{truth},runs/demo/nowhere/ground_truth.parquet]")
    with caplog.at_level("WARNING", logger="dynamix.train"):
        resolved = resolve_paths(cfg)
    assert resolved.labeling.ground_truth == [str(truth.resolve())]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "runs/demo/nowhere/ground_truth.parquet" in warnings[0]
    with pytest.raises(FileNotFoundError, match="model.weights: .*nowhere.safetensors"):
        resolve_paths(tiny_config(tiny_data, "paths", model__weights=str(tiny_data / "nowhere.safetensors")))
