"""A cluster in a box, started the way a user starts one: ``ray start --head`` and ``ray start
--address`` for more nodes, each a process group of its own with a private temporary folder, torn down
by killing that process group (never ``ray stop``, which would stop every Ray instance on the
machine); a real ``mlflow server`` process. Every process binds loopback ports only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class Process:
    """A started service: its process (the leader of its own process group) and its log file."""

    proc: subprocess.Popen
    log_path: Path
    _log: object = field(repr=False, default=None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_all([self])


def stop_all(processes: list[Process], grace_s: float = 10.0) -> None:
    """SIGTERM to every process group at once, up to ``grace_s`` for them to exit, then SIGKILL to
    what is left of each group (a node's raylet, GCS and workers are in its group): a test's
    teardown never waits on one service after another."""
    for p in processes:
        try:
            os.killpg(p.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
        except ProcessLookupError:
            pass
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if p._log is not None:
            p._log.close()


def _spawn(cmd: list[str], env: dict, log_path: Path, cwd: Path | None = None) -> Process:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    return Process(proc, log_path, log)


def _node_ports() -> list[str]:
    """Ports of a node's agents and managers: every node on this machine needs its own (two nodes
    on Ray's defaults would collide, and so would another Ray instance of the test session)."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]


def start_head(temp_dir: Path, env: dict, cwd: Path, num_cpus: int, log_path: Path) -> tuple[Process, str, str]:
    """``ray start --head --block`` on loopback; returns (process, GCS address, dashboard URL) once
    the dashboard answers (the job agent may need longer: see :func:`wait_until_runs_a_job`)."""
    gcs, dash = free_port(), free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", *_node_ports()]
    head = _spawn(cmd, env, log_path, cwd)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 600
    while True:
        assert head.alive(), head.log_tail()
        try:
            JobSubmissionClient(address).list_jobs()
            return head, f"127.0.0.1:{gcs}", address
        except Exception:
            if time.monotonic() > deadline:
                head.stop()
                raise
            time.sleep(1)


def start_worker_node(gcs: str, temp_dir: Path, env: dict, cwd: Path, num_cpus: int, log_path: Path) -> Process:
    """``ray start --address GCS --block``: a second node of the cluster, in its own process group."""
    cmd = [str(VENV_BIN / "ray"), "start", f"--address={gcs}", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats", *_node_ports()]
    return _spawn(cmd, env, log_path, cwd)


def wait_for_nodes(gcs: str, count: int, env: dict, timeout: float = 300, node: Process | None = None) -> bool:
    """Until ``count`` nodes are alive in the cluster (asked through the GCS by ``ray list nodes``-like
    code in a separate process, so this test process never joins the cluster); False as soon as
    ``node`` (the node being waited for) has exited: ``ray start`` gives up when its raylet does
    not register within 30 s, which a loaded machine can miss."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    while True:
        if node is not None and not node.alive():
            return False
        out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return True
        assert time.monotonic() < deadline, f"{count} nodes not alive after {timeout} s: {out.stdout[-500:]}{out.stderr[-1500:]}"
        time.sleep(2)


def wait_until_runs_a_job(address: str, timeout: float = 300) -> bool:
    """Whether a trivial job runs to SUCCEEDED within ``timeout``: the raylet and the job agent are
    up, not only the dashboard (on a loaded box the raylet can abort while waiting for the dashboard
    agent). A submission the job agent refuses because it is still starting is tried again."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address)
            if job is None:
                job = client.submit_job(entrypoint="true")
            status = client.get_job_status(job)
            if status.is_terminal():
                return status == JobStatus.SUCCEEDED
        except Exception:  # noqa: BLE001 - the job agent is not up yet: ask again
            pass
        time.sleep(1)
    return False


def start_mlflow_server(workdir: Path, env: dict, artifacts_destination: str) -> tuple[Process, str]:
    """``mlflow server`` (sqlite backend in ``workdir``, artifacts proxied to ``artifacts_destination``);
    returns (process, tracking URI) once it answers."""
    import urllib.request

    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination]
    server = _spawn(cmd, env, workdir / "mlflow-server.log", workdir)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert server.alive(), server.log_tail()
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                if resp.status == 200:
                    return server, uri
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"mlflow server did not answer: {server.log_tail()}")
        time.sleep(1)


def wait_for_job(client, job_id: str, timeout: float) -> str:
    """The terminal status of ``job_id`` (as a plain string), or a failed assertion with its logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still running after {timeout} s; its log ends:\n{logs[-4000:]}")
