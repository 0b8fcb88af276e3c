"""Shared test setup: CPU-only, quiet, deterministic, and safe for Ray/MLflow on a 2-core box."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray instance for the whole session (``ray.init`` costs ~4 s and ~1.2 GB).

    Four logical CPUs on the 2-core box: TorchTrainer workers and Ray Data read tasks otherwise
    deadlock waiting for each other (../shared/STACK.md)."""
    ray = pytest.importorskip("ray")
    temp_dir = Path("/tmp") / f"ray_dx_{os.getpid()}"  # short path: Ray's unix sockets cap at 107 bytes
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _isolate_mlflow_env():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into the process environment; without
    this, one test's store would become the next test's default tracking URI."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
