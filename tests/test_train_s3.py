"""`dynamix train` with its shards and `run.storage` on an object store: a real S3 API on loopback
(moto's server, started by the tests), the real Ray Train, labeling pool and label store.

What the run stored is read back with boto3 (an independent client), not with the code under test;
the resume is judged by ``starts.jsonl`` and the metric history, which rank 0 wrote to the bucket."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest

from conftest import TINY_SYNTH, init_local_ray, s3_test_env
from pipelines.cli import main

SETS = {"synth_m0": "multi", "synth_m1": "multi", "synth_video": "single", "synth_target": "target"}


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """Ray started with the loopback S3's variables in its workers' environment (a Ray started
    earlier in the session keeps the environment it started with, as a cluster's nodes keep theirs);
    the session's plain Ray is restored afterwards."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    init_local_ray(s3_test_env(s3_server))
    yield ray
    ray.shutdown()
    if was_running:
        init_local_ray()


def _keys(bucket_uri: str, prefix: str) -> dict[str, int]:
    """``key -> size`` of every object under ``prefix``, listed by boto3 (not by the code under test)."""
    client, bucket = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), bucket_uri.removeprefix("s3://")
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return keys


def _text(bucket_uri: str, key: str) -> str:
    client, bucket = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), bucket_uri.removeprefix("s3://")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _jsonl(bucket_uri: str, key: str) -> list[dict]:
    return [json.loads(line) for line in _text(bucket_uri, key).splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_train_with_shards_and_storage_on_s3_keeps_the_run_there_and_resumes_from_it(
        ray_s3, s3_bucket, tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from dynamix_core.config import load_config
    from dynamix_core.data.synth import SynthConfig, generate
    from dynamix_core.model import build_encoder, load_weights
    from pipelines.demo import label_quality
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.train.driver import run_training
    from pipelines.runs.files import local_run_dir
    from test_train_pipeline import tiny_config

    caplog.set_level("WARNING", logger="werkzeug")  # moto's server logs every request
    # 8 videos: 2 workers each need enough labelled videos to fill the sampler's batches
    generate(load_config(SynthConfig, None, TINY_SYNTH + ["num_videos=8"]), tmp_path / "data", progress=False)
    shards = {name: f"{s3_bucket}/shards/{name}" for name in SETS}
    for name, kind in SETS.items():
        run_ingest(IngestConfig(root=tmp_path / "data" / kind / name, out=shards[name], dataset=name, workers=0),
                   progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the run's local-only files
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def config(max_steps: int):
        return tiny_config(tmp_path, "s3run", run__max_steps=max_steps, run__checkpoint_every=4,
                           run__storage=f"{s3_bucket}/runs", tracking__uri="null",
                           tracking__registered_model="reid-s3",
                           data__multi=f"[{shards['synth_m0']},{shards['synth_m1']}]",
                           data__single=f"[{shards['synth_video']}]", data__target=shards["synth_target"],
                           data__single_reads="planned")  # each planned image a ranged GET

    with caplog.at_level("WARNING", logger="dynamix.train"):
        first = run_training(config(8), progress=False)
    run = "runs/s3run/"
    assert first.run_dir == f"{s3_bucket}/runs/s3run"
    keys = _keys(s3_bucket, run)
    for name in ("config.yaml", "history.jsonl", "starts.jsonl", "result.json", "momentum_encoder.safetensors",
                 "labels/index.parquet", "labels/v00000000.snap.npy"):
        assert run + name in keys, (name, sorted(keys))
    assert [h["step"] for h in _jsonl(s3_bucket, run + "history.jsonl")] == [4, 8]
    assert [s["start_step"] for s in _jsonl(s3_bucket, run + "starts.jsonl")] == [0]
    assert json.loads(_text(s3_bucket, run + "result.json"))["metrics"]["step"] == 8
    # Ray Train's checkpoint folders, and the snapshot a re-run resumes from
    checkpoints = sorted({k.split("/")[2] for k in keys if k.count("/") == 3 and k.split("/")[2].startswith("checkpoint_")})
    assert len(checkpoints) == 2, sorted(keys)  # steps 4 and 8 (run.keep_checkpoints=2)
    assert run + "checkpoint_manager_snapshot.json" in keys
    for ckpt in checkpoints:
        assert {"trainer.pt", "progress.json", "bank_rank0.pt", "bank_rank1.pt"} <= \
            {k.split("/")[-1] for k in keys if k.startswith(f"{run}{ckpt}/")}
    # the exported encoder: the object in the bucket is the local copy the result names, and it loads
    local = local_run_dir(first.run_dir)
    assert local.is_relative_to(tmp_path / "cache") and first.weights_path == local / "momentum_encoder.safetensors"
    assert keys[run + "momentum_encoder.safetensors"] == first.weights_path.stat().st_size
    load_weights(build_encoder(config(8).model), first.weights_path)
    # MLflow's sqlite store cannot live in a bucket: a local one (and the spools), and a log line says where
    mlflow_db = local / "mlflow.db"
    assert mlflow_db.is_file() and (local / "spool_driver").is_dir() and (local / "spool_rank0").is_dir()
    assert str(mlflow_db) in caplog.text
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "loss/total")) == [4, 8]
    # ... but the run's artifacts, the registered model's included, are kept with the run in the bucket,
    # never in the working directory (MLflow's default for a sqlite store is ./mlruns)
    assert any(k.startswith(run + "mlartifacts/") and k.endswith("config.yaml") for k in keys), sorted(keys)
    assert any(k.startswith(run + "mlartifacts/") and k.endswith("weights.safetensors") for k in keys), sorted(keys)
    assert not (cwd / "mlruns").exists() and not (cwd / "mlartifacts").exists()
    import mlflow

    from services.registry import tracking

    with tracking(f"sqlite:///{mlflow_db}"):
        champion = mlflow.pyfunc.load_model("models:/reid-s3@champion")  # downloaded from the bucket
    assert champion.predict(np.zeros((1, 32, 16, 3), dtype=np.uint8)).shape[0] == 1

    # the same run name with more steps resumes from the newest checkpoint in the bucket
    second = run_training(config(12), progress=False)
    assert [s["start_step"] for s in _jsonl(s3_bucket, run + "starts.jsonl")] == [0, 8]
    assert [h["step"] for h in _jsonl(s3_bucket, run + "history.jsonl")] == [4, 8, 12]
    assert second.metrics["step"] == 12 and second.mlflow_run_id == first.mlflow_run_id
    keys = _keys(s3_bucket, run)
    # relabel rounds ran (over both runs) and their versions and the coordinator's schedule are in the bucket
    rounds = first.labeling["reports"] + second.labeling["reports"]
    assert rounds and run + "labels/coordinator_state.json" in keys
    assert any(k.startswith(run + "labels/v") and k.endswith(".delta.npz") for k in keys), sorted(keys)
    quality = label_quality(second.run_dir)  # the demo's label scores, read from the bucket
    assert quality["label_versions"] >= 1 and 0.0 <= quality["label_F_after"] <= 1.0
    # nothing of the run went to a local folder named after the URI (Path("s3://...") would make "s3:")
    assert not list(cwd.rglob("s3:*"))
    session_dir = Path(ray_s3._private.worker._global_node.get_session_dir_path())
    assert not [p for p in session_dir.rglob("s3:*")], "a worker wrote the run into a local folder"


def test_dynamix_storage_uri_is_the_default_run_storage_and_ingest_out(s3_bucket, tmp_path, monkeypatch, capsys):
    """The Helm chart sets DYNAMIX_STORAGE_URI (its storage.uri) on every Ray pod: runs then default
    to ``$DYNAMIX_STORAGE_URI/runs``, as the chart's training job passes with --storage, and an
    ingest with --dataset and no --out to ``$DYNAMIX_STORAGE_URI/shards/DATASET``."""
    import yaml

    from test_ingest import make_market

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: multicam\ndata: {multi: [shards/m0]}\n"
                      "sampler: {schedule: [{step_fraction: 0.0, multi_fraction: 1.0, ids_per_video: 1}]}\n")
    monkeypatch.setenv("DYNAMIX_STORAGE_URI", f"{s3_bucket}/prod/")
    assert main(["train", "--config", str(recipe), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["storage"] == f"{s3_bucket}/prod/runs"
    assert main(["train", "--config", str(recipe), "--storage", "elsewhere", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["storage"] == "elsewhere"  # --storage wins
    assert main(["runs"]) == 0  # `dynamix runs` looks in the same place
    assert f"no runs under {s3_bucket}/prod/runs" in capsys.readouterr().out
    make_market(tmp_path / "market", per_folder=3)
    ingest = ["ingest", "--root", str(tmp_path / "market"), "--workers", "0", "--no-progress"]
    assert main(ingest + ["--dataset", "mkt"]) == 0
    assert "ingested 9 images" in capsys.readouterr().out
    assert "prod/shards/mkt/manifest.parquet" in _keys(s3_bucket, "prod/shards/mkt/")
    assert main(ingest) == 2  # no dataset name: no default folder
    assert "--out is required" in capsys.readouterr().err
    monkeypatch.delenv("DYNAMIX_STORAGE_URI")
    assert main(["train", "--config", str(recipe), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["storage"] == "runs"
    assert main(ingest + ["--dataset", "mkt"]) == 2


def test_metric_history_and_starts_on_s3_are_whole_objects_with_each_step_once(s3_bucket):
    """No append on an object store: rank 0's records go to bounded parts folded into history.jsonl
    when the history is closed; a restart replaying steps after its checkpoint records them once, as
    in a local run folder (tests/test_run_files.py)."""
    from pipelines.runs.files import MetricHistory, read_jsonl, record_start

    run = f"{s3_bucket}/runs/r1"
    assert read_jsonl(f"{run}/history.jsonl") == []  # no object yet
    for start, losses in ((0, {4: 1.0, 8: 0.9, 12: 0.8}), (8, {12: 0.7, 16: 0.6})):
        record_start(run, start)
        history = MetricHistory(f"{run}/history.jsonl")
        for step, loss in losses.items():
            history.append({"step": step, "loss": loss})
        history.close()
    assert [(r["step"], r["loss"]) for r in _jsonl(s3_bucket, "runs/r1/history.jsonl")] == \
        [(4, 1.0), (8, 0.9), (12, 0.8), (16, 0.6)]
    assert [r["start_step"] for r in _jsonl(s3_bucket, "runs/r1/starts.jsonl")] == [0, 8]
    # no temporaries and no parts left (pyarrow's deletes leave a "runs/r1/" folder marker: not a file)
    assert {k for k in _keys(s3_bucket, "runs/") if not k.endswith("/")} == {"runs/r1/history.jsonl",
                                                                             "runs/r1/starts.jsonl"}
