"""ShardedCentroidBank on 2 gloo processes equals the replicated bank (mode ``all``) on the full rows:
same loss, same gradients w.r.t. each rank's features, same rows after a momentum update."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from dynamix_core.centroids import CentroidBank, CentroidBankConfig, ShardedCentroidBank, build_centroid_bank

WORLD = 2
NUM_IDS = 11  # odd: the two shards hold 6 and 5 rows
DIM = 6
BATCH = 5
ROW_VIDEO = [-1, -1, -1, 4, 4, 4, 4, 8, 8, 9, 9]


def unit(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=gen), dim=1)


def rank_batch(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of ``rank`` (same on every process; identities shared across ranks on purpose)."""
    gen = torch.Generator().manual_seed(seed * 10 + rank)
    pid = torch.randint(0, NUM_IDS, (BATCH,), generator=gen)
    video = torch.tensor([ROW_VIDEO[p] for p in pid])
    tau = torch.where(video >= 0, 0.1, 0.05)
    return unit(BATCH, seed * 10 + rank), pid, tau, video


def loss_and_grad(bank, feat, pid, tau, video, is_single=None):
    feat = feat.clone().requires_grad_(True)
    loss = bank.loss(feat, pid, tau, video, is_single)
    loss.backward()
    return loss.detach(), feat.grad


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for mask in (False, True):
            common = dict(mask_same_video=mask, chunk_rows=4)
            sharded = build_centroid_bank(CentroidBankConfig(loss_mode="sharded", **common), NUM_IDS, DIM)
            replicated = CentroidBank(NUM_IDS, DIM, CentroidBankConfig(loss_mode="all", **common))
            assert isinstance(sharded, ShardedCentroidBank)
            assert sharded.global_ids().tolist() == list(range(rank, NUM_IDS, WORLD))
            for bank in (sharded, replicated):  # the same published table on every rank
                bank.load_rows(torch.arange(NUM_IDS), unit(NUM_IDS, seed=1), step=0,
                               video_M=torch.tensor(ROW_VIDEO))

            feat, pid, tau, video = rank_batch(rank, seed=2)
            loss, grad = loss_and_grad(sharded, feat, pid, tau, video)
            ref_loss, ref_grad = loss_and_grad(replicated, feat, pid, tau, video)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
            # per-domain means (loss.anchor_mean=per_domain): the same on both banks
            loss, grad = loss_and_grad(sharded, feat, pid, tau, video, video >= 0)
            ref_loss, ref_grad = loss_and_grad(replicated, feat, pid, tau, video, video >= 0)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)

            # momentum update: each rank's batch on the shard == the global batch on the replica
            batches = [rank_batch(r, seed=3) for r in range(WORLD)]
            sharded.update(batches[rank][0], batches[rank][1], step=5)
            replicated.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), step=5)
            own = sharded.global_ids()
            torch.testing.assert_close(sharded.centroids, replicated.centroids[own], atol=0, rtol=0)
            assert torch.equal(sharded.last_updated_step, replicated.last_updated_step[own])
            assert torch.equal(sharded.row_video, replicated.row_video[own])

        # checkpoints: a rank restores its own shard only
        restored = ShardedCentroidBank(1, DIM, CentroidBankConfig(loss_mode="sharded"))
        restored.load_state_dict(sharded.state_dict())
        assert torch.equal(restored.centroids, sharded.centroids) and restored.num_identities == NUM_IDS
        with pytest.raises(ValueError, match="own shard"):
            restored.load_state_dict({**sharded.state_dict(), "rank": 1 - rank})

        # growth from a published table: every rank keeps only its own new rows
        sharded.reinit(unit(3, seed=4), torch.tensor([12, 14, 12]), step=6)
        assert sharded.num_identities == 15
        assert sharded.global_ids().tolist() == list(range(rank, 15, WORLD))
        assert sharded.last_updated_step[sharded.global_ids() >= NUM_IDS].tolist() == (
            [6, 6] if rank == 0 else [-1, -1])
    finally:
        dist.destroy_process_group()


def test_sharded_bank_equals_replicated_bank():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
