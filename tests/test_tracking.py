"""ResilientTracker: embedded sqlite store, spool resume across trackers, and a real MLflow server killed mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipelines.tracking import RUN_NAME_TAG, ResilientTracker, flush_spool

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: E402

MLFLOW_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_embedded_sqlite_logs_everything_and_resumes_the_run_by_name(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 1000)

    tracker = ResilientTracker(uri, "embedded", "run-e", tmp_path / "spool_1", flush_interval_s=0.1)
    tracker.log_params({"model": {"name": "vit", "dim": 256}, "lr": 3e-4, "empty": {}, "long": long_value})
    for step in range(5):
        tracker.log_metrics({"loss/instance": 1.0 / (step + 1), "eval/mAP": step / 10}, step=step)
    tracker.set_tags({"stage": "smoke"})
    tracker.log_artifact(artifact, artifact_path="docs")
    assert tracker.close() == 0

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "smoke" and run.data.tags[RUN_NAME_TAG] == "run-e"
    params = dict(run.data.params)
    long_logged = params.pop("long")
    assert params == {"model.name": "vit", "model.dim": "256", "lr": "0.0003", "empty": "{}"}
    assert len(long_logged) == MAX_PARAM_VAL_LENGTH and long_logged.startswith("x" * 5000)
    assert _history(client, tracker.run_id, "loss/instance") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert _history(client, tracker.run_id, "eval/mAP") == [(s, s / 10) for s in range(5)]
    assert [f.path for f in client.list_artifacts(tracker.run_id, "docs")] == ["docs/notes.txt"]

    # the same training started again (fresh spool): same MLflow run, found by its run-name tag. A param
    # whose value changed is rejected by MLflow: only that record is dropped, the metrics beside it land.
    with pytest.raises(RuntimeError, match="boom"):
        with ResilientTracker(uri, "embedded", "run-e", tmp_path / "spool_2", flush_interval_s=0.1) as again:
            assert again.run_id == tracker.run_id
            again.log_params({"lr": 1e-3, "seed": 7})
            again.log_metrics({"loss/instance": 0.1}, step=5)
            raise RuntimeError("boom")
    assert again.num_unsent == 0
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["lr"] == "0.0003" and run.data.params["seed"] == "7"
    assert _history(client, tracker.run_id, "loss/instance")[-1] == (5, 0.1)
    assert any(r.levelno == logging.ERROR and "'lr'" in r.getMessage() for r in caplog.records)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_spool_is_resumed_by_the_next_tracker_without_resending(tmp_path, monkeypatch):
    sent = Counter()
    real_log_batch = MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        result = real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        sent.update((m.key, m.step) for m in metrics)
        return result

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    spool = tmp_path / "spool"

    # 1. nobody listens: the run cannot even be created, calls return at once, close leaves everything spooled
    down = ResilientTracker(f"http://127.0.0.1:{_free_port()}", "resume", "run-r", spool,
                            flush_interval_s=0.1, http_timeout_s=1)
    assert down.run_id is None
    started = time.perf_counter()
    for step in range(10):
        down.log_metrics({"m": float(step)}, step=step)
    assert time.perf_counter() - started < 0.5
    assert down.close(timeout_s=0.5) == 13  # run-name tag + RUNNING + 10 metrics + FINISHED
    with open(spool / "spool.jsonl", "ab") as f:  # a crash in the middle of an append
        f.write(b'{"seq":14,"type":"met')

    # 2. flush_spool delivers it elsewhere (creating the run), 3. a new tracker resumes after the high-water mark
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert flush_spool(spool, uri) == 0
    run_id = json.loads((spool / "state.json").read_text())["run_id"]
    resumed = ResilientTracker(uri, "resume", "run-r", spool, flush_interval_s=0.1)
    assert resumed.run_id == run_id
    with pytest.raises(ValueError, match="in use by another tracker"):
        ResilientTracker(uri, "resume", "run-r", spool)
    for step in range(10, 15):
        resumed.log_metrics({"m": float(step)}, step=step)
    assert resumed.close() == 0
    with pytest.raises(ValueError, match="belongs to run_name 'run-r'"):
        ResilientTracker(uri, "resume", "other", spool)

    assert sent == Counter({("m", step): 1 for step in range(15)})
    client = MlflowClient(uri)
    assert _history(client, run_id, "m") == [(s, float(s)) for s in range(15)]
    assert client.get_run(run_id).info.status == "FINISHED"


HUNG_TIMEOUT_S = 5  # the tracker's HTTP timeout in the outage test


class _MlflowServer:
    """A real ``mlflow server`` (gunicorn, one worker, sqlite) in its own process group, restartable."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.db = root / "mlflow.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
        cmd = [str(MLFLOW_BIN), "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--gunicorn-opts", "--log-level warning"]
        with open(self.root / "server.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server not healthy after {timeout_s} s")

    def freeze(self) -> None:
        """Hang the server (connections accepted by the kernel, never answered): requests run into their timeout."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the CLI, gunicorn master and worker
            self.proc.wait()


@pytest.mark.slow
def test_server_killed_mid_run_every_metric_lands_exactly_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.tracking")
    server = _MlflowServer(tmp_path)
    artifact = tmp_path / "during_outage.txt"
    artifact.write_text("logged while the server was down")
    expected: dict[str, list[tuple[int, float]]] = {"loss/instance": [], "eval/mAP": []}
    call_seconds = []

    def log_step(tracker: ResilientTracker, step: int) -> None:
        metrics = {"loss/instance": 1.0 / (step + 1), "eval/mAP": step / 100}
        started = time.perf_counter()
        tracker.log_metrics(metrics, step=step)
        call_seconds.append(time.perf_counter() - started)
        for key, value in metrics.items():
            expected[key].append((step, value))

    def outage_warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]

    server.start()
    try:
        tracker = ResilientTracker(server.uri, "outage", "run-o", tmp_path / "spool", flush_interval_s=0.2,
                                   http_timeout_s=HUNG_TIMEOUT_S)
        for step in range(20):
            log_step(tracker, step)
        assert tracker.flush(timeout_s=30) == 0

        before_outage = len(outage_warnings())  # a loaded box may already have timed out a slow answer
        server.freeze()  # first hung (the sender waits for its HTTP timeout), then dead
        for step in range(20, 40):
            log_step(tracker, step)
            time.sleep(0.05)
        server.kill()
        for step in range(40, 60):
            log_step(tracker, step)
            time.sleep(0.01)
        tracker.log_artifact(artifact)
        deadline = time.monotonic() + 15
        while not outage_warnings() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracker.flush(timeout_s=0.5) > 0  # still down: nothing of the outage was sent

        during_outage = len(outage_warnings()) - before_outage
        server.start()  # same port, same sqlite file
        assert tracker.flush(timeout_s=60) == 0
        assert tracker.close() == 0
    finally:
        server.kill()

    # a call that waited for the hung server would take the whole HTTP timeout; the calls only append to the spool
    assert max(call_seconds) < HUNG_TIMEOUT_S, max(call_seconds)
    assert during_outage == 1  # one warning for the outage, not one per failed send
    recovered = [r.getMessage() for r in caplog.records if "after outage" in r.getMessage()]
    assert any("80 metrics sent after outage" in m for m in recovered), recovered  # 40 steps x 2 keys

    client = MlflowClient(f"sqlite:///{server.db}")  # the server is gone: read its store directly
    for key, values in expected.items():
        assert _history(client, tracker.run_id, key) == values
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert len(list((tmp_path / "artifacts").rglob("during_outage.txt"))) == 1


def test_a_new_runs_embedded_store_is_a_copy_of_a_migrated_template(tmp_path, monkeypatch):
    """Migrating a fresh sqlite store runs MLflow's whole migration chain (about 6 s, every new run).
    A new run's store is copied from an empty store migrated once per MLflow version: it must be at
    the schema revision MLflow's own migration reaches, hold no run, and take a run's records."""
    import sqlite3

    from pipelines.runs.folder import RunFolder, tracking_target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def revision(db: Path) -> str:
        with sqlite3.connect(db) as con:
            return con.execute("select version_num from alembic_version").fetchone()[0]

    reference = tmp_path / "reference.db"
    MlflowClient(f"sqlite:///{reference}").search_experiments()  # MLflow migrates it itself
    uris = []
    for name in ("a", "b"):
        run = RunFolder.create(str(tmp_path / "runs"), name)
        uri, _ = tracking_target(run, None)
        uris.append(uri)
        db = Path(uri.removeprefix("sqlite:///"))
        assert db.is_file() and revision(db) == revision(reference)
    assert [p.name for p in (tmp_path / "cache" / "dynamix" / "mlflow").iterdir()] != []  # migrated once, kept
    client = MlflowClient(uris[0])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    tracker = ResilientTracker(uris[0], "dynamix", "r", tmp_path / "spool")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    [run] = client.search_runs([client.get_experiment_by_name("dynamix").experiment_id])
    assert run.data.metrics == {"loss": 1.0}
    assert MlflowClient(uris[1]).get_experiment_by_name("dynamix") is None  # the copies are separate
