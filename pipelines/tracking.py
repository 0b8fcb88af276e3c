"""Resilient MLflow logging for training rank 0: every call is spooled to disk, then sent in the background.

    tracker = ResilientTracker("http://mlflow:5000", "dynamix", "market-r1", spool_dir="runs/r1/mlflow_spool")
    tracker.log_params(config_dict)                      # nested -> dotted keys, values stringified
    tracker.log_metrics({"loss/instance": 0.71}, step=100)
    tracker.log_artifact("runs/r1/report.html")
    unsent = tracker.close()                             # FINISHED; returns the records still unsent

    flush_spool("runs/r1/mlflow_spool")                  # later, e.g. from the CLI: send what is left

What it guarantees
- Training never waits for, and never fails because of, the tracking server: a call appends to the
  spool and returns. A background thread sends the spool in ``MlflowClient.log_batch`` batches every
  ``flush_interval_s``; while the server is unreachable it retries with exponential backoff (up to
  30 s) and logs one WARNING when the outage starts and one INFO line ("N metrics sent after
  outage") when the backlog has been delivered.
- Nothing is lost: records still unsent at ``close()`` stay in the spool and are sent by the next
  tracker opened on the same ``spool_dir`` (a restarted job) or by :func:`flush_spool`.
- Nothing is logged twice: the sequence number of the last delivered record (the high-water mark)
  is persisted atomically after every delivered batch, so a restarted process resumes after it.
  A batch whose delivery outcome is unknown (the process dies, or the response times out, after the
  server committed it) is sent again; that is harmless because a record carries the timestamp it was
  logged with and MLflow stores an identical (key, step, timestamp, value) metric, an identical
  param and a tag only once.
- Re-running the same training resumes the same MLflow run: the run is the one given by
  ``run_id``, else the one already recorded in the spool, else the newest run of the experiment
  tagged ``dynamix.run_name=<run_name>``, else a new one. If the server is down when the tracker is
  created, the run is found or created when it comes back; until then ``run_id`` is None and the
  spool records refer to the run only through the spool (one spool directory holds one run).

Spool layout (``spool_dir``)
- ``spool.jsonl``: append-only, one JSON record per line, ``seq`` strictly increasing: ``metric``
  (key, value, step, ts), ``param`` / ``tag`` (key, value), ``artifact`` (path, artifact_path: the
  file is read when it is sent, so keep it until then), ``status`` (RUNNING on every tracker start,
  FINISHED/FAILED/KILLED on close). Writes are flushed to the OS at each call and fsync'd once per
  sending cycle (a call never waits for the disk); a torn last line (crash mid-write) is cut off.
- ``state.json``: tracking URI, experiment, run name, run id, ``sent_seq`` (written temp + os.replace).
- ``lock``: an exclusive ``flock`` held while a tracker (or flush_spool) uses the directory.

Fail-fast HTTP: MLflow's REST client retries a failed request 7 times with backoff (minutes) by
default. The tracker's own calls run with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT=http_timeout_s``; MLflow reads both from the environment at every
request, so they are set only around the tracker's calls (under a module lock). Other threads of
the process that call MLflow at that very moment see the same values.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

#: tag that identifies the training run (the ``run_name`` argument), used to resume it
RUN_NAME_TAG = "dynamix.run_name"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_SPOOL_FILE = "spool.jsonl"
_STATE_FILE = "state.json"
_LOCK_FILE = "lock"
_BATCHED_TYPES = ("metric", "param", "tag")
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
_ENV_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------- spool


class _Spool:
    """The on-disk spool of one run: append records, hand out the unsent ones, persist the high-water mark.

    Thread-safe: the training thread appends while the sender thread reads and marks."""

    def __init__(self, spool_dir: Path, *, tracking_uri: str | None, experiment: str | None,
                 run_name: str | None, run_id: str | None, artifact_location: str | None = None):
        self.dir = spool_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_fd = self._acquire_dir_lock()
        try:
            self.state = self._load_state(tracking_uri, experiment, run_name, run_id)
            # where a new experiment keeps its artifacts (None: the tracking store's default)
            self.state["artifact_location"] = artifact_location or self.state.get("artifact_location")
            self._pending: deque[dict] = deque()
            self.metric_steps: set[int] = set()  # steps with a metric in the spool, sent or not
            self._next_seq = self._load_pending()
            self._file = open(self.dir / _SPOOL_FILE, "a", encoding="utf-8")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._write_state()

    def _acquire_dir_lock(self) -> int:
        fd = os.open(self.dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"MLflow spool dir {self.dir} is in use by another tracker (pid {holder}); close it first "
                "or give this tracker its own spool_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _load_state(self, tracking_uri, experiment, run_name, run_id) -> dict:
        path = self.dir / _STATE_FILE
        if not path.exists():
            return {"tracking_uri": tracking_uri, "experiment": experiment, "run_name": run_name,
                    "run_id": run_id, "sent_seq": 0}
        state = json.loads(path.read_text())
        for name, value in (("experiment", experiment), ("run_name", run_name)):
            if value is not None and state[name] != value:
                raise ValueError(
                    f"spool dir {self.dir} belongs to {name} {state[name]!r}, not {value!r}: one spool dir "
                    "holds one run; use another spool_dir for this run")
        if run_id is not None and state["run_id"] not in (None, run_id):
            raise ValueError(
                f"spool dir {self.dir} belongs to MLflow run {state['run_id']}, not run_id={run_id}; "
                "use another spool_dir or drop run_id")
        state["run_id"] = state["run_id"] or run_id
        state["tracking_uri"] = tracking_uri or state["tracking_uri"]
        return state

    def _load_pending(self) -> int:
        """Queue the records after the high-water mark; returns the next sequence number."""
        path = self.dir / _SPOOL_FILE
        last_seq = self.state["sent_seq"]
        if not path.exists():
            return last_seq + 1
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            # a crash in the middle of an append: the torn line was never acknowledged to anyone
            log.warning("MLflow spool %s: cutting off a torn last line (%d bytes)", path, len(data) - len(complete))
            os.truncate(path, len(complete))
        for line in complete.decode("utf-8").splitlines():
            record = json.loads(line)
            last_seq = record["seq"]
            if record["type"] == "metric":
                self.metric_steps.add(int(record["step"]))
            if record["seq"] > self.state["sent_seq"]:
                self._pending.append(record)
        return last_seq + 1

    def append(self, records: list[dict]) -> None:
        """Give each record the next sequence number, write them in one go and queue them for sending."""
        with self._lock:
            for record in records:
                record["seq"] = self._next_seq
                self._next_seq += 1
            self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            self._file.flush()
            self._pending.extend(records)

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def head(self) -> list[dict]:
        """The next records to send together: a run of metric/param/tag records within MLflow's batch
        limits, or a single artifact/status record."""
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        with self._lock:
            if not self._pending:
                return []
            if self._pending[0]["type"] not in _BATCHED_TYPES:
                return [self._pending[0]]
            chunk, num_metrics, num_params_tags = [], 0, 0
            for record in self._pending:
                if record["type"] not in _BATCHED_TYPES or len(chunk) == MAX_ENTITIES_PER_BATCH:
                    break
                is_metric = record["type"] == "metric"
                if (num_metrics + is_metric > MAX_METRICS_PER_BATCH
                        or num_params_tags + (not is_metric) > MAX_PARAMS_TAGS_PER_BATCH):
                    break
                num_metrics += is_metric
                num_params_tags += not is_metric
                chunk.append(record)
            return chunk

    def mark_sent(self, chunk: list[dict]) -> None:
        """Drop a delivered head chunk and persist the new high-water mark."""
        with self._lock:
            for record in chunk:
                assert self._pending.popleft() is record, "chunks are delivered in spool order"
            self.state["sent_seq"] = chunk[-1]["seq"]
        self._write_state()

    def set_run_id(self, run_id: str) -> None:
        self.state["run_id"] = run_id
        self._write_state()

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _write_state(self) -> None:
        path = self.dir / _STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def close(self) -> None:
        self._file.close()
        os.close(self._lock_fd)


# ---------------------------------------------------------------------------------------- sender


class _Unreachable(Exception):
    """The tracking server could not be reached (or answered with a server-side error)."""


def _is_transient(exc: BaseException) -> bool:
    """Server down, timeout, 5xx or 429: worth retrying. A 4xx answer means the record itself is rejected."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, OSError)  # requests' connection errors are OSErrors


@contextlib.contextmanager
def _fail_fast_http(timeout_s: int) -> Iterator[None]:
    """No MLflow-internal retries and a short timeout for the calls inside (see the module docstring)."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    with _ENV_LOCK:
        previous = {name: os.environ.get(name) for name in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class _Sender:
    """Delivers a spool to MLflow in order; one sending cycle at a time (the tracker's thread or flush_spool)."""

    def __init__(self, spool: _Spool, http_timeout_s: int):
        from mlflow import MlflowClient

        self.spool = spool
        self.uri = spool.state["tracking_uri"]
        self.http_timeout_s = http_timeout_s
        self.client = MlflowClient(tracking_uri=self.uri)
        self.fatal = False  # the run cannot be used: sending stops, the spool keeps everything
        self._run_checked = False
        self._down = False
        self._metrics_since_outage = 0

    def cycle(self) -> bool:
        """Send everything pending; True when the spool is fully delivered. Never raises."""
        if self.fatal:
            return False
        with _fail_fast_http(self.http_timeout_s):
            try:
                self.spool.sync()
                self._ensure_run()
                if self.fatal:
                    return False
                while chunk := self.spool.head():
                    self._deliver(chunk)
                    self.spool.mark_sent(chunk)
                    if self._down:
                        self._metrics_since_outage += sum(r["type"] == "metric" for r in chunk)
            except _Unreachable as exc:
                self._on_unreachable(exc.__cause__ or exc)
                return False
            except Exception:
                log.exception("MLflow tracker: unexpected error while sending %s; retrying later", self.spool.dir)
                return False
        if self._down:
            log.info("MLflow tracking server %s reachable again: %d metrics sent after outage",
                     self.uri, self._metrics_since_outage)
            self._down, self._metrics_since_outage = False, 0
        return True

    def try_resolve_run(self) -> None:
        """One fail-fast attempt to find or create the run (the thread retries if this one fails)."""
        with _fail_fast_http(self.http_timeout_s):
            try:
                self._ensure_run()
            except _Unreachable as exc:
                self._on_unreachable(exc.__cause__ or exc)

    def _on_unreachable(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning("MLflow tracking server %s unreachable (%s: %s); training goes on, records are spooled "
                        "in %s and sent when it is back", self.uri, type(exc).__name__, str(exc)[:200], self.spool.dir)

    def _call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, with transient failures turned into :class:`_Unreachable`."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_transient(exc):
                raise _Unreachable() from exc
            raise

    def _ensure_run(self) -> None:
        """Check the known run once, or find (by the run-name tag) or create it; a run that does not exist
        or was deleted makes the sender fatal."""
        from mlflow.exceptions import MlflowException

        if self._run_checked or self.fatal:
            return
        state = self.spool.state
        try:
            if state["run_id"] is not None:
                run = self._call(self.client.get_run, state["run_id"])
                if run.info.lifecycle_stage != "active":
                    raise MlflowException(f"run {state['run_id']} is {run.info.lifecycle_stage}")
            else:
                self.spool.set_run_id(self._find_or_create_run(state["experiment"], state["run_name"]))
        except MlflowException as exc:
            self.fatal = True
            log.error("MLflow tracker: cannot use run %s (%r of experiment %r) at %s: %s; nothing more is sent, "
                      "the records stay in %s", state["run_id"], state["run_name"], state["experiment"], self.uri,
                      exc, self.spool.dir)
            return
        self._run_checked = True

    def _find_or_create_run(self, experiment_name: str, run_name: str) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        experiment = self._call(self.client.get_experiment_by_name, experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self._call(self.client.create_experiment, experiment_name,
                                           artifact_location=self.spool.state.get("artifact_location"))
            except MlflowException as exc:  # another job created it in the meantime
                if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment_id = self._call(self.client.get_experiment_by_name, experiment_name).experiment_id
        runs = self._call(self.client.search_runs, [experiment_id],
                          filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            log.info("MLflow: resuming run %s (%s=%s)", runs[0].info.run_id, RUN_NAME_TAG, run_name)
            return runs[0].info.run_id
        run_id = self._call(self.client.create_run, experiment_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name}).info.run_id
        log.info("MLflow: created run %s in experiment %r", run_id, experiment_name)
        return run_id

    def _deliver(self, chunk: list[dict]) -> None:
        kind = chunk[0]["type"]
        if kind in _BATCHED_TYPES:
            self._log_batch(chunk)
        elif kind == "artifact":
            self._log_artifact(chunk[0])
        else:
            assert kind == "status", kind
            self._set_status(chunk[0])

    def _log_batch(self, records: list[dict]) -> None:
        """``log_batch``; a rejected batch is split in halves until the rejected records are isolated and dropped."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        metrics = [Metric(r["key"], r["value"], r["ts"], r["step"]) for r in records if r["type"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in records if r["type"] == "param"]
        tags = [RunTag(r["key"], r["value"]) for r in records if r["type"] == "tag"]
        try:
            self._call(self.client.log_batch, self.spool.state["run_id"], metrics=metrics, params=params, tags=tags)
        except MlflowException as exc:
            if len(records) == 1:
                log.error("MLflow rejected %s %r (seq %d): %s; dropped (it stays in %s)", records[0]["type"],
                          records[0]["key"], records[0]["seq"], exc, self.spool.dir)
                return
            middle = len(records) // 2
            self._log_batch(records[:middle])
            self._log_batch(records[middle:])

    def _log_artifact(self, record: dict) -> None:
        from mlflow.exceptions import MlflowException

        if not os.path.exists(record["path"]):
            log.error("MLflow artifact %s (seq %d) no longer exists; dropped", record["path"], record["seq"])
            return
        try:
            self._call(self.client.log_artifact, self.spool.state["run_id"], record["path"], record["artifact_path"])
        except MlflowException as exc:
            log.error("MLflow rejected artifact %s (seq %d): %s; dropped", record["path"], record["seq"], exc)

    def _set_status(self, record: dict) -> None:
        run_id = self.spool.state["run_id"]
        if record["status"] == "RUNNING":
            self._call(self.client.update_run, run_id, status="RUNNING")
        else:
            self._call(self.client.set_terminated, run_id, status=record["status"], end_time=record["ts"])


# --------------------------------------------------------------------------------------- tracker


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"name": "vit"}}`` -> ``{"model.name": "vit"}``; leaves are stringified."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _clip(kind: str, key: str, value: str, limit: int) -> str:
    """A value longer than MLflow accepts, cut to ``limit`` characters with a marker saying how long it was."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated, {len(value)} chars]"
    log.warning("MLflow %s %r is %d characters long (limit %d); logging it truncated", kind, key, len(value), limit)
    return value[: limit - len(marker)] + marker


def _now_ms() -> int:
    return int(time.time() * 1000)


class ResilientTracker:
    """An MLflow run logger that never blocks or fails training (see the module docstring).

    Creating one makes a single fail-fast attempt (bounded by ``http_timeout_s``) to find or create the
    run, so that ``run_id`` is usually known at once; everything else happens in the background thread.
    Raises ValueError when ``spool_dir`` is held by another tracker or belongs to another run."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, spool_dir: str | Path,
                 run_id: str | None = None, flush_interval_s: float = 2.0, http_timeout_s: int = 10,
                 artifact_location: str | None = None):
        if not run_name or "'" in run_name:
            raise ValueError(f"run_name must be non-empty and free of single quotes, got {run_name!r}")
        if flush_interval_s <= 0 or http_timeout_s <= 0:
            raise ValueError(
                f"flush_interval_s and http_timeout_s must be > 0, got {flush_interval_s} and {http_timeout_s}")
        self._flush_interval_s = flush_interval_s
        self._spool = _Spool(Path(spool_dir), tracking_uri=tracking_uri, experiment=experiment,
                             run_name=run_name, run_id=run_id, artifact_location=artifact_location)
        try:
            self._sender = _Sender(self._spool, http_timeout_s)
        except BaseException:
            self._spool.close()
            raise
        # RUNNING goes through the spool so that it lands after a FINISHED left by a previous tracker
        self._spool.append([{"type": "tag", "key": RUN_NAME_TAG, "value": run_name},
                            {"type": "status", "status": "RUNNING", "ts": _now_ms()}])
        self._sender.try_resolve_run()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._closing = False
        self._close_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the server has not been reachable since the run was first spooled."""
        return self._spool.state["run_id"]

    def has_metrics_at(self, step: int) -> bool:
        """True when an earlier tracker of this spool (a previous attempt of a restarted job)
        already logged metrics at ``step``: a replayed step is then not logged twice."""
        return step in self._spool.metric_steps

    @property
    def num_unsent(self) -> int:
        """Records spooled but not yet delivered."""
        return self._spool.num_pending

    # ------------------------------------------------------------------ logging calls (never block)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts become dotted keys; values are stringified and cut to MLflow's length limit."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._append([{"type": "param", "key": key, "value": _clip("param", key, value, MAX_PARAM_VAL_LENGTH)}
                      for key, value in flatten_params(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = _now_ms()
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None
            records.append({"type": "metric", "key": key, "value": number, "step": int(step), "ts": ts})
        self._append(records)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self._append([{"type": "tag", "key": key, "value": _clip("tag", key, str(value), MAX_TAG_VAL_LENGTH)}
                      for key, value in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file later, from the background thread: keep the file in place until it is sent."""
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} is not a file")
        self._append([{"type": "artifact", "path": str(path), "artifact_path": artifact_path}])

    def _append(self, records: list[dict]) -> None:
        if self._closing:
            raise RuntimeError(f"the tracker of {self._spool.dir} is closed")
        if records:
            self._spool.append(records)

    # ------------------------------------------------------------------------------ flush / close

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait (up to ``timeout_s``) until everything spooled so far is sent; returns the records still unsent."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._progress:
            while self._spool.num_pending and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._progress.wait(remaining)
        return self._spool.num_pending

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> int:
        """End the run with ``status`` and send what is pending, for at most ``timeout_s`` (plus one HTTP
        timeout if a request is in flight). Returns the number of records left unsent in the spool."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self._closing:
            return self._spool.num_pending
        self._spool.append([{"type": "status", "status": status, "ts": _now_ms()}])
        self._close_deadline = time.monotonic() + timeout_s
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s + self._sender.http_timeout_s + 1)
        unsent = self._spool.num_pending
        if unsent:
            log.warning("MLflow tracker: %d records unsent; they stay in %s and are sent by the next tracker on "
                        "this spool dir or by flush_spool()", unsent, self._spool.dir)
        return unsent

    def __enter__(self) -> ResilientTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")

    def _run(self) -> None:
        """The sender thread: a cycle every flush_interval_s, exponential backoff while the server is down."""
        backoff = _MIN_BACKOFF_S
        wait = 0.0
        try:
            while True:
                self._wake.wait(wait)
                self._wake.clear()
                delivered = self._sender.cycle()
                with self._progress:
                    self._progress.notify_all()
                if self._closing and (delivered or self._sender.fatal or time.monotonic() >= self._close_deadline):
                    return
                if delivered:
                    backoff, wait = _MIN_BACKOFF_S, self._flush_interval_s
                else:
                    backoff, wait = min(2 * backoff, _MAX_BACKOFF_S), backoff
                if self._closing:
                    wait = min(wait, max(0.0, self._close_deadline - time.monotonic()))
        finally:
            # the directory lock is released only when no request can still be in flight
            self._spool.close()
            with self._progress:
                self._progress.notify_all()


def flush_spool(spool_dir: str | Path, tracking_uri: str | None = None, timeout_s: float = 60.0,
                http_timeout_s: int = 10) -> int:
    """Send what a tracker left unsent in ``spool_dir`` (to ``tracking_uri``, default the one it used).
    Retries with backoff for at most ``timeout_s``; returns the number of records still unsent."""
    if not (Path(spool_dir) / _STATE_FILE).is_file():
        raise ValueError(f"{spool_dir} is not a tracker spool (no {_STATE_FILE}); pass the spool_dir a tracker used")
    spool = _Spool(Path(spool_dir), tracking_uri=tracking_uri, experiment=None, run_name=None, run_id=None)
    try:
        sender = _Sender(spool, http_timeout_s)
        deadline = time.monotonic() + timeout_s
        backoff = _MIN_BACKOFF_S
        while not sender.cycle() and not sender.fatal and time.monotonic() + backoff < deadline:
            time.sleep(backoff)
            backoff = min(2 * backoff, _MAX_BACKOFF_S)
        return spool.num_pending
    finally:
        spool.close()
