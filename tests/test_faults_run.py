"""Faults a demanding user meets around a run, injected on purpose: each ends in one line that names
the path or key and what to do, before anything is damaged or any minute is wasted.

Settings checked at load (before data or workers), YAML that does not parse, a refused or full disk
(no temporary shard left), one writer per run folder (a second run refuses before touching it, a
dead run's lease is taken over), the settings of an interrupted attempt, labelling failures with
their plain cause, and deterministic errors that Ray Train does not retry (the one test that
starts Ray proves that on a real trainer).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = "dynamix_demo"


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """``dynamix ARGV``: the exit code and the lines of its standard error."""
    from pipelines.cli import main

    code = main(list(argv))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- settings checked when loaded ----------------------------------------------------------------


@pytest.mark.parametrize("override, named", [
    ("run.max_steps=-5", "run.max_steps: -5 must be >= 1"),
    ("scaling.num_workers=0", "scaling.num_workers: 0 must be >= 1"),
    ("run.log_every=0", "run.log_every: 0 must be >= 1"),
    ("labeling.pool_size=0", "labeling.pool_size: 0 must be >= 1"),
    ("scaling.max_failures=-1", "scaling.max_failures: -1 must be >= 0"),
])
def test_a_value_out_of_range_fails_at_print_config(capsys, override, named):
    code, err = _cli(capsys, "train", "--config", DEMO, "--set", override, "--print-config")
    assert code == 2 and len(err) == 1
    assert err[0] == f"dynamix train: error: --set {override}: {named}"


def test_a_value_out_of_range_in_the_recipe_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path(REPO / "recipes" / "dynamix_demo.yaml").read_text() + "\nrun: {max_steps: -5}\n")
    code, err = _cli(capsys, "train", "--config", str(recipe), "--print-config")
    assert code == 2 and err == [f"dynamix train: error: {recipe}: run.max_steps: -5 must be >= 1"]


def test_multicam_without_its_schedule_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "mc.yaml"
    lines = (REPO / "recipes" / "multicam_baseline_demo.yaml").read_text().splitlines()
    recipe.write_text("\n".join(ln for ln in lines if not ln.startswith("sampler:")) + "\n")
    code, err = _cli(capsys, "train", "--config", str(recipe), "--print-config")
    assert code == 2 and len(err) == 1
    assert "sampler: method=multicam has no single-camera data" in err[0]
    assert "sampler.num_videos=0" in err[0] and str(recipe) in err[0]
    code, _ = _cli(capsys, "train", "--config", "multicam_baseline_demo", "--print-config")
    assert code == 0  # the shipped recipe has its schedule


def test_yaml_that_does_not_parse_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  max_steps: [1, 2\nmethod: dynamix\n")
    code, err = _cli(capsys, "train", "--config", str(bad), "--print-config")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"dynamix train: error: config file {bad}, line 3, column 7: not valid YAML")
    assert "fix the file" in err[0]


def test_demo_checks_its_settings_before_generating_data(tmp_path, monkeypatch):
    import pipelines.demo as demo
    from dynamix_core.config import ConfigError

    generated = []
    monkeypatch.setattr(demo, "prepare_data", lambda *a, **k: generated.append(a))
    with pytest.raises(ConfigError, match="run.checkpoint_every=25 must be a multiple of run.log_every"):
        demo.run_demo(tmp_path, overrides=["run.checkpoint_every=25"])
    with pytest.raises(ConfigError, match="run.max_steps: -5 must be >= 1"):
        demo.run_demo(tmp_path, overrides=["run.max_steps=-5"])
    assert generated == []


# --- refused and full disks ----------------------------------------------------------------------


@pytest.mark.parametrize("code, advice", [
    (errno.EACCES, "permission denied; choose a folder you can write to, or fix its permissions"),
    (errno.EROFS, "the file system is read-only; choose a writable output folder"),
    (errno.ENOSPC, "no space left on the device; free space there or choose another output folder"),
])
def test_a_refused_write_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path, code, advice):
    import pipelines.commands.synth as synth

    target = tmp_path / "out" / "data"

    def refuse(args):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(synth, "run", refuse)
    status, err = _cli(capsys, "synth", "--out", str(tmp_path / "out"))
    assert status == 1 and err == [f"dynamix synth: error: cannot write {target}: {advice}"]


def test_a_full_disk_through_ray_still_says_space(monkeypatch, capsys, tmp_path):
    """Ray wraps a worker's error (and Ray Data's retries keep only its text): the line still says
    that the disk is full, and where."""
    from ray.exceptions import RayTaskError

    import pipelines.commands.ingest as ingest

    shard = str(tmp_path / "shards" / "train" / "shard-000000.tar")
    wrapped = RayTaskError("write_shard", "Traceback ...", OSError(errno.ENOSPC, "No space left on device", shard))
    text_only = RuntimeError(f"Failed to write after 3 retry attempts: OSError: [Errno 28] No space left on device: "
                             f"'{shard}'")
    for exc in (wrapped, text_only):
        monkeypatch.setattr(ingest, "run", lambda args, exc=exc: (_ for _ in ()).throw(exc))
        status, err = _cli(capsys, "ingest", "--root", str(tmp_path), "--out", str(tmp_path / "shards"))
        assert status == 1 and err == [f"dynamix ingest: error: cannot write {shard}: no space left on the device; "
                                       "free space there or choose another output folder"]


def test_a_full_disk_leaves_no_temporary_shard(tmp_path):
    from dynamix_core.data.records import Record
    from dynamix_core.data.shards import ShardWriter

    tar = tmp_path / "train" / "shard-000000.tar"
    with pytest.raises(OSError) as failed:
        with ShardWriter(tar) as writer:
            writer._fh.close()
            writer._fh = open("/dev/full", "wb", buffering=2**20)  # every flush: ENOSPC
            writer.add(Record(key="a_0001", pid=1, camid=0, dataset="d", split="train"), b"\xff\xd8" * 100, "jpg")
            writer.commit({})
    assert failed.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tar.parent.iterdir()) == []  # no .shard-000000.tar.tmp-PID, no tar


# --- one writer per run folder -------------------------------------------------------------------

_HOLD = ("import sys, time\nfrom pipelines.runs.lease import RunLease\nRunLease(sys.argv[1]).__enter__()\n"
         "print('held', flush=True)\ntime.sleep(120)\n")


def _hold_lease(run_dir) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lease (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _demo_cfg(tmp_path, *overrides):
    from dynamix_core.config import load_config
    from pipelines.recipes import resolve_config_path
    from pipelines.train.config import TrainConfig

    return load_config(TrainConfig, resolve_config_path(DEMO), [f"run.storage={tmp_path / 'runs'}", "run.name=r1",
                                                                *overrides])


class _Stop(Exception):
    pass


def _no_cluster(monkeypatch):
    """The training driver up to its MLflow tracker, without data checks, Ray or MLflow (which raises _Stop)."""
    import pipelines.train.driver as driver

    monkeypatch.setattr(driver, "resolve_paths", lambda cfg: cfg)
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(driver, "require_resources", lambda *a, **k: None)
    monkeypatch.setattr(driver, "open_tracker", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    return driver


def test_a_second_run_on_a_live_run_folder_refuses_before_touching_it(tmp_path, monkeypatch):
    driver = _no_cluster(monkeypatch)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run: {max_steps: 30}\n")
    holder = _hold_lease(run_dir)
    try:
        with pytest.raises(Exception) as refused:
            driver.run_training(_demo_cfg(tmp_path, "run.max_steps=60"), progress=False)
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert type(refused.value).__name__ == "RunFolderBusy" and "\n" not in message
    assert f"run folder {run_dir} is in use by another run (host {os.uname().nodename}, pid {holder.pid}, started 20" in message
    assert "choose another run.name or run.storage" in message
    assert (run_dir / "config.yaml").read_text() == "run: {max_steps: 30}\n"  # untouched
    assert not (run_dir / "params.json").exists()


def test_the_lease_of_a_killed_run_is_taken_over(tmp_path, monkeypatch, caplog):
    from pipelines.runs.lease import RunLease

    driver = _no_cluster(monkeypatch)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    dead = _hold_lease(run_dir)
    dead.kill()  # kill -9: no clean-up of its own
    dead.wait()
    with pytest.raises(_Stop):  # past the lease, up to MLflow
        driver.run_training(_demo_cfg(tmp_path), progress=False)
    assert f"took over the lease of a run that is no longer running (host {os.uname().nodename}, pid {dead.pid}" \
        in caplog.text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["max_steps"] > 0
    with RunLease(run_dir) as lease:  # the driver gave it back when it stopped
        assert lease.previous is None
        assert json.loads((run_dir / "lease.json").read_text())["pid"] == os.getpid()


def test_an_object_store_lease_refuses_a_second_writer_and_takes_over_a_stale_one(s3_bucket):
    import socket

    from dynamix_core import storage
    from pipelines.runs.lease import RunFolderBusy, RunLease, _S3Object

    run_dir = f"{s3_bucket}/runs/r1"
    with RunLease(run_dir, ttl_s=30):
        with pytest.raises(RunFolderBusy, match=f"run folder {run_dir} is in use by another run \\(host "):
            RunLease(run_dir).__enter__()
        # creation is conditional: a lease that appeared meanwhile is never overwritten
        assert _S3Object(f"{run_dir}/lease.json").put(b"{}", if_absent=True, if_etag=None) is None
    assert not storage.exists(f"{run_dir}/lease.json")  # released
    # a lease whose holder stopped renewing it (another machine) is taken over after its ttl
    other = {"host": "elsewhere", "pid": 7, "started": 0, "renewed": 0, "ttl_s": 1, "token": "x", "boot_id": "b"}
    storage.write_bytes_atomic(f"{run_dir}/lease.json", json.dumps(other))
    import time

    time.sleep(2.2)
    with RunLease(run_dir) as lease:
        assert lease.previous["host"] == "elsewhere"
    # a dead process of this host: at once, however recent its last renewal
    mine = {**other, "host": socket.gethostname(), "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid": 2**22 + 1, "ttl_s": 3600}
    storage.write_bytes_atomic(f"{run_dir}/lease.json", json.dumps(mine))
    with RunLease(run_dir) as lease:
        assert lease.previous["pid"] == 2**22 + 1


# --- the settings of an interrupted attempt ------------------------------------------------------


def test_an_interrupted_attempt_with_changed_settings_never_makes_mlflow_reject_a_param(tmp_path):
    """Attempt 1 logs max_steps=30; attempt 2 (max_steps=60) is interrupted after writing its config;
    attempt 3 repeats attempt 2's command: no param it logs differs from what MLflow holds, and the
    change is a tag; attempt 4 with the same settings logs nothing that is not already there."""
    from mlflow.tracking import MlflowClient

    from pipelines.runs.folder import RunFolder
    from pipelines.train.driver import mlflow_settings
    from dynamix_core.config import dump_yaml

    run = RunFolder.create(str(tmp_path / "runs"), "r1")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    held: dict[str, str] = {}
    for attempt, steps in enumerate((30, 60, 60, 60), 1):
        cfg = _demo_cfg(tmp_path, f"run.max_steps={steps}")
        params, tags, changed = mlflow_settings(run, cfg)
        run.write("config.yaml", dump_yaml(cfg))  # as the driver does, before anything can interrupt it
        for key, value in params.items():  # MLflow raises on a param logged again with another value
            client.log_param(run_id, key, value)
        if attempt > 1:
            assert "run.max_steps" not in params and tags["dynamix.resumed_with.run.max_steps"] == "60"
        if attempt == 4:
            assert set(params.items()) <= set(held.items()) and changed == {}
        held.update(params)
    assert client.get_run(run_id).data.params["run.max_steps"] == "30"


# --- labelling failures --------------------------------------------------------------------------


def _actor_error(exc: BaseException):
    """``exc`` as ``ray.get`` raises it when a labelling actor raised it: Ray's coloured header first."""
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise exc
    except type(exc) as raised:
        return RayTaskError("LabelingWorkerService.process", traceback.format_exc(), raised, pid=4242,
                            ip="10.0.0.7").as_instanceof_cause()


def test_a_failed_round_s_cause_is_plain_text():
    from services.labeling_pool import round_error_cause

    wrapped = _actor_error(ValueError("video 17: no image decodes"))
    assert "\x1b[" in str(wrapped).splitlines()[0]  # what Ray's first line is
    assert round_error_cause(wrapped) == "ValueError: video 17: no image decodes"
    try:
        raise RuntimeError("labeling chunk 3 of round 2 lost its actor 4 times") from wrapped
    except RuntimeError as lost:
        assert round_error_cause(lost) == "RuntimeError: labeling chunk 3 of round 2 lost its actor 4 times"


class _FakeStats:
    """The coordinator's ``stats()`` after ``failed`` rounds failed (the last five causes kept)."""

    def __init__(self):
        self.failed = 0

    def fail(self, n: int) -> None:
        self.failed += n

    def __call__(self) -> dict:
        causes = [f"round at step {10 * i}: ValueError: video {i}: no image decodes" for i in range(1, self.failed + 1)]
        return {"counters": {"round_errors": self.failed, "rounds": 3}, "errors": causes[-5:], "reports": []}


def test_every_failed_round_is_one_console_line_with_its_cause(tmp_path, capsys):
    from pipelines.train.driver import ProgressPrinter
    from services.labeling_pool import new_round_errors

    stats = _FakeStats()
    reported = 0

    def labeling():
        nonlocal reported
        causes, reported = new_round_errors(stats(), reported)
        return causes

    printer = ProgressPrinter(tmp_path / "history.jsonl", 100, labeling=labeling)
    with printer:  # however the looks fall, the last one (on exit) reports what is left
        stats.fail(1)
        printer._print_new()
        stats.fail(3)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[labels]")]
    assert lines == [f"[labels] labelling round failed: round at step {10 * i}: ValueError: video {i}: no image decodes"
                     for i in range(1, 5)]


def test_mlflow_ends_with_the_labelling_counters_of_result_json():
    """Rounds that fail after rank 0's last metric report still reach MLflow: the driver logs the
    final counters (what result.json holds) at the run's last step, and the last cause as a tag."""
    from pipelines.train.driver import _log_labeling_outcome

    class Tracker:
        metrics, tags = {}, {}

        def log_metrics(self, metrics, step):
            self.metrics.update({k: (v, step) for k, v in metrics.items()})

        def set_tags(self, tags):
            self.tags.update(tags)

    stats = _FakeStats()
    stats.fail(4)
    tracker = Tracker()
    _log_labeling_outcome(tracker, stats(), step=60)
    assert tracker.metrics["labeling/round_errors"] == (4.0, 60)
    assert tracker.metrics["labeling/rounds"] == (3.0, 60)
    assert tracker.tags["labeling.last_error"] == "round at step 40: ValueError: video 4: no image decodes"


def test_a_failed_first_remix_round_is_one_line_with_its_cause(monkeypatch):
    import ray

    from dynamix_core.errors import StopRun
    from pipelines.train.driver import _wait_first_round

    class Call:
        def __init__(self, value):
            self.value = value

        def remote(self, *a, **k):
            return self.value

    failed = {"counters": {"round_errors": 1}, "errors": ["round at step 0: ValueError: video 3: no image decodes"],
              "chunks": 4, "chunks_done": 4}
    coordinator = type("C", (), {"wait_idle": Call(True), "stats": Call(failed)})()
    store = type("S", (), {"latest": Call((0, None))})()
    monkeypatch.setattr(ray, "get", lambda value, **k: value)
    with pytest.raises(StopRun) as stopped:
        _wait_first_round(coordinator, store, 60.0, progress=False)
    message = str(stopped.value)
    assert "\n" not in message and "above" not in message
    assert message.startswith("labeling: the first ReMix round failed, so training would start with no pseudo-label: "
                              "round at step 0: ValueError: video 3: no image decodes (the labeling actors' logs: ")


# --- deterministic errors are not retried --------------------------------------------------------


def test_ray_train_retries_a_lost_worker_but_not_a_deterministic_error():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from dynamix_core.config import ConfigError
    from dynamix_core.errors import StopRun
    from pipelines.train.failures import NoRetryOfDeterministicErrors

    def failed(*errors):
        return WorkerGroupError("worker errors", {r: UserExceptionWithTraceback(e, "Traceback ...")
                                                  for r, e in enumerate(errors)})

    policy = NoRetryOfDeterministicErrors(FailureConfig(max_failures=2))
    no_fill = StopRun("single-camera stream: 3 full passes over this rank's 8 videos (1 of them labelled) did "
                      "not fill a batch")
    assert policy.make_decision(failed(no_fill, RuntimeError("collective aborted"))) == FailureDecision.RAISE
    assert policy.make_decision(failed(ConfigError("sampler.num_videos=9 ..."))) == FailureDecision.RAISE
    assert policy.make_decision(failed(RuntimeError("connection reset"))) == FailureDecision.RETRY


def test_a_deterministic_worker_error_stops_the_run_at_once_in_one_line(ray_local, tmp_path):
    """A real TorchTrainer with max_failures=2 whose workers cannot fill a batch: one attempt, and
    the error the user sees is the workers' one line."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dynamix_core.errors import StopRun
    from pipelines.train.failures import fit

    attempts = tmp_path / "attempts"

    def loop(config):
        with open(config["attempts"], "a") as fh:
            fh.write("x")
        raise StopRun("single-camera stream: 3 full passes over this rank's 8 videos did not fill a batch; "
                      "lower sampler.num_videos")

    trainer = TorchTrainer(loop, train_loop_config={"attempts": str(attempts)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="det", storage_path=str(tmp_path / "runs"),
                                                failure_config=FailureConfig(max_failures=2)))
    with pytest.raises(StopRun) as stopped:
        fit(trainer)
    assert str(stopped.value) == ("single-camera stream: 3 full passes over this rank's 8 videos did not fill a "
                                  "batch; lower sampler.num_videos")
    assert attempts.read_text() == "x"  # not retried


def test_pretraining_values_out_of_range_fail_at_print_config(capsys):
    code, err = _cli(capsys, "pretrain", "--config", "pretrain_demo", "--set", "run.max_steps=-5", "--print-config")
    assert code == 2 and err == ["dynamix pretrain: error: --set run.max_steps=-5: run.max_steps: -5 must be >= 1"]
