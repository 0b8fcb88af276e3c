"""The trainers' side of the labeling service (pipelines/train/labels.py) with the real label store:
published centroids reach the rank that owns their bank row (sharded bank, 2 gloo processes, an odd
number of multi-camera identities), every rank's bank spans every identity, and ``poll`` moves the
label map, the sampler's buffered videos and the bank to a new version; ``resume`` hands back the
checkpoint's version."""

from __future__ import annotations

import itertools

import os
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from dynamix_core.centroids import CentroidBankConfig, build_centroid_bank
from pipelines.train.labels import LabelClient
from services.label_store import LabelStore

WORLD = 2
BANK_OFFSET = 5  # odd: single identity g is bank row 5 + g, so g's parity is not its owner's
DIM = 4
KEYS = [f"k{i}" for i in range(8)]  # row i of the run's index
PIDS_V0 = np.array([0, 0, 1, 1, 2, 2, -1, -1])
#: v1 publishes identities 0..3 (3 is new: rows 6, 7) and relabels rows 6, 7
PUBLISHED = np.arange(4)
CENTROIDS = np.random.default_rng(0).normal(size=(4, DIM)).astype(np.float32)
VIDEOS = np.array([10, 10, 11, 12])


def build_store(root) -> LabelStore:
    svc = LabelStore(str(root))
    svc.initialise(PIDS_V0)
    svc.commit([6, 7], [3, 3], step=4, centroid_ids=PUBLISHED, centroids=CENTROIDS, centroid_videos=VIDEOS)
    return svc


def _rank(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        svc = LabelStore(root)
        # the bank the worker builds from the index: multi identities + the initial single ones
        bank = build_centroid_bank(CentroidBankConfig(loss_mode="sharded", storage_dtype="float32"),
                                   BANK_OFFSET + 3, DIM)
        client = LabelClient(None, None, rank=rank, world_size=WORLD, sharded=True, bank_offset=BANK_OFFSET,
                             version=None)
        client.apply_centroids(bank, svc.changes_since(**client.query(None)), step=7)

        # every rank spans every identity of the version (5 multi + 4 single), whichever it owns
        assert bank.num_identities == BANK_OFFSET + 4
        bank._check_pids(torch.tensor([BANK_OFFSET + 3]))  # any rank may sample the new identity
        # the rows written here are exactly the published ones this rank owns, with their values
        written = bank.global_ids()[bank.last_updated_step == 7].tolist()
        expected = [BANK_OFFSET + g for g in PUBLISHED.tolist() if (BANK_OFFSET + g) % WORLD == rank]
        assert written == expected, (rank, written, expected)
        for row in expected:
            local = row // WORLD
            want = CENTROIDS[row - BANK_OFFSET] / np.linalg.norm(CENTROIDS[row - BANK_OFFSET])
            np.testing.assert_allclose(bank.centroids[local].numpy(), want, rtol=0, atol=1e-6)
            assert int(bank.row_video[local]) == VIDEOS[row - BANK_OFFSET]
        counts = torch.tensor([len(written)])
        dist.all_reduce(counts)
        assert int(counts) == len(PUBLISHED)  # every published centroid landed on some rank
    finally:
        dist.destroy_process_group()


def test_sharded_centroids_land_on_the_owning_rank(tmp_path):
    build_store(tmp_path)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)


@pytest.mark.ray
def test_poll_switches_labels_buffer_and_bank_and_resume_returns_the_checkpoint_version(ray_local, tmp_path):
    import threading

    from dynamix_core.sampling import SingleCameraSampler
    from dynamix_core.data.train_sets import RankVideos, VideoFeed
    from services.label_store import get_or_create_store

    name = f"client-{uuid.uuid4().hex[:6]}"
    store = get_or_create_store(name, str(tmp_path))
    try:
        ray_local.get(store.initialise.remote(PIDS_V0))
        client = LabelClient(store, None, rank=0, world_size=1, sharded=False, bank_offset=BANK_OFFSET, version=None)
        bank = build_centroid_bank(CentroidBankConfig(storage_dtype="float32"), BANK_OFFSET + 3, DIM)
        labels = client.initial_labels(bank, step=0)
        assert labels.dtype == np.int32 and labels.tolist() == PIDS_V0.tolist() and client.version == 0
        # the video of rows 4..7, buffered (its images are not needed here: a stream of its keys)
        videos = RankVideos("", video=[11], row_start=[4], count=[4], tar=[""])
        feed = VideoFeed(videos, labels, BANK_OFFSET,
                         stream=lambda _, p: ((q, KEYS[4:], [b""] * 4) for q in itertools.count(p)))
        sampler = SingleCameraSampler(feed, images_per_id=2, buffer_size=1, max_video_uses=2)
        assert sampler.buffered_video_ids() == [11]

        ray_local.get(store.commit.remote([6, 7], [3, 3], step=4, centroid_ids=PUBLISHED,
                                          centroids=CENTROIDS, centroid_videos=VIDEOS))
        switched = False
        for _ in range(200):  # the store's answer arrives asynchronously: poll never waits for it
            switched = client.poll(sampler, feed, bank, threading.Lock(), step=9)
            if switched:
                break
            ray_local.get(store.latest.remote())
        assert switched and client.version == 1
        assert feed.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert sampler.state_dict()["buffer"][0]["pids"] == [BANK_OFFSET + p for p in (2, 2, 3, 3)]
        assert bank.num_identities == BANK_OFFSET + 4
        assert bank.global_ids()[bank.last_updated_step == 9].tolist() == (BANK_OFFSET + PUBLISHED).tolist()

        # a restart from a checkpoint taken at version 0 gets version 0's table, not the latest
        restarted = LabelClient(store, None, rank=0, world_size=1, sharded=False, bank_offset=BANK_OFFSET,
                                version=None)
        assert restarted.resume(0).tolist() == PIDS_V0.tolist() and restarted.version == 0
    finally:
        ray_local.kill(store, no_restart=True)
