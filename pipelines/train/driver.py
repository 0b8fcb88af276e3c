"""The training job: local Ray (or ``--address``), label store + labeling pool, per-rank
seekable video streams, a ``TorchTrainer``, MLflow tracking, the final weights and evaluation.

Re-running the same command (same run name and storage) resumes: Ray Train restores the newest
checkpoint under ``STORAGE/NAME``, the label store recovers its newest version from
``STORAGE/NAME/labels``, and the MLflow run with the same ``dynamix.run_name`` tag is continued.

``run.storage`` may be an object-store URI (``s3://bucket/prefix``, :mod:`dynamix_core.storage`):
every file of the run is then an object under ``STORAGE/NAME`` (config, metric history, starts,
result, exported weights, label store, checkpoints: Ray Train writes and reads them through the
same pyarrow file system, endpoint included). What must be a local file stays in the run's local
folder (:func:`~pipelines.runs.files.local_run_dir`): MLflow's spools, the default sqlite
tracking store, and the copy of the exported weights that is logged and registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from dynamix_core import storage
from dynamix_core.config import dump_yaml
from dynamix_core.engine import load_tensors
from pipelines.checkpoints import repair_checkpoints
from pipelines.ray_cluster import require_resources, training_demands
from pipelines.runs.files import local_run_dir, read_history_file, write_atomic
from pipelines.runs.folder import RunFolder, WorkerJob, open_tracker
from pipelines.train.config import TrainConfig
from pipelines.train.failures import fit

log = logging.getLogger("dynamix.train")


#: the deployable encoder a finished run exports into its folder
WEIGHTS_FILE = "momentum_encoder.safetensors"
#: the settings a run logged as MLflow params (flattened), kept in its folder
PARAMS_FILE = "params.json"


@dataclass
class TrainResult:
    run_dir: Path | str  # a local folder, or the run's URI (s3://bucket/runs/NAME) on an object store
    metrics: dict
    history: list[dict]
    weights_path: Path | None  # a local file: for a run on an object store, the local copy of its WEIGHTS_FILE
    mlflow_run_id: str | None
    labeling: dict = field(default_factory=dict)
    registered: str | None = None  # what tracking.registered_model registration did (one line)
    tracking_uri: str | None = None  # where the run's MLflow records (and registrations) went


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the job's cluster (``address``, else ``RAY_ADDRESS``) or start a local instance
    (:func:`pipelines.ray_cluster.connect`)."""
    from pipelines.ray_cluster import connect

    connect(address, local_cpus=num_cpus)


def silent(*_args, **_kwargs) -> None:
    pass


def _multi_train_size(roots: list[str]) -> int:
    import pyarrow.compute as pc

    from dynamix_core.data.reader import read_dataset_manifest

    return sum(read_dataset_manifest(r).filter(pc.equal(pc.field("split"), "train")).num_rows for r in roots)


def labeling_job(cfg: TrainConfig, run_dir: Path | str, index_path: str, quota: int):
    """The labelling service's typed settings for this run (its config's labeling section, model and
    test view, and where the run's labels and index are)."""
    from services.labeling_pool import LabelingJob

    lab = cfg.labeling
    return LabelingJob(
        mode=cfg.method, run_name=cfg.run.name, label_root=storage.join(run_dir, "labels"), index_path=str(index_path),
        total_steps=cfg.run.max_steps, seed=cfg.run.seed, quota=quota, use_gpu=cfg.scaling.use_gpu,
        pool_size=lab.pool_size, cpus_per_actor=lab.cpus_per_actor, queue_size=lab.queue_size,
        max_chunk_retries=lab.max_chunk_retries, max_staleness=lab.max_staleness,
        embed_batch_size=lab.embed_batch_size, chunk_videos=lab.chunk_videos, commit_videos=lab.commit_videos,
        keep_versions=lab.keep_versions, snapshot_every=lab.snapshot_every, model=cfg.model,
        transform=cfg.data.transform, relabel=lab.relabel, cluster=lab.cluster, deterministic=lab.deterministic,
        world_size=cfg.scaling.num_workers)


def _initial_momentum_state(cfg: TrainConfig) -> dict:
    import torch

    from dynamix_core.model import build_encoder

    torch.manual_seed(cfg.run.seed)
    return build_encoder(cfg.model).state_dict()


def check_ingest(root: str, field_name: str) -> str:
    """``root`` as an absolute path (Ray workers run elsewhere), checked to be a finished ingest, so
    a typo fails in the driver with ``field_name`` and the path named instead of inside every worker."""
    from dynamix_core.data.reader import check_dataset_manifest
    from dynamix_core.data.records import BadInputError

    path = root if "://" in root else str(Path(root).resolve())  # a URI (s3://...) is checked as it is
    try:
        check_dataset_manifest(path)  # its footer: O(1) in the set's size
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{field_name}: {exc}") from None
    except BadInputError as exc:
        raise BadInputError(f"{field_name}: {exc}") from None
    return path


def check_file(path: str, field_name: str) -> str:
    """``path`` (a local file or a storage URI) checked to exist, local paths made absolute (Ray
    workers run in other folders and on other nodes)."""
    if not storage.exists(path):
        raise FileNotFoundError(f"{field_name}: {path} does not exist")
    return _absolute(path)


def _absolute(path: str) -> str:
    """A storage URI as it is, a local path made absolute."""
    return path if storage.is_remote(path) else str(Path(path).resolve())


def resolve_model(model):
    """``model`` with its ``weights`` (when set) checked by :func:`check_file`."""
    import dataclasses

    if model.weights is None:
        return model
    return dataclasses.replace(model, weights=check_file(str(model.weights), "model.weights"))


def _monitor_available(path: str) -> bool:
    """Whether the ground-truth file ``path`` (a monitor of pseudo-label quality, not an input of
    training) exists; a missing one is dropped with one warning rather than stopping the job (a recipe
    written for a laptop names a local file that a cluster node does not have)."""
    if storage.exists(path):
        return True
    log.warning("labeling.ground_truth: %s does not exist here; pseudo-label quality will not be measured "
                "against it (put the file on the shared storage and give its URI)", path)
    return False


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute data paths, each checked to be a finished ingest (:func:`check_ingest`), and the
    initial weights checked to exist."""
    import dataclasses

    data = dataclasses.replace(
        cfg.data,
        multi=[check_ingest(r, "data.multi") for r in cfg.data.multi],
        single=[check_ingest(r, "data.single") for r in cfg.data.single],
        target=check_ingest(cfg.data.target, "data.target") if cfg.data.target else None,
    )
    truth = [_absolute(p) for p in cfg.labeling.ground_truth if _monitor_available(p)]
    return dataclasses.replace(cfg, data=data, model=resolve_model(cfg.model),
                               labeling=dataclasses.replace(cfg.labeling, ground_truth=truth))


def _settings(cfg) -> dict[str, str]:
    """``cfg`` flattened as MLflow params, by the same YAML round trip as the saved ``config.yaml``."""
    import yaml

    from pipelines.tracking import flatten_params

    return flatten_params(yaml.safe_load(dump_yaml(cfg)))


def _saved_settings(config_file: Path | str) -> dict[str, str] | None:
    """The settings of a saved ``config.yaml`` (a file or an object), flattened; None when there is none."""
    import yaml

    from pipelines.tracking import flatten_params

    if not storage.exists(config_file):
        return None
    return flatten_params(yaml.safe_load(storage.read_bytes(config_file).decode()) or {})


def changed_settings(previous_config: Path | str, cfg) -> dict[str, tuple[str, str]]:
    """``{dotted key: (previous, now)}`` for the settings that differ from the run folder's
    ``config.yaml`` (a file or an object; a re-run of the same run with, e.g., a larger
    ``run.max_steps``); empty for a new run."""
    before = _saved_settings(previous_config) or {}
    return {k: (before[k], v) for k, v in _settings(cfg).items() if k in before and before[k] != v}


def mlflow_settings(run: RunFolder, cfg) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, str]]]:
    """``(params, tags, changed)`` of this attempt of a run. MLflow params cannot change once logged,
    so the run folder keeps what was logged (``params.json``: the first attempt's settings, and keys
    added since) and an attempt logs only params equal to those or new; a setting that differs
    becomes the tag ``dynamix.resumed_with.KEY``. ``changed``: the settings that differ from the
    previous attempt's ``config.yaml`` (what the console tells). Writes ``params.json`` when it adds
    keys: an attempt interrupted after this never makes the next one log a conflicting value."""
    now = _settings(cfg)
    changed = changed_settings(run.path("config.yaml"), cfg)
    logged_path = run.path(PARAMS_FILE)
    if storage.exists(logged_path):
        logged = json.loads(storage.read_bytes(logged_path))
    else:  # a new run, or one begun before params.json: its config.yaml holds what it logged
        logged = _saved_settings(run.path("config.yaml")) or {}
    params = {k: v for k, v in now.items() if logged.get(k, v) == v}
    tags = {f"dynamix.resumed_with.{k}": v for k, v in now.items()
            if (k in logged and logged[k] != v) or k in changed}
    if set(now) - set(logged) or not storage.exists(logged_path):
        run.write(PARAMS_FILE, json.dumps({**logged, **params}, indent=0, sort_keys=True))
    return params, tags, changed


def run_training(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train ``cfg`` in its run folder, holding the folder's lease (:class:`pipelines.runs.lease.RunLease`)
    for the whole run: a second run on the same folder refuses before writing anything."""
    from pipelines.runs.lease import RunLease

    from dynamix_core.model import check_backbone

    check_backbone(cfg.model.backbone, cfg.model.img_size, cfg.model.ibn)  # before the data and the cluster
    cfg = resolve_paths(cfg)
    run = RunFolder.create(cfg.run.storage, cfg.run.name)
    with RunLease(run.dir):
        return _run_training(cfg, run, progress)


def _run_training(cfg: TrainConfig, run: RunFolder, progress: bool) -> TrainResult:
    from pipelines.train.methods import METHODS

    method = METHODS[cfg.method]
    echo = print if progress else silent
    init_ray(cfg.scaling.address)
    require_resources(training_demands(cfg), timeout_s=cfg.scaling.resources_timeout_s, echo=echo)
    tracker, tracking_uri = _open_run_records(cfg, run, progress)
    job = WorkerJob(cfg, str(run.dir), str(run.local), tracking_uri, tracker.run_id)
    try:
        with LabelingService(cfg, run.dir, progress) if cfg.uses_labeling_pool else contextlib.nullcontext() as service:
            if service is not None:
                job = service.worker_job(job)
            repair_checkpoints(run.dir, echo=echo)  # resume from the newest intact checkpoint
            with ProgressPrinter(run.path("history.jsonl"), cfg.run.max_steps,
                                 labeling=service.new_errors if service else None) if progress \
                    else contextlib.nullcontext():
                result = fit(_trainer(cfg, method, run, job))  # a deterministic worker error: no retry
            labeling = service.stats() if service is not None else {}
            _log_labeling_outcome(tracker, labeling, cfg.run.max_steps)
    except BaseException:
        tracker.close(status="FAILED")
        raise
    return _finish(cfg, run, tracker, tracking_uri, result, labeling)


def _open_run_records(cfg: TrainConfig, run: RunFolder, progress: bool):
    """The run's MLflow run with its params (changed settings of a resumed run as tags, said on the
    console) and ``config.yaml``; resolved before the workers start, so rank 0 logs into this run
    rather than racing to create one by name (None when the server is unreachable: both then
    resolve by name once it is back, and find the same run)."""
    params, tags, changed = mlflow_settings(run, cfg)  # MLflow params are immutable: changes become tags
    config_file = run.write("config.yaml", dump_yaml(cfg), local_copy=True)  # MLflow uploads it from a local file
    tracker, tracking_uri = open_tracker(run, cfg.tracking, cfg.run.name)
    tracker.log_params(params)
    tracker.set_tags({"dynamix.method": cfg.method, **tags})
    if changed and progress:
        print(f"[train] resuming {cfg.run.name} with changed settings: "
              + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()), flush=True)
    tracker.log_artifact(str(config_file))
    tracker.flush(timeout_s=30)
    return tracker, tracking_uri


def _trainer(cfg: TrainConfig, method, run: RunFolder, job: WorkerJob):
    """The ``TorchTrainer`` of the run: the method's worker loop, the run's storage and cadences."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        method.worker_loop(),
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, **ray_storage(run.root),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )


def _finish(cfg: TrainConfig, run: RunFolder, tracker, tracking_uri: str, result, labeling: dict) -> TrainResult:
    """Export f~ of the last checkpoint, close the MLflow run, write ``result.json``, register."""
    history = list(read_history(run.dir))
    metrics = dict(result.metrics or {})
    weights_path = None
    if result.checkpoint is not None:
        weights_path = _export_momentum(result.checkpoint, run.dir, run.local)
        tracker.log_artifact(str(weights_path))
    tracker.close()
    storage.write_bytes_atomic(storage.join(run.dir, "result.json"),
                               json.dumps({"metrics": metrics, "labeling": labeling}, indent=2, default=float))
    registered = None
    if cfg.tracking.registered_model and weights_path is not None:
        from pipelines.train.registration import register_trained

        registered = register_trained(cfg, weights_path, tracking_uri, tracker.run_id, metrics)
    return TrainResult(run.dir, metrics, history, weights_path, tracker.run_id, labeling, registered, tracking_uri)


class LabelingService:
    """The run's label store and labelling pool (DynaMix, ReMix) as a context manager: entering
    writes the run's single-camera index, starts the store (version 0 from the index) and the pool,
    and for ReMix waits for the first round; every exit stops the run's labelling actors (their
    state is on disk; a re-run recreates them), so a failed run leaves no detached actor behind."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | str, progress: bool):
        from pipelines.train.methods import METHODS

        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.method = METHODS[cfg.method]
        self.coordinator, self._reported_errors = None, 0

    def __enter__(self) -> "LabelingService":
        try:
            self._start()
        except BaseException:
            stop_labeling_actors(self.cfg.run.name)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_labeling_actors(self.cfg.run.name)

    def _start(self) -> None:
        import ray

        from dynamix_core.data.run_index_writer import write_single_camera_index
        from services.label_store import get_or_create_store
        from services.labeling_pool import start_coordinator

        cfg = self.cfg
        label_root = storage.join(self.run_dir, "labels")
        self.index_path = storage.join(label_root, "index.parquet")
        storage.makedirs(label_root)
        # the run's fixed row order (read by every worker and the pool), written shard by shard: the
        # driver holds per-video figures, never the rows
        info = write_single_camera_index(cfg.data.single, self.index_path, cfg.labeling.ground_truth)
        # each rank streams its own videos (video % num_workers == rank) straight from the shards,
        # by the index: a seekable stream, so a restart resumes where its checkpoint was
        per_rank = info.videos_per_rank(cfg.scaling.num_workers)
        if (per_rank == 0).any():
            raise ValueError(f"data.single: {int(per_rank.sum())} videos cannot feed {cfg.scaling.num_workers} "
                             "workers (each needs at least one); lower scaling.num_workers")
        store = get_or_create_store(cfg.run.name, label_root, snapshot_every=cfg.labeling.snapshot_every,
                                    keep_versions=cfg.labeling.keep_versions)
        # version 0, one label per row of the index: read by the store itself from the index
        ray.get(store.initialise_from_index.remote(self.index_path, self.method.starts_from_given_labels))
        quota = cfg.labeling.quota or _multi_train_size(cfg.data.multi)  # SPEC 2.2: default = |multi train|
        self.coordinator = start_coordinator(labeling_job(cfg, self.run_dir, self.index_path, quota))
        self.num_single = info.num_labels if self.method.single_centroids else 0
        version, _ = ray.get(store.latest.remote())
        if self.method.first_round_before_training and version == 0:
            # ReMix: the first pseudo-labels come from the initial momentum encoder before training
            ray.get(self.coordinator.publish_weights.remote(0, [ray.put(_initial_momentum_state(cfg))]))
            # every video once, so each rank starts with pseudo-labelled videos; later rounds take the quota
            ray.get(self.coordinator.request.remote(0, 0, ray.get(self.coordinator.video_ids.remote())))
            _wait_first_round(self.coordinator, store, cfg.labeling.first_round_timeout_s, self.progress)

    def worker_job(self, job: WorkerJob) -> WorkerJob:
        """``job`` with the service's actors, the run's index and the bank's single identities."""
        from services.label_store import store_actor_name
        from services.labeling_pool import coordinator_name

        return dataclasses.replace(job, num_single_identities=self.num_single,
                                   store_name=store_actor_name(self.cfg.run.name),
                                   coordinator_name=coordinator_name(self.cfg.run.name), index_path=str(self.index_path))

    def stats(self) -> dict:
        import ray

        return ray.get(self.coordinator.stats.remote())

    def new_errors(self) -> list[str]:
        """The causes of the labelling rounds failed since the last call (for the console)."""
        import ray

        from services.labeling_pool import new_round_errors

        try:
            stats = ray.get(self.coordinator.stats.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a busy or restarting coordinator: ask again next time
            return []
        causes, self._reported_errors = new_round_errors(stats, self._reported_errors)
        return causes


def ray_storage(root: Path | str) -> dict:
    """``RunConfig`` storage arguments for the runs' root. An object store is passed as the pyarrow
    file system :mod:`dynamix_core.storage` resolves (Ray would otherwise build its own from the URI,
    without the endpoint of ``AWS_ENDPOINT_URL``) and the bucket path; the file system object travels
    pickled to Ray Train's controller and workers, endpoint and region included, while credentials
    come from each process's own environment."""
    if not storage.is_remote(root):
        return {"storage_path": str(root)}
    fs, path = storage.resolve(root)
    return {"storage_path": path, "storage_filesystem": fs}


def _wait_first_round(coordinator, store, timeout_s: float, progress: bool) -> None:
    """Wait for ReMix's first round (every video) with a progress line every 30 s; a round that
    failed or did not finish in ``timeout_s`` stops the run with its cause."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        idle = ray.get(coordinator.wait_idle.remote(timeout_s=max(0.0, min(30.0, deadline - time.monotonic()))))
        stats = ray.get(coordinator.stats.remote())
        if idle:
            break
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"labeling: the first ReMix round (every video) did not finish in {timeout_s:.0f} s "
                f"({stats['chunks_done']} of {stats['chunks']} chunks done); raise labeling.first_round_timeout_s "
                "or labeling.pool_size")
        if progress:
            print(f"[labels] first ReMix round: {stats['chunks_done']}/{stats['chunks']} chunks", flush=True)
    version, _ = ray.get(store.latest.remote())
    if stats["counters"].get("round_errors") or not version:
        from dynamix_core.errors import StopRun
        from pipelines.console import ray_logs_dir

        cause = stats["errors"][-1] if stats["errors"] else "no label version was published"
        raise StopRun(f"labeling: the first ReMix round failed, so training would start with no pseudo-label: "
                      f"{cause} (the labeling actors' logs: {ray_logs_dir()})")


def _log_labeling_outcome(tracker, stats: dict, step: int) -> None:
    """The labeling service's final counters as MLflow metrics at the run's last step (rank 0 sends
    them with each metric report, which a round failing after the last one would miss), and its last
    failure's cause as the tag ``labeling.last_error``: MLflow then says what ``result.json`` says."""
    from pipelines.train.worker import LABELING_COUNTERS

    if not stats:
        return
    tracker.log_metrics({f"labeling/{k}": float(stats["counters"].get(k, 0)) for k in LABELING_COUNTERS}, step=step)
    if stats["errors"]:
        tracker.set_tags({"labeling.last_error": stats["errors"][-1]})


def stop_labeling_actors(run_name: str, namespace: str = "dynamix") -> None:
    """Stop the run's labeling coordinator (and its pool) and label store, if they exist."""
    import ray

    from services.label_store import store_actor_name
    from services.labeling_pool import coordinator_name

    for name in (coordinator_name(run_name), store_actor_name(run_name)):
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:  # not running
            continue
        if name == coordinator_name(run_name):
            with contextlib.suppress(Exception):  # kills its pool actors; a dead coordinator has none left
                ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor, no_restart=True)


class ProgressPrinter:
    """Prints one line per metric report (rank 0 appends them to history.jsonl) while training runs."""

    prefix = "train"

    def __init__(self, history: Path | str, max_steps: int, labeling=None):
        import threading

        self.history, self.max_steps = history, max_steps
        self.labeling = labeling  # returns the causes of newly failed labelling rounds (or None: no service)
        self.interval_s = 5.0 if storage.is_remote(history) else 1.0  # one GET per look on an object store
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        # a re-run of a finished or interrupted run: its earlier rows are not news
        earlier = read_history_file(self.history)
        self.printed = len(earlier)
        if earlier:
            last = earlier[-1].get("step", "?")
            print(f"[{self.prefix}] continuing the run (recorded up to step {last}): it resumes from its last "
                  "checkpoint", flush=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            stopping = self.stop.wait(self.interval_s)
            self._print_new()  # once more after the stop: the rows written since the last look
            if stopping:
                return

    def _print_new(self) -> None:
        lines = read_history_file(self.history)
        if len(lines) < self.printed:  # a torn line was cut off
            self.printed = len(lines)
        for m in lines[self.printed:]:
            print(self.format(m), flush=True)
        self.printed = len(lines)
        for cause in self.labeling() if self.labeling is not None else ():
            print(f"[labels] labelling round failed: {cause}", flush=True)

    def format(self, m: dict) -> str:
        """One console line for the history row ``m``."""
        evals = "".join(f"  {k[5:]} {100 * v:.1f}" for k, v in m.items() if k in ("eval/mAP", "eval/rank1"))
        # label versions (DynaMix / ReMix) or clusters (the clustering recipes): whichever the run has
        labels = f"  labels v{int(m['label_version'])}" if "label_version" in m else ""
        if "cluster/num_clusters" in m:
            labels += f"  clusters {int(m['cluster/num_clusters'])}"
        return (f"[train] step {m['step']:>6}/{self.max_steps}  loss {m.get('loss/total', float('nan')):.3f}"
                f"  lr {m['lr']:.2e}  {m['images_per_s']:.0f} img/s  data-wait {100 * m['data_wait_fraction']:.0f}%"
                f"{labels}{evals}")


def read_history(run_dir: Path | str) -> list[dict]:
    return read_history_file(storage.join(run_dir, "history.jsonl"))


def _export_momentum(checkpoint, run_dir: Path | str, local_dir: Path) -> Path:
    """The deployable model: the momentum encoder's weights as safetensors, written in the local
    folder of the run (its run folder, when local) and uploaded whole to a run on an object store
    (Ray downloads the checkpoint from there first); returns the local file."""
    from dynamix_core.model import save_state_dict

    with checkpoint.as_directory() as d:
        state = load_tensors(Path(d) / "trainer.pt")["momentum"]
    out = Path(local_dir) / WEIGHTS_FILE
    save_state_dict(state, out)
    if storage.is_remote(run_dir):
        storage.upload_file(out, storage.join(run_dir, WEIGHTS_FILE))
    return out
