"""Job submission to a Ray cluster (a KubeRay RayCluster, or any Ray head) over the dashboard's REST API.

    job_id = submit_job("http://head:8265", ["train", "--config", "recipes/dynamix.yaml"],
                        JobRuntime(working_dir=".", env_vars={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}),
                        commands=COMMANDS)  # the CLI's subcommand names (pipelines.cli.COMMANDS)
    job_status("http://head:8265", job_id)  ->  JobReport(status="RUNNING", ...)

The entrypoint is always ``dynamix <subcommand> ...``: the cluster runs the same command line a user
runs locally. Ray's token auth (on by default in Ray 2.60) is honoured through ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` in the submitting environment, which Ray's client reads itself.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

#: never uploaded with a working_dir (virtual env, generated data and runs, VCS)
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "data/", "bench_results/", ".cache/", "**/__pycache__/",
                        ".pytest_cache/", "deploy/manifests/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """A job could not be submitted or queried (unreachable head, unknown id, bad runtime env)."""


@dataclass(kw_only=True)
class JobRuntime:
    """Ray runtime environment of a submitted job."""

    working_dir: str | None = None  # uploaded to the cluster (minus WORKING_DIR_EXCLUDES)
    image_uri: str | None = None  # run the job's worker processes in this container image
    env_vars: dict[str, str] = field(default_factory=dict)
    requirements: str | None = None  # a pinned requirements file installed into the job's env
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0

    def to_runtime_env(self) -> dict:
        env: dict = {}
        if self.working_dir:
            wd = Path(self.working_dir)
            if not wd.is_dir():
                raise JobError(f"--working-dir {wd} is not a directory")
            env["working_dir"] = str(wd.resolve())
            env["excludes"] = list(WORKING_DIR_EXCLUDES)
        if self.image_uri:
            if ":" not in self.image_uri.rsplit("/", 1)[-1] or self.image_uri.endswith(":latest"):
                raise JobError(f"--image {self.image_uri}: pin a version tag (not latest)")
            env["image_uri"] = self.image_uri
        if self.requirements:
            req = Path(self.requirements)
            if not req.is_file():
                raise JobError(f"--requirements {req} does not exist")
            lines = [ln.split("#", 1)[0].strip() for ln in req.read_text().splitlines()]
            pins = [ln for ln in lines if ln]
            unpinned = [p for p in pins if "==" not in p]
            if unpinned:
                raise JobError(f"--requirements {req}: pin every package with ==; unpinned: {unpinned}")
            env["pip"] = {"packages": pins}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


@dataclass
class JobReport:
    job_id: str
    status: str
    message: str | None
    entrypoint: str
    start_time: float | None
    end_time: float | None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or Ray's own wrapper around it
        raise JobError(f"cannot reach the Ray dashboard at {address}: {exc}. "
                       "Check the address (http://HEAD:8265) and that the cluster is up.") from None


def build_entrypoint(dynamix_args: list[str], commands: Collection[str]) -> str:
    """``dynamix <args>`` with every argument shell-quoted; ``commands`` = the valid subcommand names
    (the caller's CLI knows them: services never import pipelines)."""
    if not dynamix_args or dynamix_args[0] not in commands:
        raise JobError(f"entrypoint must start with a dynamix subcommand {sorted(commands)}, got {dynamix_args[:1]}")
    return "dynamix " + " ".join(shlex.quote(a) for a in dynamix_args)


def submit_job(address: str, dynamix_args: list[str], runtime: JobRuntime, *, commands: Collection[str],
               submission_id: str | None = None, metadata: dict[str, str] | None = None,
               agent_wait_s: float = 120.0) -> str:
    """Submit ``dynamix <dynamix_args>``; returns the job id. Waits up to ``agent_wait_s`` for the
    cluster's job agent when the head is up but its agent is not yet."""
    client = _client(address)
    kwargs = {}
    if runtime.entrypoint_num_cpus:
        kwargs["entrypoint_num_cpus"] = runtime.entrypoint_num_cpus
    if runtime.entrypoint_num_gpus:
        kwargs["entrypoint_num_gpus"] = runtime.entrypoint_num_gpus
    entrypoint, runtime_env = build_entrypoint(dynamix_args, commands), runtime.to_runtime_env()
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                     metadata=metadata or {}, **kwargs)
        except Exception as exc:
            # a freshly started head answers before its job agent is up: that one is worth waiting for
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise JobError(f"submission to {address} failed: {exc}") from None


def job_status(address: str, job_id: str) -> JobReport:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise JobError(f"job {job_id!r} on {address}: {exc}") from None
    return JobReport(job_id=job_id, status=str(info.status.value if hasattr(info.status, "value") else info.status),
                     message=info.message, entrypoint=info.entrypoint,
                     start_time=info.start_time / 1000 if info.start_time else None,
                     end_time=info.end_time / 1000 if info.end_time else None)


def job_logs(address: str, job_id: str) -> str:
    try:
        return _client(address).get_job_logs(job_id)
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"logs of job {job_id!r} on {address}: {exc}") from None


def follow_logs(address: str, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """Yield the job's log text as it is written, until the job ends.

    Streams over the dashboard's log-tail websocket, so each new line is sent once (the whole log is
    never fetched again). Where websockets do not get through (some proxies), it falls back to polling
    the full log every ``poll_s`` seconds and yielding only the part not yet seen."""
    client = _client(address)
    streamed = False
    try:
        for chunk in _tail(client, job_id):
            streamed = True
            yield chunk
        return
    except Exception:  # noqa: BLE001 - the websocket is unavailable: poll instead
        if streamed:
            raise
    yield from _poll_logs(address, job_id, poll_s)


def _tail(client, job_id: str) -> Iterator[str]:
    """``client.tail_job_logs`` (an async iterator over the websocket) as a plain iterator."""
    import asyncio

    loop = asyncio.new_event_loop()
    chunks = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def _poll_logs(address: str, job_id: str, poll_s: float) -> Iterator[str]:
    seen = 0
    while True:
        text = job_logs(address, job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if job_status(address, job_id).status in TERMINAL:
            text = job_logs(address, job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(poll_s)


def stop_job(address: str, job_id: str) -> bool:
    try:
        return bool(_client(address).stop_job(job_id))
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"stopping job {job_id!r} on {address}: {exc}") from None


def wait_for_job(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> JobReport:
    deadline = time.monotonic() + timeout_s
    while True:
        report = job_status(address, job_id)
        if report.status in TERMINAL:
            return report
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {report.status} after {timeout_s:.0f}s")
        time.sleep(poll_s)
