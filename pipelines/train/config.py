"""The configuration tree of a training run (``dynamix train --config RECIPE --set key=value``).

Each section belongs to the component it builds; this module only assembles them and checks
what spans sections. Recipes in ``recipes/`` are YAML files of this tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynamix_core.centroids import CentroidBankConfig
from dynamix_core.config import ConfigError, field
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.evaluation import EvalConfig
from dynamix_core.labeling.config import ClusterConfig, RelabelConfig
from dynamix_core.labeling.label_table import KEEP_VERSIONS, SNAPSHOT_EVERY
from dynamix_core.losses import LossConfig
from dynamix_core.model import ModelConfig
from dynamix_core.sampling import SamplerConfig
from dynamix_core.training.optim import OptimConfig
from pipelines.runs.listing import default_runs_root
from pipelines.train.methods import METHODS
from pipelines.train.methods_config import CLUSTER_METHODS, ClusterMethodSection

Method = Literal["dynamix", "remix", "multicam", "cluster_contrast", "domainmix", "calr"]


@dataclass(kw_only=True)
class RunSection:
    name: str = field("dynamix", help="run name: re-running with the same name and storage resumes it")
    storage: str = field(default_factory=default_runs_root,
                         help="root folder or object-store URI (s3://bucket/prefix) of runs: everything of a run under "
                              "STORAGE/NAME (default: $DYNAMIX_STORAGE_URI/runs, else runs)")
    seed: int = field(0, min=0, help="global seed (each rank adds its rank)")
    max_steps: int = field(1000, min=1, help="optimizer steps of the whole run")
    log_every: int = field(10, min=1, help="steps between metric reports (loss terms, lr, images/s, wait fractions)")
    checkpoint_every: int = field(200, min=1, help="steps between checkpoints")
    keep_checkpoints: int = field(2, min=1, help="checkpoints kept (the newest ones)")
    eval_every: int = field(0, min=0, help="steps between target-domain evaluations during training (0: only at the end)")


@dataclass(kw_only=True)
class DataSection:
    multi: list[str] = field(default_factory=list, help="ingested multi-camera shard sets (train split is used)")
    single: list[str] = field(default_factory=list, help="ingested single-camera shard sets")
    single_reads: Literal["videos", "planned"] = field("videos", help="what a trainer reads of the single-camera shards: whole videos streamed ahead by Ray Data tasks, or only the images the sampler planned into a batch (ranged reads by the prefetcher: for long videos, e.g. LUPerson's hundreds of images each, of which a batch uses a few dozen)")
    target: str | None = field(None, help="ingested shard set with the target domain's query/gallery")
    transform: TransformConfig = field(default_factory=TransformConfig, help="augmentation views")
    prefetch_batches: int = field(2, min=1, help="batches decoded ahead of the step in a background thread")
    decode_threads: int = field(2, min=1, help="threads decoding and augmenting images of the next batch")
    bad_images: Literal["stop", "skip"] = field("stop", help="an image of a shard that does not decode: stop the run naming its shard and key, or skip it (left out of its batch, printed and counted)")
    camera_centroid_every: int = field(0, min=0, help="steps between recomputing (identity, camera) centroids with f~ (0: once per pass over the multi-camera set)")


@dataclass(kw_only=True)
class LabelingSection:
    pool_size: int = field(1, min=1, help="labeling actors (GPU actors when GPUs exist)")
    cpus_per_actor: float = field(0.5, min=0, help="CPUs reserved by each labeling actor")
    publish_every: int = field(20, min=1, help="steps between publishing momentum-encoder weights to the pool")
    max_staleness: int = field(100, min=0, help="labels computed from weights more than this many steps old are discarded")
    queue_size: int | None = field(None, min=1, help="labeling requests queued at most, older ones dropped (backpressure); >= scaling.num_workers, as every rank requests at each publish (default: 2 x scaling.num_workers)")
    max_chunk_retries: int = field(3, help="times a chunk whose labeling actor died is retried on another actor before its round fails")
    first_round_timeout_s: float = field(3600.0, min=0, help="ReMix: seconds the driver waits for the first pseudo-labels (every video) before training; the run fails after that")
    embed_batch_size: int = field(128, min=1, help="images embedded at once by a labeling actor")
    chunk_videos: int = field(64, help="videos per labeling task: an actor holds the images and features of one chunk at a time")
    commit_videos: int = field(256, help="a round's finished chunks are published as one label version each time they cover this many videos (and at the round's end): a big round streams its results instead of holding them")
    keep_versions: int = field(KEEP_VERSIONS, help="label versions kept readable besides those a kept checkpoint references (older ones are deleted)")
    snapshot_every: int = field(SNAPSHOT_EVERY, help="every this many label versions the whole table is stored; the others store only their changed rows")
    quota: int | None = field(None, min=1, help="ReMix: single-camera images pseudo-labelled per round (default: size of the multi-camera train set)")
    deterministic: bool = field(False, help="DynaMix: a run that is a function of its seed, and a resumed run that equals an uninterrupted one step by step: the round of publish step p (its weights and the videos every rank held then) is one label version, applied by every trainer at step p + apply_after, which waits for it when the round is slower")
    apply_after: int = field(10, min=1, help="labeling.deterministic: steps between a publish and the step that applies its labels (the round's time budget before the trainers wait)")
    ground_truth: list[str] = field(default_factory=list, help="SynthReID ground_truth.parquet files: pseudo-label quality (pairwise F, purity) is measured against them")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, help="ReMix: DBSCAN inside each video")
    relabel: RelabelConfig = field(default_factory=RelabelConfig, help="DynaMix: the Relabeling Module")


@dataclass(kw_only=True)
class ScalingSection:
    num_workers: int = field(2, min=1, help="Ray Train workers (one per GPU in production)")
    use_gpu: bool = field(False, help="one GPU per worker")
    cpus_per_worker: float = field(0.5, min=0, help="CPUs reserved per worker (0.5 on a 2-core box: Ray Data needs the rest)")
    precision: Literal["fp32", "bf16"] = field("fp32", help="bf16 autocast on GPU")
    compile: bool = field(False, help="torch.compile the encoder (GPU)")
    max_failures: int = field(2, min=0, help="worker-group restarts from the last checkpoint before the run fails")
    address: str | None = field(None, help="Ray address to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; "
                                           "else start a local instance)")
    resources_timeout_s: float = field(600.0, min=0, help="seconds to wait for the cluster to offer what the run asks for "
                                                   "(trainers, labeling actors; an autoscaler may add nodes) before failing")


@dataclass(kw_only=True)
class TrackingSection:
    uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in the run folder; "
                                       "for a run.storage on an object store, in a local folder the run logs)")
    experiment: str = field("dynamix", help="MLflow experiment")
    registered_model: str | None = field(
        None, help="register the trained momentum encoder as a version of this MLflow model when the run ends "
                   "(idempotent; the model's first version becomes @champion)")


@dataclass(kw_only=True)
class TrainConfig:
    method: Method = field("dynamix", help="dynamix: relabel tracker labels; remix: DBSCAN pseudo-labels; multicam: no single-camera data; "
                           "cluster_contrast / calr: unsupervised on data.multi (labels ignored); domainmix: labeled data.multi + unlabeled data.single")
    run: RunSection = field(default_factory=RunSection, help="run identity, length and cadences")
    data: DataSection = field(default_factory=DataSection, help="shard sets and augmentation")
    model: ModelConfig = field(default_factory=ModelConfig, help="encoder and momentum encoder")
    loss: LossConfig = field(default_factory=LossConfig, help="loss weights and temperatures")
    centroids: CentroidBankConfig = field(default_factory=CentroidBankConfig, help="Efficient Centroids Module")
    sampler: SamplerConfig = field(default_factory=SamplerConfig, help="Data Sampling Module")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer and learning-rate schedule")
    labeling: LabelingSection = field(default_factory=LabelingSection, help="labeling actor pool")
    scaling: ScalingSection = field(default_factory=ScalingSection, help="Ray Train workers and precision")
    tracking: TrackingSection = field(default_factory=TrackingSection, help="MLflow tracking")
    eval: EvalConfig = field(default_factory=EvalConfig, help="target-domain evaluation")
    cluster_method: ClusterMethodSection | None = field(
        None, help="Cluster-Contrast / DomainMix / CALR settings (defaults when one of them is the method)")

    def __post_init__(self) -> None:
        if not self.data.multi:
            raise ConfigError("data.multi: at least one multi-camera shard set is required")
        if self.uses_single and not self.data.single:
            raise ConfigError(f"data.single: method={self.method} needs single-camera shard sets "
                              "(or set method=multicam)")
        if self.method in CLUSTER_METHODS:
            self.cluster_method = self.cluster_method or ClusterMethodSection()
            self.cluster_method.check(self.method, self.run.max_steps)
        elif self.cluster_method is not None:
            raise ConfigError(f"cluster_method: read only by method={'|'.join(CLUSTER_METHODS)}; "
                              f"remove it for method={self.method}")
        if self.method == "multicam" and self.sampler.num_videos and (
                self.sampler.adds_videos or not self.sampler.schedule
                or any(p.multi_fraction < 1.0 for p in self.sampler.schedule)):
            raise ConfigError(
                "sampler: method=multicam has no single-camera data, so every batch must be multi-camera; "
                "set sampler.videos=add and sampler.num_videos=0 (as recipes/multicam_baseline.yaml does), or "
                "sampler.schedule=[{step_fraction: 0.0, multi_fraction: 1.0, ids_per_video: 1}]", key="sampler")
        if (self.data.transform.height, self.data.transform.width) != tuple(self.model.img_size):
            raise ConfigError(
                f"data.transform size ({self.data.transform.height}, {self.data.transform.width}) must equal "
                f"model.img_size {tuple(self.model.img_size)}; change data.transform.height/width"
            )
        if self.run.checkpoint_every % self.run.log_every:
            raise ConfigError(f"run.checkpoint_every={self.run.checkpoint_every} must be a multiple of "
                              f"run.log_every={self.run.log_every} (checkpoints ride on metric reports)")
        if self.run.eval_every and self.run.eval_every % self.run.log_every:
            raise ConfigError(f"run.eval_every={self.run.eval_every} must be a multiple of run.log_every={self.run.log_every}")
        if self.scaling.precision == "bf16" and not self.scaling.use_gpu:
            raise ConfigError("scaling.precision=bf16 needs scaling.use_gpu=true (CPU runs in fp32)")
        if self.labeling.queue_size is None:
            self.labeling.queue_size = 2 * self.scaling.num_workers
        if self.uses_labeling_pool and self.labeling.queue_size < self.scaling.num_workers:
            raise ConfigError(f"labeling.queue_size={self.labeling.queue_size} drops requests at every publish of "
                              f"scaling.num_workers={self.scaling.num_workers} ranks; set it >= {self.scaling.num_workers}")
        for name in ("chunk_videos", "commit_videos", "keep_versions", "snapshot_every"):
            if getattr(self.labeling, name) < 1:
                raise ConfigError(f"labeling.{name}: {getattr(self.labeling, name)} must be >= 1")
        if self.labeling.max_chunk_retries < 0:
            raise ConfigError(f"labeling.max_chunk_retries: {self.labeling.max_chunk_retries} must be >= 0")
        if self.labeling.deterministic and self.method != "dynamix":
            raise ConfigError(f"labeling.deterministic: step-locked label versions are DynaMix's relabelling rounds; "
                              f"method={self.method} has none (remove it)")
        if self.centroids.loss_mode == "sharded" and self.scaling.num_workers < 2:
            raise ConfigError("centroids.loss_mode=sharded needs scaling.num_workers >= 2")

    @property
    def uses_single(self) -> bool:
        """The run reads data.single (DomainMix: as its unlabeled real domain)."""
        return METHODS[self.method].reads_single

    @property
    def uses_labeling_pool(self) -> bool:
        """Single-camera labels come from the label store + labeling pool (DynaMix, ReMix)."""
        return METHODS[self.method].labeling_pool
