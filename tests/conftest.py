"""Shared test setup: CPU-only, quiet, deterministic, and safe for Ray/MLflow on a 2-core box."""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
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


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray instance for the whole session (``ray.init`` costs ~4 s and ~1.2 GB).

    Four logical CPUs on the 2-core box: TorchTrainer workers and Ray Data read tasks otherwise
    deadlock waiting for each other (docs/stack.md)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        init_local_ray()
    yield ray
    ray.shutdown()


def init_local_ray(env_vars: dict[str, str] | None = None) -> None:
    """``ray.init`` as :func:`ray_local` does it; ``env_vars`` go into the environment of every Ray
    worker and actor (Ray's processes otherwise keep the environment of the moment Ray started)."""
    import ray

    temp_dir = Path("/tmp") / f"ray_dx_{os.getpid()}"  # short path: Ray's unix sockets cap at 107 bytes
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": env_vars} if env_vars else None)


#: fixtures that start Ray (or a cluster): a test using one is in the ``ray`` tier
RAY_FIXTURES = {"ray_local", "box", "train_job"}


_RAY_FILE = re.compile(rf"\b({'|'.join(sorted(RAY_FIXTURES))})\b|pytest\.mark\.ray\b")


@functools.lru_cache(maxsize=None)
def starts_ray(path: str) -> bool:
    """Whether the test file at ``path`` (relative to the repository) holds a test of the ``ray``
    tier: it names a Ray fixture or the marker. Decided from the file's text, so that xdist's
    controller, which collects nothing, can schedule by it."""
    try:
        return bool(_RAY_FILE.search((REPO_ROOT / path).read_text()))
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests that use a Ray fixture carry the ``ray`` marker, so ``make test-fast`` (-m "not ray and
    not slow") leaves them out without each file having to say so. A file holding a ``ray`` test
    must be recognised by :func:`starts_ray` (the scheduler below keeps such files in one worker)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray") is not None and not starts_ray(item.nodeid.split("::")[0]):
            raise pytest.UsageError(f"{item.nodeid} is in the ray tier but its file names neither a Ray fixture "
                                    f"nor pytest.mark.ray: add `pytestmark = pytest.mark.ray` to it")


try:  # `make test` runs `-n 2`: the Ray tier in one worker, on one Ray instance, beside the Ray-free tests
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pragma: no cover - xdist is in requirements.lock
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class RayTierScheduling(LoadScopeScheduling):
        """Every test of a file that starts Ray is in one unit of work: one worker runs them in order,
        on one Ray instance, and the cluster box never starts its nodes beside another Ray training
        run of the suite (run beside the Ray tier, on a box loaded by a `make demo`, the box's worker
        node missed Ray's fixed 30 s raylet registration three times in a row). Every other test is
        a unit of its own. (xdist's own ``--dist loadgroup`` does not group under pytest 9.2: it
        renames ``item._nodeid``, which pytest 9.2 no longer reads.)"""

        def _split_scope(self, nodeid: str) -> str:
            return "ray-tier" if starts_ray(nodeid.split("::")[0]) else nodeid

    def pytest_xdist_make_scheduler(config, log):
        return RayTierScheduling(config, log)


@pytest.fixture(autouse=True)
def _ray_tests_are_marked(request):
    """A test that starts Ray in this process without the ``ray`` marker fails: the fast tier would
    otherwise pay for a Ray instance (seconds and a GB) it does not know about."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized() and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} started Ray: mark it (pytestmark = pytest.mark.ray) or use the ray_local fixture")


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


#: a SynthReID small enough for Ray pipeline tests (32x16 images, 2 multi-camera sets, a few videos)
TINY_SYNTH = ["height=32", "width=16", "num_multi_sets=2", "multi_train_ids=12", "multi_test_ids=6",
              "min_people_per_video=3", "max_people_per_video=4", "video_frames=24",
              "target_ids=8", "distractors_per_set=2", "junk_per_set=1"]


def make_tiny_reid(root: Path, num_videos: int, extra: tuple[str, ...] = ()) -> Path:
    """Generate the tiny SynthReID (plus ``extra`` generator overrides) under ``root/data`` and ingest
    each set (no Ray) into ``root/shards/<name>`` under its own dataset name; returns ``root``."""
    from dynamix_core.config import load_config
    from dynamix_core.data.synth import SynthConfig, generate
    from pipelines.ingest import IngestConfig, run_ingest

    generate(load_config(SynthConfig, None, TINY_SYNTH + [f"num_videos={num_videos}", *extra]), root / "data", progress=False)
    sets = {"synth_m0": "multi", "synth_m1": "multi", "synth_video": "single", "synth_target": "target"}
    for name, kind in sets.items():
        run_ingest(IngestConfig(root=root / "data" / kind / name, out=root / "shards" / name, dataset=name, workers=0),
                   progress=False)
    return root


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API on loopback for the whole session: moto's server, as the s3fs and Ray test
    suites use (docs/stack.md); its endpoint URL. Started and stopped here, never another address."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


#: the variables that would point a test's S3 client somewhere else
_AWS_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE")


def s3_test_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables pointing at the loopback S3 ``endpoint`` (dummy credentials)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(params=["local", "s3"])
def label_root(request, tmp_path) -> str:
    """A label store folder: local, or a prefix in a bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/run/labels"


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A new empty bucket on the loopback S3 with the standard AWS variables pointing at it (dummy
    credentials; restored after the test); returns its URI, ``s3://<bucket>``."""
    import uuid

    import pyarrow.fs as pafs

    for name in _AWS_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_test_env(s3_server).items():
        monkeypatch.setenv(name, value)
    bucket = f"dynamix-test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"


#: the Google Cloud Storage emulator, run as its own process: in pyarrow 25 a GCS input file opens its
#: HTTP stream while holding the GIL, so an emulator thread in the test process could never answer.
#: Its HTTP server is made multi-threaded: a ranged read arrives while an earlier GET is still open.
_GCS_EMULATOR = r"""
import sys
from functools import partial
from http.server import ThreadingHTTPServer

import gcp_storage_emulator.server as emulator


def run(self):
    self._httpd = ThreadingHTTPServer((self._host, self._port), partial(emulator.RequestHandler, self._storage))
    self._httpd.daemon_threads = True
    self.is_running.set()
    self._httpd.serve_forever()


emulator.APIThread.run = run
emulator.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


@pytest.fixture(scope="session")
def gcs_server():
    """A Google Cloud Storage JSON API on loopback for the whole session (gcp-storage-emulator, in its
    own process); its endpoint URL. Started and stopped here, never another address."""
    import subprocess
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _GCS_EMULATOR, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch) -> str:
    """A new empty bucket on the loopback GCS with ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` pointing at it
    (restored after the test); returns its URI, ``gs://<bucket>``."""
    import datetime
    import uuid

    import pyarrow.fs as pafs

    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs_server)
    bucket = f"dynamix-test-{uuid.uuid4().hex[:12]}"
    pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=gcs_server.removeprefix("http://"),
                       project_id="dynamix-test", retry_time_limit=datetime.timedelta(seconds=5)).create_dir(bucket)
    return f"gs://{bucket}"


def live_actor_pids(class_name: str) -> list[int]:
    """PIDs of the live actors of ``class_name`` (e.g. ``RayTrainWorker``) in the Ray instance this
    session is connected to, from the GCS actor table: never another session's Ray workers on a
    shared machine (a process search by command line would kill those too)."""
    from ray._private import state

    return [int(a["Pid"]) for a in state.actors().values()
            if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE" and a["Pid"]]
