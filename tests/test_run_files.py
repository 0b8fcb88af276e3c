"""Crash-safe run files (pipelines/runs/files.py) and rank 0's once-per-step metric records:
checkpoint state loads with ``weights_only=True`` (and a pickled object is refused), RNG states go
through JSON unchanged, a torn history line is cut off, and a restart's replayed steps reach
history.jsonl and a real MLflow store once."""

from __future__ import annotations

import json
import pickle
import random
import types

import numpy as np
import pytest
import torch

from dynamix_core.centroids import CentroidBank, CentroidBankConfig
from dynamix_core.engine import load_tensors, rng_state, set_rng_state
from pipelines.runs.files import MetricHistory, read_jsonl, write_atomic


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_survives_json():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    _draws()
    state = json.loads(json.dumps(rng_state()))
    expected = [_draws() for _ in range(3)]
    _draws()
    set_rng_state(state)
    assert [_draws() for _ in range(3)] == expected


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_tensors_load_weights_only_and_objects_are_refused(tmp_path):
    from dynamix_core.model import ModelConfig, build_encoder
    from dynamix_core.training import OptimConfig, build_optimizer

    model = build_encoder(ModelConfig(backbone="test_vit", img_size=(32, 16)))
    optimizer = build_optimizer(model, OptimConfig())
    model(torch.randn(2, 3, 32, 16)).sum().backward()
    optimizer.step()  # optimizer state with per-parameter moments and step counters
    bank = CentroidBank(5, 4, CentroidBankConfig())
    bank.load_rows(torch.tensor([1, 3]), torch.randn(2, 4), step=2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "bank": bank.state_dict()},
               tmp_path / "trainer.pt")
    state = load_tensors(tmp_path / "trainer.pt")
    restored = CentroidBank(1, 4, CentroidBankConfig())
    restored.load_state_dict(state["bank"])
    assert torch.equal(restored.centroids, bank.centroids) and restored.num_identities == 5
    optimizer.load_state_dict(state["optimizer"])

    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_tensors(tmp_path / "evil.pt")


def test_history_cuts_a_torn_line_and_records_each_step_once(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 4, "loss": 1.0}\n{"step": 8, "loss": 0.9}\n{"step": 12, "lo')  # killed mid-append
    assert read_jsonl(path) == [{"step": 4, "loss": 1.0}, {"step": 8, "loss": 0.9}]
    history = MetricHistory(path)  # a restart from the checkpoint at step 4 replays 8
    for step, loss in ((8, 0.5), (12, 0.8)):
        history.append({"step": step, "loss": loss})
    history.close()
    assert path.read_text().splitlines() == ['{"step": 4, "loss": 1.0}', '{"step": 8, "loss": 0.9}',
                                             '{"step": 12, "loss": 0.8}']


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "result.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_replayed_steps_reach_mlflow_once(tmp_path):
    """Attempt 1 logs steps 4, 8, 12 and dies; attempt 2 resumes from the checkpoint at 8 and
    replays 12 with other values: MLflow holds every step once, with history.jsonl's values."""
    from mlflow.tracking import MlflowClient

    from pipelines.runs.folder import WorkerJob
    from pipelines.train.worker import open_rank0_records, record_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = types.SimpleNamespace(tracking=types.SimpleNamespace(experiment="exp"),
                                run=types.SimpleNamespace(name="replay"))
    job = WorkerJob(cfg, str(tmp_path), str(tmp_path), uri, None)
    for start, losses in ((0, {4: 1.0, 8: 0.9, 12: 0.8}), (8, {12: 0.7, 16: 0.6})):
        tracker, history = open_rank0_records(job, start)
        for step, loss in losses.items():
            record_metrics(tracker, history, {"step": step, "loss/total": loss}, step)
        history.close()
        assert tracker.close(timeout_s=60) == 0
    client = MlflowClient(uri)
    metric = client.get_metric_history(tracker.run_id, "loss/total")
    assert sorted((m.step, m.value) for m in metric) == [(4, 1.0), (8, 0.9), (12, 0.8), (16, 0.6)]
    assert [(r["step"], r["loss/total"]) for r in read_jsonl(tmp_path / "history.jsonl")] == \
        [(4, 1.0), (8, 0.9), (12, 0.8), (16, 0.6)]
    assert [r["start_step"] for r in read_jsonl(tmp_path / "starts.jsonl")] == [0, 8]


def test_labeling_failures_reach_metrics_console_and_mlflow(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import ResilientTracker
    from pipelines.train.worker import _forward_labeling_health

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = ResilientTracker(uri, "exp", "health", tmp_path / "spool")
    stats = {"counters": {"rounds": 3, "round_errors": 2, "chunk_retries": 4},
             "errors": ["round at step 20: RuntimeError: first", "round at step 40: OSError: second"]}
    metrics: dict = {}
    with caplog.at_level("ERROR", logger="dynamix.train"):
        assert _forward_labeling_health(stats, metrics, 1, tracker) == 2  # the first failure was logged before
    assert metrics == {"labeling/round_errors": 2.0, "labeling/chunk_retries": 4.0, "labeling/requests_dropped": 0.0,
                       "labeling/rounds_stale": 0.0, "labeling/rounds": 3.0}
    assert "second" in caplog.text and "first" not in caplog.text
    assert tracker.close(timeout_s=60) == 0
    assert MlflowClient(uri).get_run(tracker.run_id).data.tags["labeling.last_error"] == stats["errors"][-1]


def test_changed_settings_of_a_resumed_run(tmp_path):
    """A re-run of a run with a larger ``run.max_steps`` names exactly that change (MLflow refuses
    to change a logged param, so the driver records it as a tag); the unchanged config names none."""
    from dynamix_core.config import dump_yaml, load_config
    from pipelines.train.config import TrainConfig
    from pipelines.train.driver import changed_settings

    base = ["data.multi=[shards/m0]", "method=multicam", "sampler.schedule=[{step_fraction: 0.0, multi_fraction: 1.0, ids_per_video: 1}]"]
    first = load_config(TrainConfig, None, [*base, "run.max_steps=150"])
    saved = tmp_path / "config.yaml"
    assert changed_settings(saved, first) == {}  # a new run
    saved.write_text(dump_yaml(first))
    assert changed_settings(saved, first) == {}
    again = load_config(TrainConfig, None, [*base, "run.max_steps=160", "data.transform.crop_scale=[0.4,1.0]"])
    assert changed_settings(saved, again) == {"run.max_steps": ("150", "160"),
                                              "data.transform.crop_scale": ("[0.5, 1.0]", "[0.4, 1.0]")}


def test_history_on_object_storage_writes_each_record_a_bounded_number_of_times(s3_bucket, monkeypatch):
    """An object cannot be appended to. Rewriting history.jsonl whole at every record uploads
    1 + 2 + ... + N lines (quadratic in the run's length); the history must upload each record a
    bounded number of times: into the current part (at most PART_RECORDS lines, rewritten per
    record) and once more when the parts are folded into history.jsonl. A writer killed without
    closing loses no record, and its successor records each step once."""
    import pipelines.runs.files as files
    from dynamix_core import storage
    from pipelines.runs.listing import list_runs

    storage.write_bytes_atomic(storage.join(s3_bucket, "runs", "r", "config.yaml"), b"run: {name: r}\n")
    uploaded = []
    real_write = storage.write_bytes_atomic
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda uri, data: (uploaded.append(len(data)), real_write(uri, data))[1])
    path = storage.join(s3_bucket, "runs", "r", "history.jsonl")
    monkeypatch.setattr(files, "PART_RECORDS", 8)  # small parts: several of them in a short history
    line = len(json.dumps({"step": 0, "loss/total": 0.5}) + "\n") + 2  # steps up to 3 digits
    n = 120
    history = MetricHistory(path)
    for step in range(n // 2):
        history.append({"step": step, "loss/total": 0.5})
    # killed here (no close): every record is readable, and a restart replays steps from 45
    assert [r["step"] for r in files.read_history_file(path)] == list(range(n // 2))
    [listed] = list_runs(storage.join(s3_bucket, "runs"))  # `dynamix runs` sees them too
    assert (listed.name, listed.status, listed.last_step) == ("r", "unfinished", n // 2 - 1)
    history = MetricHistory(path)
    for step in range(45, n):
        history.append({"step": step, "loss/total": 0.5})
    history.close()
    rows = read_jsonl(path)  # closed: one object again
    assert [r["step"] for r in rows] == list(range(n))
    assert files.read_history_file(path) == rows
    whole_rewrites = sum(range(1, n + 1)) * line  # what rewriting the whole object per record uploads
    bound = (files.PART_RECORDS + 3) * n * line  # each record: <= PART_RECORDS rewrites of its part + folds
    assert sum(uploaded) <= bound < whole_rewrites / 2, (sum(uploaded), bound, whole_rewrites)
    assert max(uploaded) <= n * line  # no upload larger than the whole history
