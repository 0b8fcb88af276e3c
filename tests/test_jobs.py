"""Job submission against a real Ray head started on loopback (`ray start --head`)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_box import wait_until_runs_a_job
from conftest import REPO_ROOT

pytestmark = pytest.mark.ray
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(env: dict, temp_dir: str):
    """``ray start --head --block`` on loopback ports of its own; returns (process, dashboard URL, log)
    once the dashboard answers."""
    gcs, dash = _free_port(), _free_port()
    # the session's other Ray instance holds Ray's default agent ports: give this head its own
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                   f"--ray-client-server-port={_free_port()}"]
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_ports]
    # --block + a new session: teardown kills exactly this head's processes (`ray stop` would kill
    # every Ray instance on the machine, including the test session's own).
    log = open(f"{temp_dir}.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 600
    while True:  # the dashboard and its job agent come up a little after the head
        assert head.poll() is None, Path(f"{temp_dir}.log").read_text()[-3000:]
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    return head, address, log


def _stop_head(head: subprocess.Popen, log) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def ray_head():
    if shutil.which("ray", path=str(VENV_BIN)) is None:
        pytest.skip("ray CLI not installed in this environment")
    temp_dir = f"/tmp/ray_jobs_{os.getpid()}"
    # a loaded 2-core box (another Ray instance of the session alive) can need > the default 60 s
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600"}
    for attempt in range(3):  # a head whose raylet died during startup is started again
        head, address, log = _start_head(env, temp_dir)
        if wait_until_runs_a_job(address):
            break
        _stop_head(head, log)
    else:
        pytest.fail(f"three Ray heads in a row could not run a job; the last one's log:\n"
                    f"{Path(f'{temp_dir}.log').read_text()[-3000:]}")
    yield address, env
    _stop_head(head, log)


def dynamix(args, env, timeout=300):
    return subprocess.run([str(VENV_BIN / "dynamix"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def test_submit_wait_status_logs(ray_head, tmp_path):
    address, env = ray_head
    out = dynamix(["submit", "--address", address, "--working-dir", str(REPO_ROOT), "--env", "DX_MARK=hello-job",
                   "--wait", "--", "status", "--help"], env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    assert "the id printed by dynamix submit" in out.stdout  # the job's own output, streamed back
    st = dynamix(["status", "--address", address, job_id], env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "dynamix status --help" in st.stdout
    logs = dynamix(["logs", "--address", address, job_id], env)
    assert "show the status of a submitted job" in logs.stdout.lower()


def test_failing_job_reports_failed(ray_head):
    address, env = ray_head
    out = dynamix(["submit", "--address", address, "--wait", "--", "status", "--address", "http://127.0.0.1:9", "nojob"], env)
    assert out.returncode == 1
    assert "FAILED" in out.stderr


def test_stop_a_running_job(ray_head):
    address, env = ray_head
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 120
    while True:  # the job agent may still be starting (see services.jobs.submit_job)
        try:
            job_id = client.submit_job(
                entrypoint=f"{sys.executable} -c 'import time; print(\"started\", flush=True); time.sleep(600)'")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 60
    while "started" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, client.get_job_info(job_id)
        time.sleep(0.5)
    out = dynamix(["stop", "--address", address, job_id], env)
    assert out.returncode == 0 and "stop requested" in out.stdout
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id)) not in ("STOPPED", "JobStatus.STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_bad_input_is_a_clear_error(ray_head, tmp_path):
    address, env = ray_head
    unpinned = tmp_path / "req.txt"
    unpinned.write_text("numpy\n")
    out = dynamix(["submit", "--address", address, "--requirements", str(unpinned), "--", "status", "x"], env)
    assert out.returncode == 2 and "pin every package" in out.stderr
    out = dynamix(["submit", "--address", address, "--", "rm", "-rf", "/"], env)
    assert out.returncode == 2 and "dynamix subcommand" in out.stderr
    out = dynamix(["status", "--address", "http://127.0.0.1:9", "raysubmit_x"], env)
    assert out.returncode == 2 and "127.0.0.1:9" in out.stderr


def test_follow_streams_only_new_output(ray_head, monkeypatch):
    """`dynamix logs --follow` reads the log-tail stream: while following, the full log is never
    fetched again (job_logs is made to fail), and every line arrives once, in order."""
    import services.jobs as jobs

    address, _ = ray_head
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    script = "import time\nfor i in range(4):\n    print(f'line-{i}', flush=True); time.sleep(0.5)"
    deadline = time.monotonic() + 120
    while True:  # the job agent may still be starting (see services.jobs.submit_job)
        try:
            job_id = client.submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(script)}")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)

    def no_full_fetch(*_):
        raise AssertionError("follow fetched the whole log again")

    monkeypatch.setattr(jobs, "job_logs", no_full_fetch)
    text = "".join(jobs.follow_logs(address, job_id))
    assert [ln for ln in text.splitlines() if ln.startswith("line-")] == [f"line-{i}" for i in range(4)]
