"""What the training and pre-training jobs share around their Ray Train loop: the run folder on any
storage and the MLflow run of the job.

A run folder is ``STORAGE/NAME``, a local folder or an object-store URI (``s3://bucket/prefix/NAME``,
:mod:`dynamix_core.storage`). Its files are written whole and atomically (a temporary file renamed,
or one object upload). What must be a local file (MLflow's spools and the default sqlite store) lives
in the run's *local folder*: the run folder itself for a local run, a per-run cache folder for a run
on an object store (:func:`pipelines.runs.files.local_run_dir`).

MLflow: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the *embedded* store: sqlite in the
run's local folder, with the run's artifacts (the registered model included) in ``RUN/mlartifacts``
of the run folder itself, on whatever storage it is, never in the process's working directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dynamix_core import storage
from pipelines.runs.files import local_run_dir, write_atomic

log = logging.getLogger("dynamix.job")

#: the folder of a run that holds the artifacts of its embedded MLflow store
ARTIFACTS_DIR = "mlartifacts"


@dataclass(frozen=True)
class RunFolder:
    """``dir``: the run folder (a local ``Path`` or a URI string) under ``root`` (``run.storage``,
    absolute); ``local``: its local folder."""

    root: Path | str
    dir: Path | str
    local: Path

    @classmethod
    def create(cls, run_storage: str, name: str) -> "RunFolder":
        """``run_storage/name``, made (a missing bucket or refused credentials fail here, in one line)."""
        if storage.is_remote(run_storage):
            root: Path | str = run_storage.rstrip("/")
            run_dir: Path | str = storage.join(root, name)
        else:
            root = Path(storage.local_path(run_storage)).resolve()
            run_dir = root / name
        storage.makedirs(run_dir)
        return cls(root, run_dir, local_run_dir(run_dir))

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.dir)

    def path(self, name: str) -> Path | str:
        return storage.join(self.dir, name)

    def write(self, name: str, data: str | bytes, *, local_copy: bool = False) -> Path | str:
        """Write ``name`` whole and atomically; with ``local_copy`` a run on an object store also keeps
        it in its local folder (a file MLflow uploads later). Returns the local file when there is
        one, else the object's URI."""
        target = self.path(name)
        storage.write_bytes_atomic(target, data)
        if not self.remote:
            return target
        if local_copy:
            local = self.local / name
            write_atomic(local, data)
            return local
        return target

    def upload(self, local_file: Path, name: str | None = None) -> None:
        """Copy a file of the local folder into a run folder on an object store (a local run: nothing)."""
        if self.remote:
            storage.upload_file(local_file, self.path(name or local_file.name))


def tracking_target(run: RunFolder, uri: str | None) -> tuple[str, str | None]:
    """``(tracking URI, artifact location)`` of a job: ``uri``, else ``$MLFLOW_TRACKING_URI`` (the
    server decides where artifacts go: None), else the embedded store of ``run``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    db = run.local / "mlflow.db"
    if not db.exists():
        write_atomic(db, _migrated_template().read_bytes())  # a few hundred kB
    return f"sqlite:///{db}", str(run.path(ARTIFACTS_DIR))


def _migrated_template() -> Path:
    """An empty MLflow sqlite store at the installed MLflow's schema revision, made once per MLflow
    version in the local cache. Migrating a fresh store runs MLflow's whole migration chain (about
    6 s); a new run's embedded store is a copy of this one instead."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    template = storage.cache_dir("mlflow") / f"empty-{mlflow.__version__}.db"
    if not template.is_file():
        with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
            fresh = Path(tmp) / "mlflow.db"
            MlflowClient(f"sqlite:///{fresh}").search_experiments()  # MLflow creates and migrates it
            os.replace(fresh, template)  # whole or not at all, whoever finishes first
    return template


def open_tracker(run: RunFolder, tracking, run_name: str, spool: str = "spool_driver"):
    """The job's :class:`~pipelines.tracking.ResilientTracker` (``tracking``: a ``TrackingSection``);
    returns ``(tracker, tracking_uri)``."""
    from pipelines.tracking import ResilientTracker

    uri, artifacts = tracking_target(run, tracking.uri)
    if artifacts is not None and run.remote:
        log.warning("%s is on an object store, where MLflow's sqlite store cannot live: the run's MLflow records go "
                    "to %s and its artifacts to %s (set tracking.uri or MLFLOW_TRACKING_URI to a tracking server "
                    "to keep the records elsewhere)", run.dir, run.local / "mlflow.db", artifacts)
    tracker = ResilientTracker(uri, tracking.experiment, run_name, str(run.local / spool), artifact_location=artifacts)
    return tracker, uri


@dataclass(frozen=True)
class WorkerJob:
    """What a driver hands every Ray Train worker (``train_loop_config={"job": WorkerJob(...)}``): the
    typed config and where the run lives. Workers read fields, never dict keys with fallbacks."""

    cfg: object  # a TrainConfig or PretrainConfig
    run_dir: str  # a folder or a URI (s3://...)
    local_dir: str  # the driver's local folder of the run (MLflow spools)
    tracking_uri: str
    mlflow_run_id: str | None
    index_path: str | None = None  # the run's single-camera index
    num_single_identities: int = 0  # single-camera identities in the centroid bank
    store_name: str | None = None  # the label store actor (relabelling recipes)
    coordinator_name: str | None = None  # the labelling pool's coordinator actor
    videos_per_rank: tuple[int, ...] = ()  # pre-training: videos of each rank
