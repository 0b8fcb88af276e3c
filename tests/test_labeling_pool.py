"""The labeling service on local Ray (services/labeling_pool.py): DynaMix and ReMix rounds publish
valid label partitions and centroids as whole versions, a pool actor killed mid-round loses nothing,
requests beyond the queue are dropped (oldest first) and stale rounds are discarded.

Data: a tiny SynthReID single-camera set (6 videos, ~200 images at 32x16), ingested without Ray;
encoder: timm ``test_vit``. Each pool is set up the way the training driver does it (its index,
its coordinator config, its initial momentum weights)."""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from dynamix_core.config import load_config
from dynamix_core.data.synth import SynthConfig, generate
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.train.config import TrainConfig
from dynamix_core.data.run_index_writer import write_single_camera_index
from pipelines.train.driver import _initial_momentum_state, labeling_job
from dynamix_core.labeling.label_table import LabelTable
from services.label_store import get_or_create_store
from services.labeling_pool import LabelingWorkerService, start_coordinator

TINY_VIDEOS = SynthConfig(height=32, width=16, num_multi_sets=0, num_videos=6, min_people_per_video=3,
                          max_people_per_video=4, video_frames=30, min_track_frames=8, max_track_frames=12,
                          fragment_rate=0.4, switch_rate=0.3, target_ids=2, target_cameras=2)
MAX_STALENESS = 5
#: training steps handed out in increasing order: weights are only ever replaced by newer ones, so
#: every test publishes at a step above all earlier ones and does not depend on test order
STEPS = itertools.count(1000, 1000)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    generate(TINY_VIDEOS, root / "data", progress=False)
    run_ingest(IngestConfig(root=root / "data" / "single" / "synth_video", out=root / "shards",
                            dataset="synth_video", workers=0), progress=False)
    return root / "shards"


@dataclass
class Pool:
    """A label store + coordinator (+ its workers) of one run, as the training driver builds them."""

    cfg: TrainConfig
    label_dir: Path
    keys: list[str]
    video: np.ndarray  # video of each index row
    store: object
    coordinator: object

    def publish(self, step: int) -> None:
        weights = ray.put(_initial_momentum_state(self.cfg))
        ray.get(self.coordinator.publish_weights.remote(step, [weights]))

    def run_round(self, step: int, videos) -> None:
        ray.get(self.coordinator.request.remote(0, step, list(videos)))
        assert ray.get(self.coordinator.wait_idle.remote(timeout_s=180))

    def stats(self) -> dict:
        return ray.get(self.coordinator.stats.remote())

    def history(self) -> list[dict]:
        return ray.get(self.store.history.remote())

    def labels(self, version: int) -> dict[str, int]:
        """key -> pid of ``version``, read from the store's folder (labels are addressed by index row)."""
        return dict(zip(self.keys, LabelTable(self.label_dir).read(version).tolist()))

    def close(self) -> None:
        ray.get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator, no_restart=True)
        ray.kill(self.store, no_restart=True)


def start_pool(shards: Path, tmp: Path, method: str, *overrides: str) -> Pool:
    name = f"pool-{method}-{uuid.uuid4().hex[:8]}"  # named actors outlive a test: never reuse a name
    cfg = load_config(TrainConfig, None, [
        f"method={method}", f"run.name={name}", f"run.storage={tmp}", "run.max_steps=100000",
        f"data.multi=[{shards}]", f"data.single=[{shards}]", "data.transform.height=32", "data.transform.width=16",
        "model.backbone=test_vit", "model.img_size=[32,16]", "model.drop_path_rate=0.0",
        "labeling.pool_size=2", "labeling.cpus_per_actor=0.25", "labeling.relabel.warmup_fraction=0.0",
        f"labeling.max_staleness={MAX_STALENESS}", "labeling.cluster.eps=0.05", *overrides])
    label_dir = tmp / name / "labels"
    label_dir.mkdir(parents=True)
    index_path = label_dir / "index.parquet"
    write_single_camera_index([str(shards)], index_path)
    index = pq.read_table(index_path)
    store = get_or_create_store(name, str(label_dir))
    initial = index["label"].to_numpy() if method == "dynamix" else np.full(index.num_rows, -1)
    ray.get(store.initialise.remote(initial))
    coordinator = start_coordinator(labeling_job(cfg, tmp / name, index_path, quota=100))
    return Pool(cfg, label_dir, index["key"].to_pylist(), index["video"].to_numpy(), store, coordinator)


@pytest.fixture(scope="module")
def dynamix_pool(ray_local, shards, tmp_path_factory):
    pool = start_pool(shards, tmp_path_factory.mktemp("dynamix"), "dynamix", "labeling.queue_size=1",
                      "scaling.num_workers=1")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def remix_pool(ray_local, shards, tmp_path_factory):
    pool = start_pool(shards, tmp_path_factory.mktemp("remix"), "remix")
    yield pool
    pool.close()


def all_videos(pool: Pool) -> list[int]:
    return sorted(set(pool.video.tolist()))


def assert_valid_partition(pool: Pool, labels: dict[str, int]) -> set[int]:
    """Every index key present; each identity inside one video; returns the identities in use."""
    assert sorted(labels) == sorted(pool.keys)
    videos_of = defaultdict(set)
    for key, video in zip(pool.keys, pool.video.tolist()):
        if labels[key] >= 0:
            videos_of[labels[key]].add(video)
    spanning = {g: v for g, v in videos_of.items() if len(v) > 1}
    assert not spanning, f"identities spanning videos: {spanning}"
    assert {v for vs in videos_of.values() for v in vs} == set(all_videos(pool)), "a video lost all its labels"
    return set(videos_of)


def assert_centroids_of_version(pool: Pool, version: int, labels: dict[str, int], keys: set[str] | None = None) -> None:
    """The centroids published by ``version`` are exactly the identities of ``keys`` (default: all),
    each the unit mean of its members' features computed here independently with the same
    weights, in its own video. The latest version is read as trainers read it (the store's
    ``changes_since``), an older one from the store's folder."""
    if version == ray.get(pool.store.latest.remote())[0]:
        delta = ray.get(pool.store.changes_since.remote(version - 1))
        assert delta.version == version
        ids, centroids, videos = delta.centroid_ids, delta.centroids, delta.centroid_videos
    else:
        ids, centroids, videos = LabelTable(pool.label_dir).centroids_between(version - 1, version)
    in_use = {g for k, g in labels.items() if g >= 0 and (keys is None or k in keys)}
    assert sorted(ids.tolist()) == sorted(in_use)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)

    index = pq.read_table(pool.label_dir / "index.parquet").to_pydict()
    assert len(set(index["tar"])) == 1  # one shard: one read covers the whole index, in index order
    worker = LabelingWorkerService(pool.cfg.model, pool.cfg.data.transform, pool.cfg.labeling.embed_batch_size)
    worker.model.load_state_dict(_initial_momentum_state(pool.cfg))
    feat_ND = worker.embed({"reads": [(index["tar"][0], index["offset"], index["size"])]})
    label_N = np.array([labels[k] for k in index["key"]])
    for g, row, video in zip(ids, centroids, videos):
        members = label_N == g
        mean = feat_ND[members].sum(0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-4)
        assert set(np.asarray(index["video"])[members].tolist()) == {int(video)}


def _counters_after_restart(pool) -> dict | None:
    """The restarted coordinator's counters, or None while it is still starting (a call to it can
    outwait a short timeout on a loaded box)."""
    try:
        return ray.get(pool.coordinator.stats.remote(), timeout=30)["counters"]
    except ray.exceptions.GetTimeoutError:
        return None


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout_s} s: {condition}")


def partition(labels: dict[str, int]) -> set[frozenset[str]]:
    groups = defaultdict(set)
    for key, g in labels.items():
        if g >= 0:
            groups[g].add(key)
    return {frozenset(keys) for keys in groups.values()}


def changed_keys(pool: Pool, version: int) -> set[str]:
    rows, _ = LabelTable(pool.label_dir).read_delta(version)
    return {pool.keys[r] for r in rows.tolist()}


def test_dynamix_rounds_publish_whole_versions(dynamix_pool):
    pool = dynamix_pool
    first = ray.get(pool.store.latest.remote())[0]
    seen, errors, stop = set(), [], threading.Event()

    def reader():  # what a trainer and an auditor do while rounds commit
        while not stop.is_set():
            try:
                delta = ray.get(pool.store.changes_since.remote(None))
                _, pids = delta.labels()
                assert delta.full and len(pids) == len(pool.keys), f"v{delta.version}: {len(pids)} rows"
                seen.add(delta.version)
                for path in pool.label_dir.glob("v*.snap.npy"):
                    rows = len(np.load(path))
                    assert rows == len(pool.keys), f"{path.name}: {rows} rows"
            except Exception as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(repr(exc))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        step = next(STEPS)
        pool.publish(step)
        for _ in range(2):  # all videos each time: a pass ends and the next may relabel them again
            pool.run_round(step, all_videos(pool))
    finally:
        stop.set()
        thread.join(timeout=60)
    latest = ray.get(pool.store.latest.remote())[0]
    assert latest == first + 2
    assert not errors, errors[:3]
    assert {first, latest} <= seen, f"the reader saw versions {sorted(seen)}, not the rounds' commits"
    for record in pool.history()[-2:]:
        assert record["videos_relabeled"] == all_videos(pool) and record["step"] == step
    labels = pool.labels(latest)
    assert_valid_partition(pool, labels)
    assert_centroids_of_version(pool, latest, labels)


def test_stale_round_is_discarded(dynamix_pool):
    pool = dynamix_pool
    before_history, before = pool.history(), pool.stats()["counters"]
    weights_step = next(STEPS)
    pool.publish(weights_step)
    # trainers have moved past the weights' step by more than max_staleness
    pool.run_round(weights_step + MAX_STALENESS + 1, all_videos(pool))
    after = pool.stats()["counters"]
    assert after.get("rounds_stale", 0) == before.get("rounds_stale", 0) + 1
    assert after.get("rounds", 0) == before.get("rounds", 0)
    assert pool.history() == before_history


def test_full_queue_drops_the_oldest_requests(dynamix_pool, tmp_path):
    pool = dynamix_pool
    step = next(STEPS)
    pool.publish(step)
    before = pool.stats()["counters"].get("requests_dropped", 0)
    first = ray.get(pool.store.latest.remote())[0]
    # keep a round in flight (worker 0 is held in a call that waits on a FIFO) so the dispatch thread
    # takes nothing off the queue while three more requests arrive against a queue of one
    fifo = tmp_path / "held.fifo"
    os.mkfifo(fifo)
    held = ray.get(pool.coordinator.workers_for_test.remote())[0].embed.remote({"reads": [(str(fifo), [512], [1])]})
    ray.get(pool.coordinator.request.remote(0, step, all_videos(pool)))
    wait_until(lambda: pool.stats()["in_flight"])
    accepted = [ray.get(pool.coordinator.request.remote(0, step, videos)) for videos in ([0, 1], [2, 3], [4, 5])]
    assert accepted == [True, False, False]  # False: the queue was full and an older request went
    stats = pool.stats()
    assert stats["in_flight"] and stats["queued"] == 1
    assert stats["counters"]["requests_dropped"] == before + 2
    try:  # release worker 0: its held call fails on the FIFO, the round goes on
        with open(fifo, "wb") as fh:
            fh.write(b"x")
    except BrokenPipeError:  # the held call opened the FIFO with us and already failed on it (a FIFO cannot seek)
        pass
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(held, timeout=60)
    assert ray.get(pool.coordinator.wait_idle.remote(timeout_s=180))
    history = pool.history()
    assert [r["version"] for r in history[-2:]] == [first + 1, first + 2]
    assert history[-2]["videos_relabeled"] == all_videos(pool)
    assert history[-1]["videos_relabeled"] == [4, 5]  # of the queued requests, the newest is the one kept


def test_remix_round_labels_every_requested_video(remix_pool):
    pool = remix_pool
    pool.publish(next(STEPS))
    pool.run_round(0, all_videos(pool))
    latest = ray.get(pool.store.latest.remote())[0]
    labels = pool.labels(latest)
    in_use = assert_valid_partition(pool, labels)
    assert len(in_use) > len(all_videos(pool))  # eps 0.05 gives several pseudo-identities per video
    assert_centroids_of_version(pool, latest, labels)


def test_repeated_remix_rounds_reuse_retired_identity_numbers(ray_local, shards, tmp_path):
    """A ReMix round renumbers the clusters of the videos it relabels. Without reuse the numbers
    (and each trainer's bank rows) grow by those clusters every round; with it, the 4th round over
    the same two videos takes the numbers the 2nd retired (the 3rd could not: the newest commit's
    retirements are held back one commit). Every version stays a valid partition with exactly
    its identities' centroids published."""
    pool = start_pool(shards, tmp_path, "remix")
    try:
        some = all_videos(pool)[:2]
        in_some = {k for k, v in zip(pool.keys, pool.video.tolist()) if v in some}
        ids_of_some = []
        for videos in (all_videos(pool), some, some, some):
            pool.publish(next(STEPS))
            pool.run_round(0, videos)
            latest = ray.get(pool.store.latest.remote())[0]
            labels = pool.labels(latest)
            assert_valid_partition(pool, labels)
            assert_centroids_of_version(pool, latest, labels, None if videos is not some else in_some)
            ids_of_some.append({labels[k] for k in in_some if labels[k] >= 0})
        first, second, third, fourth = ids_of_some
        total = ray.get(pool.store.current.remote())["num_identities"]
        assert not (first & second) and not (third & (first | second))  # nothing free yet, or held back
        assert fourth & first, "round 4 reused none of the numbers round 2 retired"
        assert fourth <= first | set(range(max(third) + 1, total))
        # only round 4's identities without a reused number got new ones
        assert total == max(third) + 1 + len(fourth - first) < max(third) + 1 + len(fourth)
    finally:
        pool.close()


def test_a_round_publishes_its_results_as_they_come_not_whole(ray_local, shards, tmp_path):
    """A round is not collected whole before it is published (the first ReMix round covers every
    video of the run: held whole, it would cost memory growing with the run). With one video per chunk and commits of two videos, a round over the 6
    videos publishes 3 versions of 2 videos each. Each changes only its videos' rows and publishes
    exactly its identities' centroids (unit means of features computed here); after the last, every
    video is labelled. The coordinator never held more chunks than its 2 x pool_size out at once plus
    one commit's worth."""
    pool = start_pool(shards, tmp_path, "remix", "labeling.chunk_videos=1", "labeling.commit_videos=2")
    try:
        videos = all_videos(pool)
        pool.publish(next(STEPS))
        first = ray.get(pool.store.latest.remote())[0]
        pool.run_round(0, videos)
        latest = ray.get(pool.store.latest.remote())[0]
        assert latest == first + 3
        history = pool.history()[-3:]
        assert [r["version"] for r in history] == [first + 1, first + 2, first + 3]
        assert [len(r["videos_relabeled"]) for r in history] == [2, 2, 2]
        assert sorted(v for r in history for v in r["videos_relabeled"]) == videos
        for record in history:
            in_commit = {k for k, v in zip(pool.keys, pool.video.tolist()) if v in record["videos_relabeled"]}
            changed = changed_keys(pool, record["version"])
            assert changed and changed <= in_commit
            assert_centroids_of_version(pool, record["version"], pool.labels(record["version"]), in_commit)
        assert_valid_partition(pool, pool.labels(latest))
        stats = pool.stats()
        assert stats["counters"]["rounds"] == 1 and stats["counters"]["commits"] == 3
        assert len(stats["reports"]) == 3
        assert 1 <= stats["peak_chunks_held"] <= 2 * 2 + 2
    finally:
        pool.close()


def test_killing_a_pool_actor_mid_round_loses_nothing(remix_pool, tmp_path):
    pool = remix_pool
    pool.publish(next(STEPS))
    videos = all_videos(pool)
    pool.run_round(0, videos)  # the reference round, nothing killed
    reference = ray.get(pool.store.latest.remote())[0]
    retries = pool.stats()["counters"].get("chunk_retries", 0)

    # Hold worker 0 in a call that cannot finish (it opens a FIFO nobody writes to), so the round's
    # chunk sent to it is surely still in flight when the worker is killed.
    victim = ray.get(pool.coordinator.workers_for_test.remote())[0]
    fifo = tmp_path / "never_written.fifo"
    os.mkfifo(fifo)
    blocked = victim.embed.remote({"reads": [(str(fifo), [512], [1])]})
    ray.get(pool.coordinator.request.remote(0, 0, videos))
    wait_until(lambda: pool.stats()["in_flight"])
    time.sleep(2.0)  # in flight = picked; the chunks go out once the current labels are read (milliseconds)
    ray.kill(victim, no_restart=False)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(blocked, timeout=60)
    assert ray.get(pool.coordinator.wait_idle.remote(timeout_s=180))

    stats = pool.stats()
    assert stats["counters"]["chunk_retries"] == retries + 1
    latest = ray.get(pool.store.latest.remote())[0]
    assert latest == reference + 1
    history = {r["version"]: r for r in pool.history()}
    assert history[latest]["videos_relabeled"] == history[reference]["videos_relabeled"] == videos
    # same relabeled keys, same grouping (ids are fresh each round: compare the partitions)
    assert partition(pool.labels(latest)) == partition(pool.labels(reference))
    assert changed_keys(pool, latest) == changed_keys(pool, reference)


@pytest.mark.slow
def test_a_chunk_that_keeps_losing_its_actor_fails_the_round_with_its_cause(ray_local, shards, tmp_path):
    """Retries are capped (labeling.max_chunk_retries): the round fails, is counted and its cause is
    kept, and the driver's wait for the first ReMix round stops with that cause instead of training
    on no labels."""
    from pipelines.train.driver import _wait_first_round

    pool = start_pool(shards, tmp_path, "remix", "labeling.max_chunk_retries=0")
    try:
        pool.publish(next(STEPS))
        workers = ray.get(pool.coordinator.workers_for_test.remote())
        ray.get([w.ping.remote() for w in workers], timeout=120)  # up: a call queued for a dying actor would be replayed
        victim = workers[0]
        fifo = tmp_path / "never_written.fifo"
        os.mkfifo(fifo)
        blocked = victim.embed.remote({"reads": [(str(fifo), [512], [1])]})  # holds the victim's chunk in flight
        ray.get(pool.coordinator.request.remote(0, 0, all_videos(pool)))
        wait_until(lambda: pool.stats()["in_flight"])
        time.sleep(2.0)
        ray.kill(victim, no_restart=False)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(blocked, timeout=60)
        assert ray.get(pool.coordinator.wait_idle.remote(timeout_s=180))
        stats = pool.stats()
        assert stats["counters"]["round_errors"] == 1 and "chunk_retries" not in stats["counters"]
        assert "lost its actor 1 times" in stats["errors"][-1] and "max_chunk_retries=0" in stats["errors"][-1]
        assert ray.get(pool.store.latest.remote())[0] == 0  # nothing was published
        with pytest.raises(RuntimeError, match="first ReMix round failed, so .*: round at step 0: RuntimeError: .*lost its actor 1 times"):
            _wait_first_round(pool.coordinator, pool.store, timeout_s=10, progress=False)
    finally:
        pool.close()


def test_store_refuses_a_second_root_under_the_same_run_name(ray_local, tmp_path):
    name = f"store-root-{uuid.uuid4().hex[:8]}"
    store = get_or_create_store(name, str(tmp_path / "a"))
    try:
        assert get_or_create_store(name, str(tmp_path / "a")) is not None  # same folder: found by name
        with pytest.raises(ValueError, match=f"serves {tmp_path / 'a'}, not {tmp_path / 'b'}"):
            get_or_create_store(name, str(tmp_path / "b"))
    finally:
        ray.kill(store, no_restart=True)


def test_first_remix_round_timeout_fails_the_run_and_stops_its_actors(ray_local, tmp_path):
    from conftest import make_tiny_reid
    from pipelines.train.driver import run_training
    from services.label_store import store_actor_name
    from services.labeling_pool import coordinator_name

    root = make_tiny_reid(tmp_path, num_videos=4)
    shards = root / "shards"
    name = f"first-round-{uuid.uuid4().hex[:8]}"
    cfg = load_config(TrainConfig, None, [
        "method=remix", f"run.name={name}", f"run.storage={tmp_path / 'runs'}", "run.max_steps=4", "run.log_every=4",
        f"data.multi=[{shards / 'synth_m0'}]", f"data.single=[{shards / 'synth_video'}]",
        "data.transform.height=32", "data.transform.width=16", "model.backbone=test_vit", "model.img_size=[32,16]",
        "labeling.first_round_timeout_s=0.5", "labeling.cpus_per_actor=0.25",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(TimeoutError, match="first ReMix round .* did not finish in 0 s.*first_round_timeout_s"):
        run_training(cfg, progress=False)
    for actor in (coordinator_name(name), store_actor_name(name)):
        with pytest.raises(ValueError):
            ray.get_actor(actor, namespace="dynamix")


@pytest.mark.slow
def test_a_restarted_coordinator_keeps_its_relabel_pass(ray_local, shards, tmp_path):
    """The coordinator is killed (and restarts by itself) after relabelling part of a pass: the
    videos done in that pass are not relabelled again, the others still are."""
    pool = start_pool(shards, tmp_path, "dynamix")
    try:
        videos = all_videos(pool)
        done, rest = videos[:2], videos[2:]
        step = next(STEPS)
        pool.publish(step)
        pool.run_round(step, done)
        version = ray.get(pool.store.latest.remote())[0]
        assert pool.history()[-1]["videos_relabeled"] == done

        ray.kill(pool.coordinator, no_restart=False)
        wait_until(lambda: _counters_after_restart(pool) == {}, timeout_s=300)
        pool.publish(step)  # the restarted actor has no weights until the trainers publish again
        pool.run_round(step, done)  # all of them done in this pass: no round
        assert ray.get(pool.store.latest.remote())[0] == version
        pool.run_round(step, videos)  # only the ones not yet relabelled in this pass
        assert ray.get(pool.store.latest.remote())[0] == version + 1
        assert pool.history()[-1]["videos_relabeled"] == rest
    finally:
        pool.close()


def test_restarted_trainers_reset_the_coordinators_step(dynamix_pool):
    """The trainers die at step S + 100 and resume from the checkpoint of step S: the coordinator
    forgets the dead group's weights and step. The next round runs on the restarted trainers'
    weights of step S and is published (before, ``latest_step`` stayed at S + 100, so every round
    on the resumed weights counted as stale until the trainers caught up)."""
    pool = dynamix_pool
    resumed = next(STEPS)
    dead = resumed + 100 + MAX_STALENESS
    pool.publish(dead)
    ray.get(pool.coordinator.request.remote(0, dead, []))  # the dead group's last request
    restarts = pool.stats()["counters"].get("trainer_restarts", 0)
    ray.get(pool.coordinator.trainers_restarted.remote(resumed))
    pool.publish(resumed)
    before = pool.stats()["counters"]
    pool.run_round(resumed, all_videos(pool))
    after = pool.stats()["counters"]
    assert after.get("rounds_stale", 0) == before.get("rounds_stale", 0)
    assert after.get("rounds", 0) == before.get("rounds", 0) + 1
    assert pool.stats()["reports"][-1]["weights_step"] == resumed
    assert after["trainer_restarts"] == restarts + 1
