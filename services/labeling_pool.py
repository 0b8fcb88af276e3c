"""The labeling service: a pool of Ray actors that embed single-camera videos with the trainers'
momentum encoder and pseudo-label (ReMix) or relabel (DynaMix) them, and a coordinator that
queues requests, dispatches chunks of videos to the pool, retries the work of a killed actor on
another one, and publishes a round's results to the label store as they come: a new version plus
per-identity centroids each time finished chunks cover ``commit_videos`` videos, and at the end.
The coordinator holds the index per video and a few chunks, never anything per image of the run.

    trainers --publish_weights(step, weights)--> coordinator --process(chunk)--> LabelingWorker x N
    trainers --request(rank, step, videos)-----> coordinator --commit(version)--> label store
    trainers <--changes_since(version, rank)----------------------------------- label store

Identity ids: a worker labels its chunk with ids that are unique inside the chunk (existing ids are
kept, new ones are numbered from the chunk's ``next_id``); the coordinator, the only writer,
renumbers every new id to a fresh global id at commit, so concurrent chunks never collide.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from dynamix_core import storage
from dynamix_core.labeling import quality

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# worker


class LabelingWorkerService:
    """Embeds a chunk of videos with the published momentum encoder and labels them."""

    def __init__(self, model_cfg, transform_cfg, embed_batch_size: int):
        """``model_cfg``: a :class:`~dynamix_core.model.ModelConfig`; ``transform_cfg``: a
        :class:`~dynamix_core.data.transforms.TransformConfig` (its test view embeds)."""
        import dataclasses

        import dynamix_core  # noqa: F401  (torchvision shim before timm)
        from dynamix_core.data.transforms import ViewTransform
        from dynamix_core.model import build_encoder

        model_cfg = dataclasses.replace(model_cfg, weights=None)  # weights always come from the trainers
        self.model = build_encoder(model_cfg).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.view = ViewTransform(transform_cfg, "test")
        self.size = (self.view.cfg.height, self.view.cfg.width)
        self.embed_batch_size = embed_batch_size
        self.weights_step = -1

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def embed(self, chunk: dict) -> np.ndarray:
        from dynamix_core.data.images import decode_image
        from dynamix_core.data.shards import read_members

        blobs: list[bytes] = []
        for tar, offsets, sizes in chunk["reads"]:
            blobs.extend(read_members(tar, offsets, sizes))
        feats = []
        for start in range(0, len(blobs), self.embed_batch_size):
            imgs = [self.view(decode_image(b, self.size)) for b in blobs[start:start + self.embed_batch_size]]
            out = self.model(torch.stack(imgs).to(self.device))
            feats.append(torch.nn.functional.normalize(out.float(), dim=1).cpu())
        return torch.cat(feats).numpy()

    def process(self, chunk: dict, weights_step: int, weights: list) -> dict:
        """Label one chunk. ``weights`` is ``[ObjectRef of a state_dict]``: nested in a list, Ray passes
        the reference through unresolved, so the weights are fetched only when the step changed."""
        from dynamix_core.labeling.pseudo_labels import assign_pseudo_labels
        from dynamix_core.labeling.relabel import relabel_videos

        if weights_step != self.weights_step:
            self.model.load_state_dict(ray.get(weights[0]))
            self.weights_step = weights_step
        t0 = time.perf_counter()
        feat_ND = self.embed(chunk)
        video = np.asarray(chunk["video"], dtype=np.int64)
        before = np.asarray(chunk["labels"], dtype=np.int64)
        next_id = int(before.max()) + 1 if len(before) and before.max() >= 0 else 0
        report: dict[str, float] = {}
        if chunk["mode"] == "dynamix":
            result = relabel_videos(feat_ND, video, before, np.asarray(chunk["frames"]),
                                    chunk["relabel"], next_id)
            after = result.labels
            report.update({"num_splits": float(len(result.changes.splits)),
                           "num_merges": float(len(result.changes.merges)),
                           "num_dropped": float(result.changes.num_dropped)})
        else:
            pseudo = assign_pseudo_labels(feat_ND, video, chunk["cluster"], id_offset=next_id)
            after = pseudo.labels
        used = after >= 0
        ids, inverse = np.unique(after[used], return_inverse=True)
        sums = np.zeros((len(ids), feat_ND.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, feat_ND[used])
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        id_video = np.zeros(len(ids), dtype=np.int64)
        id_video[inverse] = video[used]
        report["seconds"] = time.perf_counter() - t0
        return {"chunk_id": chunk["chunk_id"], "rows": chunk["rows"], "labels": after, "new_from": next_id,
                "centroid_ids": ids, "centroids": centroids.astype(np.float32), "centroid_videos": id_video,
                "videos": sorted(set(video.tolist())), "report": report, "weights_step": weights_step}


# --------------------------------------------------------------------------------------------------
# coordinator


@dataclass(frozen=True)
class LabelingJob:
    """What the labelling service of one run is given: typed sections, built by the driver from the
    run's config (``pipelines.train.driver.labeling_job``; the defaults live there, in the config)."""

    mode: str  # "dynamix" (relabel the tracker labels) or "remix" (DBSCAN pseudo-labels)
    run_name: str
    label_root: str  # the run's label folder (the store's table)
    index_path: str  # the run's single-camera index
    total_steps: int
    seed: int
    quota: int  # ReMix: images pseudo-labelled per round
    use_gpu: bool
    pool_size: int
    cpus_per_actor: float
    queue_size: int
    max_chunk_retries: int
    max_staleness: int
    embed_batch_size: int
    chunk_videos: int
    commit_videos: int
    keep_versions: int
    snapshot_every: int
    model: object  # ModelConfig
    transform: object  # TransformConfig
    relabel: object  # RelabelConfig
    cluster: object  # ClusterConfig
    #: DynaMix, ``labeling.deterministic``: one round per publish step, on that step's weights and every
    #: rank's request of that step, published as one version tagged with the step (see _pick_step_round)
    deterministic: bool = False
    world_size: int = 1


@dataclass
class _Round:
    """One labeling round in flight. Its videos are cut into chunks of ``chunk_videos`` that are built
    (index rows read, current labels fetched) only when they are sent, at most ``2 x pool_size`` out at
    once; finished chunks are committed as soon as they cover ``commit_videos`` videos, so the
    coordinator holds a few chunks and one commit's results, whatever the size of the round."""

    round_id: int
    step: int  # training step of the request
    weights_step: int
    videos: np.ndarray
    num_chunks: int
    chunks: dict[int, dict] = field(default_factory=dict)  # sent and not yet committed
    results: dict[int, dict] = field(default_factory=dict)  # finished and not yet committed
    done: int = 0  # chunks finished, committed or not
    versions: list[int] = field(default_factory=list)  # label versions this round published
    started: float = field(default_factory=time.perf_counter)
    generation: int = 0  # the trainer group it was started for (see ``trainers_restarted``)
    weights_ref: object = None  # deterministic rounds: the weights of their own step, not the newest


class LabelingCoordinatorService:
    """Queue, dispatch, retry, staleness and publication of labeling rounds (one writer)."""

    def __init__(self, job: LabelingJob):
        from dynamix_core.labeling.pseudo_labels import VideoQuotaSampler
        from dynamix_core.labeling.relabel_schedule import RelabelScheduler
        from services.label_store import get_or_create_store

        self.job = job
        self.mode = job.mode
        self.store = get_or_create_store(job.run_name, job.label_root, snapshot_every=job.snapshot_every,
                                         keep_versions=job.keep_versions)
        # the index per video, nothing per image: a chunk's rows are read from the index when it is sent
        from dynamix_core.data.run_index import VideoTable

        self.index = VideoTable(job.index_path)
        video_ids = self.index.video
        self.scheduler = RelabelScheduler(video_ids, job.total_steps, job.relabel.warmup_fraction)
        self.quota = VideoQuotaSampler(video_ids, self.index.count, job.quota, seed=job.seed)
        # which videos this relabel pass has done and where the ReMix quota stands survive a
        # restart of this actor or of the run (saved after every published round)
        self.state_path = storage.join(job.label_root, "coordinator_state.json")
        if storage.exists(self.state_path):
            saved = json.loads(storage.read_bytes(self.state_path))
            self.scheduler.load_state_dict(saved["scheduler"])
            self.quota.load_state_dict(saved["quota"])
            log.info("labeling coordinator: resumed its schedule at label version %d", saved["version"])
        resources = {"num_gpus": 1} if job.use_gpu else {"num_cpus": job.cpus_per_actor}
        self.worker_cls = ray.remote(max_restarts=-1, max_task_retries=0, **resources)(LabelingWorkerService)
        self.workers = [self.worker_cls.remote(job.model, job.transform, job.embed_batch_size)
                        for _ in range(job.pool_size)]
        self.queue: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.weights: tuple[int, ray.ObjectRef] | None = None
        # deterministic rounds: weights and requests by publish step (requests: rank -> videos)
        self.step_weights: dict[int, ray.ObjectRef] = {}
        self.step_requests: dict[int, dict[int, list[int]]] = collections.defaultdict(dict)
        self.latest_step = 0
        self.generation = 0  # +1 each time the trainers restart from a checkpoint
        self.next_global_id: int | None = None
        self.reports: list[dict] = []
        self.counters = collections.Counter()
        self.round: _Round | None = None
        # set (under the lock) when requests are taken off the queue, cleared when their round ends:
        # between the two the queue is empty and ``round`` may still be None (labels being read)
        self.busy = False
        self.round_counter = 0
        self.peak_chunks_held = 0  # most chunks (sent + finished, not committed) held at once
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="labeling-dispatch", daemon=True)
        self.thread.start()

    # --- trainers' side ---------------------------------------------------------------------------

    def publish_weights(self, step: int, weights: list) -> None:
        """Momentum-encoder weights of training step ``step`` (``[ObjectRef]``: not resolved here)."""
        with self.lock:
            if self.weights is None or step >= self.weights[0]:
                self.weights = (step, weights[0])
            self.latest_step = max(self.latest_step, step)
            if self.job.deterministic:
                self.step_weights[step] = weights[0]

    def trainers_restarted(self, step: int) -> None:
        """The trainer group restarted from its checkpoint of ``step``: forget the dead group's
        weights (their owner is gone), its step and its queued requests, and publish nothing from a
        round started for it. Without this, ``latest_step`` stays where the dead group got to and
        every round on the resumed weights is discarded as stale until the trainers catch up."""
        with self.lock:
            self.weights = None
            self.latest_step = step
            self.queue.clear()
            self.step_weights.clear()  # the dead group's: the resumed trainers publish those steps again
            self.step_requests.clear()
            self.generation += 1
            self.counters["trainer_restarts"] += 1
        log.info("labeling coordinator: trainers restarted at step %d", step)

    def request(self, rank: int, step: int, video_ids: list[int]) -> bool:
        """Label/relabel these videos soon. Returns False when the request was dropped because the
        queue is full (backpressure: the newest requests are kept, they are about to be sampled)."""
        with self.lock:
            self.latest_step = max(self.latest_step, step)
            if self.job.deterministic:  # every rank's request of a step makes one round: none is dropped
                self.step_requests[step][rank] = list(video_ids)
                self.counters["requests"] += 1
                return True
            dropped = len(self.queue) >= self.job.queue_size
            if dropped:
                self.queue.popleft()
                self.counters["requests_dropped"] += 1
            self.queue.append((step, list(video_ids)))
            self.counters["requests"] += 1
            return not dropped

    def stats(self) -> dict:
        """Counters (``rounds``, ``round_errors``, ``chunk_retries``, ``requests_dropped``, ...), the
        quality report of every published round, the last errors (one line each: the cause), and the
        round in flight (``chunks_done`` of ``chunks``)."""
        with self.lock:
            rnd = self.round
            return {"counters": dict(self.counters), "reports": list(self.reports), "errors": list(self.errors[-5:]),
                    "in_flight": self.busy, "queued": len(self.queue),
                    "chunks": 0 if rnd is None else rnd.num_chunks, "chunks_done": 0 if rnd is None else rnd.done,
                    "peak_chunks_held": self.peak_chunks_held}

    def wait_idle(self, timeout_s: float = 600.0) -> bool:
        """Block until nothing is queued or in flight (used by the first ReMix round and tests);
        False when ``timeout_s`` passed first. A round that failed also ends in idle: read
        ``stats()["counters"]["round_errors"]`` to tell."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                idle = not self.busy and not self.queue and not self.step_requests
            if idle:
                return True
            time.sleep(0.1)
        return False

    def label_root(self) -> str:
        return self.job.label_root

    def video_ids(self) -> list[int]:
        return self.index.video.tolist()

    def workers_for_test(self) -> list:
        return list(self.workers)

    def shutdown(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        for w in self.workers:
            ray.kill(w, no_restart=True)

    # --- dispatch loop ----------------------------------------------------------------------------

    def _pick_videos(self) -> tuple[int, np.ndarray] | None:
        with self.lock:
            picked = self._pick_videos_locked()
            self.busy = picked is not None
            return picked

    def _pick_videos_locked(self) -> tuple[int, np.ndarray] | None:
        if self.job.deterministic:
            return self._pick_step_round()
        if self.weights is None:
            return None
        if self.mode == "remix":
            if not self.queue:
                return None
            step, videos = self.queue.popleft()
            self.queue.clear()  # one ReMix round covers the next quota of videos
            if videos:  # an explicit list (the first round labels every video)
                return step, np.asarray(sorted(set(videos)), dtype=np.int64)
            return step, self.quota.next_epoch()
        while self.queue:
            step, videos = self.queue.pop()  # newest first: those videos are about to be sampled
            due = self.scheduler.due(step, np.asarray(videos, dtype=np.int64))
            if len(due):
                return step, due
        return None

    def _pick_step_round(self) -> tuple[int, np.ndarray] | None:
        """``labeling.deterministic``: the earliest publish step whose weights and every rank's request
        are in: its round relabels the due videos among the union of the requests, in order (and
        is published even when none is due, so that the trainers waiting for that step go on)."""
        ready = [s for s, by_rank in self.step_requests.items()
                 if len(by_rank) >= self.job.world_size and s in self.step_weights]
        if not ready:
            return None
        step = min(ready)
        videos = sorted({v for vids in self.step_requests.pop(step).values() for v in vids})
        return step, self.scheduler.due(step, np.asarray(videos, dtype=np.int64))

    def _chunk(self, rnd: _Round, chunk_id: int) -> dict:
        """Chunk ``chunk_id`` of the round: at most ``chunk_videos`` videos (an actor holds one chunk's
        images and features at a time), their index rows read from the index by row range, the current
        labels of those rows read from the store (never the whole table)."""
        per_chunk = self._chunk_videos()
        chunk = self.index.read_chunk(rnd.videos[chunk_id * per_chunk:(chunk_id + 1) * per_chunk])
        _, labels = ray.get(self.store.read_rows.remote(chunk["rows"]))
        chunk.update({"chunk_id": chunk_id, "mode": self.mode, "labels": labels.astype(np.int64),
                      "relabel": self.job.relabel, "cluster": self.job.cluster})
        return chunk

    def _chunk_videos(self) -> int:
        return max(1, self.job.chunk_videos)

    def _start_round(self) -> bool:
        picked = self._pick_videos()
        if picked is None:
            return False
        step, videos = picked
        if self.job.deterministic and ray.get(self.store.version_for_step.remote(step)) is not None:
            # published before the run restarted (the same weights and requests: the same labels)
            with self.lock:
                self.step_weights.pop(step, None)
                self.counters["rounds_reused"] += 1
                self.busy = False
            return False
        if self.next_global_id is None:
            self.next_global_id = int(ray.get(self.store.current.remote())["num_identities"])
        with self.lock:
            if self.job.deterministic:
                weights_step, ref = step, self.step_weights.pop(step)
            else:
                (weights_step, _), ref = self.weights, None
            self.round_counter += 1
            self.round = _Round(self.round_counter, step, weights_step, np.asarray(videos, dtype=np.int64),
                                -(-len(videos) // self._chunk_videos()), generation=self.generation, weights_ref=ref)
        return True

    def _submit(self, rnd: _Round, chunk_id: int, worker_index: int):
        if rnd.weights_ref is not None:  # a deterministic round: its own step's weights
            worker = self.workers[worker_index % len(self.workers)]
            return worker.process.remote(rnd.chunks[chunk_id], rnd.weights_step, [rnd.weights_ref])
        with self.lock:
            weights_step, ref = self.weights
        rnd.weights_step = min(rnd.weights_step, weights_step)
        worker = self.workers[worker_index % len(self.workers)]
        return worker.process.remote(rnd.chunks[chunk_id], weights_step, [ref])

    def _run_round(self, rnd: _Round) -> None:
        """Send the round's chunks as the pool frees up (at most two per actor out at once) and commit
        the finished ones each time they cover ``commit_videos`` videos, and at the end. A commit
        found stale ends the round: its other chunks are not sent."""
        max_retries = self.job.max_chunk_retries
        max_out = 2 * len(self.workers)
        # a deterministic round is one version, its chunks in order, whatever order they finish in
        commit_videos = len(rnd.videos) + 1 if self.job.deterministic else max(1, self.job.commit_videos)
        if rnd.num_chunks == 0:  # nothing due: an empty version marks the step as done
            self._commit(rnd)
            return
        pending: dict = {}
        next_chunk = 0
        while not self._stop.is_set():
            while next_chunk < rnd.num_chunks and len(pending) < max_out:
                chunk = self._chunk(rnd, next_chunk)
                with self.lock:
                    rnd.chunks[next_chunk] = chunk
                    self.peak_chunks_held = max(self.peak_chunks_held, len(rnd.chunks))
                pending[self._submit(rnd, next_chunk, next_chunk)] = (next_chunk, 0)
                next_chunk += 1
            finished_videos = sum(len(r["videos"]) for r in rnd.results.values())
            if rnd.results and (finished_videos >= commit_videos or (not pending and next_chunk == rnd.num_chunks)):
                if not self._commit(rnd):
                    return
                continue
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                cid, retries = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    if isinstance(exc, ray.exceptions.OwnerDiedError):
                        # the trainer that published these weights died: no actor can fetch them;
                        # wait for the restarted trainers' next publish instead of retrying
                        with self.lock:
                            self.weights = None
                        raise RuntimeError(
                            f"the weights of step {rnd.weights_step} died with the trainer that published them; "
                            "round given up until the next publish") from exc
                    # the actor died mid-chunk: nothing of this chunk was published; run it on the
                    # next actor (the dead one restarts by itself, max_restarts=-1), a few times
                    if retries >= max_retries:
                        raise RuntimeError(
                            f"labeling chunk {cid} of round {rnd.round_id} lost its actor {retries + 1} times "
                            f"(last: {type(exc).__name__}); the round is given up (labeling.max_chunk_retries="
                            f"{max_retries}): check the labeling actors' memory and logs") from exc
                    with self.lock:
                        self.counters["chunk_retries"] += 1
                    log.warning("labeling chunk %d lost (%s); retrying on another actor", cid, type(exc).__name__)
                    pending[self._submit(rnd, cid, cid + retries + 1)] = (cid, retries + 1)
                    continue
                with self.lock:
                    rnd.results[cid] = result
                    rnd.done += 1

    def _commit(self, rnd: _Round) -> bool:
        """Publish the round's finished chunks as one label version; False (nothing published, the
        round to be ended) when the round is stale."""
        with self.lock:
            latest, generation = self.latest_step, self.generation
        if rnd.generation != generation:
            self.counters["rounds_stale"] += 1
            log.info("labeling round %d discarded: started before the trainers restarted", rnd.round_id)
            return False
        if rnd.weights_step < latest - self.job.max_staleness and not self.job.deterministic:
            self.counters["rounds_stale"] += 1
            log.info("labeling round %d discarded: weights of step %d, trainers at %d (max_staleness %d)",
                     rnd.round_id, rnd.weights_step, latest, self.job.max_staleness)
            return False
        with self.lock:
            results = sorted(rnd.results.items())
        rows, labels, before, truth, ids, cents, cvideos, videos = [], [], [], [], [], [], [], []
        counts: collections.Counter = collections.Counter()
        # new identities take the numbers of retired ones first (the banks reuse their rows), then
        # numbers after every identity so far
        free = collections.deque(ray.get(self.store.free_ids.remote()).tolist())
        for cid, res in results:
            lab = np.asarray(res["labels"], dtype=np.int64)
            remap = {}
            for old in np.unique(lab[lab >= res["new_from"]]).tolist():
                if free:
                    remap[old] = free.popleft()
                else:
                    remap[old] = self.next_global_id
                    self.next_global_id += 1
            rows.append(np.asarray(res["rows"], dtype=np.int64))
            labels.append(np.array([remap.get(x, x) for x in lab.tolist()], dtype=np.int64))
            ids.append(np.array([remap.get(x, x) for x in np.asarray(res["centroid_ids"]).tolist()], dtype=np.int64))
            cents.append(res["centroids"]), cvideos.append(res["centroid_videos"]), videos.extend(res["videos"])
            before.append(np.asarray(rnd.chunks[cid]["labels"], dtype=np.int64))
            if rnd.chunks[cid]["truth"] is not None:
                truth.append(np.asarray(rnd.chunks[cid]["truth"], dtype=np.int64))
            counts.update({k: v for k, v in res["report"].items() if k.startswith("num_")})
        if not results:  # an empty round
            rows, labels, before, ids, cents, cvideos = ([np.zeros(0, np.int64)], [np.zeros(0, np.int64)],
                                                         [np.zeros(0, np.int64)], [np.zeros(0, np.int64)],
                                                         [np.zeros((0, 0), np.float32)], [np.zeros(0, np.int64)])
        after_N, before_N = np.concatenate(labels), np.concatenate(before)
        report = {**quality.cluster_stats(after_N), **{k: float(v) for k, v in counts.items()}}
        if truth:
            truth_N = np.concatenate(truth)
            report.update(quality.pairwise_scores(after_N, truth_N))
            report.update({f"before_{k}": v for k, v in quality.pairwise_scores(before_N, truth_N).items()})
        version = ray.get(self.store.commit.remote(
            np.concatenate(rows), after_N, step=rnd.step, centroid_ids=np.concatenate(ids),
            centroids=np.concatenate(cents), centroid_videos=np.concatenate(cvideos), videos=sorted(set(videos)),
            num_splits=int(report.get("num_splits", 0)), num_merges=int(report.get("num_merges", 0))))
        if self.mode == "dynamix":
            self.scheduler.mark_done(np.asarray(sorted(set(videos)), dtype=np.int64))
        storage.write_bytes_atomic(self.state_path, json.dumps({"version": version, "scheduler": self.scheduler.state_dict(),
                                                                "quota": self.quota.state_dict()}))
        report.update({"version": float(version), "step": float(rnd.step), "weights_step": float(rnd.weights_step),
                       "num_videos": float(len(set(videos))), "num_images": float(len(after_N)),
                       "round_seconds": time.perf_counter() - rnd.started})
        with self.lock:
            for cid, _ in results:  # committed: neither the chunk nor its result is held any longer
                del rnd.results[cid], rnd.chunks[cid]
            rnd.versions.append(version)
            self.reports.append(report)
            self.counters["commits"] += 1
            if rnd.done == rnd.num_chunks and not rnd.results:
                self.counters["rounds"] += 1
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._start_round():
                    time.sleep(0.05)
                    continue
                self._run_round(self.round)
            except Exception as exc:  # a bad round must not kill the service: report it and go on
                cause = f"round at step {getattr(self.round, 'step', '?')}: {round_error_cause(exc)}"
                with self.lock:
                    self.counters["round_errors"] += 1
                    self.errors.append(cause)
                log.error("labeling round failed: %s\n%s", cause, traceback.format_exc())
            finally:
                with self.lock:
                    self.round, self.busy = None, False


#: terminal colour codes that Ray puts in the header line of a remote task's error
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def round_error_cause(exc: BaseException) -> str:
    """The plain cause of a failed labelling round, one line without terminal colours: for an error
    raised inside a labelling actor (Ray's ``RayTaskError``, whose first line is Ray's coloured header
    naming the actor and its pid), the actor's own exception; else ``exc`` itself."""
    while True:
        inner = getattr(exc, "cause", None)  # RayTaskError: the exception raised in the actor
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    if isinstance(exc, ray.exceptions.RayError) and len(lines) > 1:
        text = lines[-1]  # a wrapped traceback (the cause could not travel): its last line names it
    else:
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text


def new_round_errors(stats: dict, reported: int) -> tuple[list[str], int]:
    """The causes of the rounds that failed since ``reported`` failures were reported (from the
    coordinator's ``stats()``: the last five causes at most), and the number failed so far."""
    failed = int(stats["counters"].get("round_errors", 0))
    return (list(stats["errors"][-(failed - reported):]) if failed > reported else []), failed


def coordinator_name(run_name: str) -> str:
    return f"dynamix-labeling-{run_name}"


def start_coordinator(job: LabelingJob, namespace: str = "dynamix"):
    """The run's coordinator actor (threaded: trainers' calls are served while a round runs)."""
    actor = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1, max_task_retries=-1)(
        LabelingCoordinatorService)
    coordinator = actor.options(name=coordinator_name(job.run_name), namespace=namespace,
                                get_if_exists=True).remote(job)
    serving = ray.get(coordinator.label_root.remote())
    if serving != job.label_root:
        raise ValueError(f"labeling coordinator {coordinator_name(job.run_name)!r} is live for {serving}, not "
                         f"{job.label_root}: another run with this name is running or was left behind; stop it "
                         "(dynamix stop) or choose another run.name")
    return coordinator
