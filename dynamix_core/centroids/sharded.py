"""Centroid bank sharded by identity across data-parallel ranks (loss mode ``sharded``, SPEC 2.3b).

Row ownership is **modulo**: rank ``r`` of ``W`` holds the identities ``g`` with ``g % W == r``, at
local row ``g // W``. Modulo rather than contiguous ranges because identities are created while
training runs (the Relabeling Module splits tracklets): growing the bank then appends a few rows to
every shard instead of moving whole ranges between ranks, and new identities spread evenly.

Loss (a model-parallel softmax, as in Partial-FC / Megatron's vocab-parallel cross-entropy):
  1. all-gather every rank's features, pids, temperatures and videos (G = W * B anchors);
  2. each rank runs the chunked softmax of all G anchors over its own rows (``softmax_stats``);
  3. ``all_reduce(MAX)`` of the running maxima, rescale, then one ``all_reduce(SUM)`` of the
     packed sum-exp, softmax-weighted row sum and the positive row (only its owner contributes it);
  4. each rank keeps its own B anchors: loss and its analytic gradient.
Every rank must pass the same batch size B (as data-parallel training does).

Normalisation: the loss a rank returns is the mean over **its own** B anchors, exactly what
``CentroidBank(loss_mode="all")`` returns for those anchors on the full, replicated bank, with the
same gradient w.r.t. the rank's features. A rank's loss does not depend on other ranks' features
(they only share the centroids, which take no gradient), so the backward pass needs no
communication, and data-parallel gradient averaging yields the global-batch mean, as for the
other losses.

Legend: B anchors of this rank, G = W * B anchors of all ranks, D feature dim, N rows of this shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dynamix_core.centroids.bank import CentroidBank
from dynamix_core.centroids.config import CentroidBankConfig
from dynamix_core.centroids.softmax import RowMask, cross_entropy_from_stats, softmax_stats
from dynamix_core.config import ConfigError
from dynamix_core.losses.common import domain_mean


def owner_rank(bank_id, world_size: int):
    """The rank whose shard holds bank row ``bank_id`` (an int, array or tensor of global identity
    ids): the one ownership rule of the sharded bank, also used by the label store to send each rank
    only its own published centroids."""
    return bank_id % world_size


def _all_gather_cat(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenation, in rank order, of every rank's ``tensor`` (all of the same shape)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class ShardedCentroidBank(CentroidBank):
    """This rank's shard of the centroid bank (rows ``g`` with ``g % world_size == rank``).

    Needs an initialised ``torch.distributed`` process group; every method that takes a batch is a
    collective (all ranks call it together, with equal batch sizes). ``load_rows``/``reinit`` take
    the same published table on every rank and keep the rows this rank owns."""

    def __init__(self, num_identities: int, dim: int, cfg: CentroidBankConfig, *,
                 device: torch.device | str | None = None, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        super().__init__(num_identities, dim, cfg, device=device)

    def _check_mode(self, cfg: CentroidBankConfig) -> None:
        if cfg.loss_mode != "sharded":
            raise ConfigError(
                f"centroids.loss_mode={cfg.loss_mode} is a replicated mode: use CentroidBank "
                "(ShardedCentroidBank implements loss_mode=sharded)"
            )

    def _num_local_rows(self, num_identities: int) -> int:
        return max(0, -(-(num_identities - self.rank) // self.world_size))

    def _local_rows(self, pid_B: Tensor) -> tuple[Tensor, Tensor]:
        return owner_rank(pid_B, self.world_size) == self.rank, pid_B // self.world_size

    def global_ids(self) -> Tensor:
        local_N = torch.arange(self.centroids.shape[0], device=self.centroids.device)
        return local_N * self.world_size + self.rank

    def state_dict(self) -> dict[str, Tensor | int]:
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore this rank's own shard (saved by the same rank of a run with as many ranks)."""
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise ValueError(
                f"ShardedCentroidBank.load_state_dict: the checkpoint holds the shard of rank {state.get('rank')} "
                f"of {state.get('world_size')}, this is rank {self.rank} of {self.world_size}; load each rank's own "
                "shard, with the same number of ranks"
            )
        super().load_state_dict(state)

    @torch.no_grad()
    def update(self, feat_BD: Tensor, pid_B: Tensor, step: int) -> None:
        """Momentum update from the momentum features of **all** ranks' batches (all-gathered);
        this rank writes only the rows it owns. Collective."""
        self._check_pids(pid_B)
        feat_GD = _all_gather_cat(feat_BD.float(), self.group)
        pid_G = _all_gather_cat(pid_B, self.group)
        self._momentum_update(feat_GD, pid_G, step)

    def loss(self, feat_BD: Tensor, pid_B: Tensor, tau_B: Tensor, video_B: Tensor | None = None,
             is_single_B: Tensor | None = None) -> Tensor:
        """Centroids loss over every centroid of every shard: the mean over this rank's anchors,
        equal (value and gradient) to the replicated ``all`` mode. Collective."""
        self._check_pids(pid_B)
        video_B = self._check_video(video_B)
        num_local = feat_BD.shape[0]
        with torch.no_grad():
            feat_GD = _all_gather_cat(feat_BD.detach().float(), self.group)
            # one gather for the per-anchor scalars: ids and videos are exact in float64
            video_or_none_B = pid_B.new_full(pid_B.shape, -1) if video_B is None else video_B
            meta_B3 = torch.stack([pid_B.double(), tau_B.double(), video_or_none_B.double()], dim=1)
            meta_G3 = _all_gather_cat(meta_B3, self.group)
            pid_G = meta_G3[:, 0].long()
            inv_tau_G = 1.0 / meta_G3[:, 1].float()
            # never-written rows are masked on every shard (a shard may hold none: no collective depends on it)
            mask = RowMask(pid_G, None if video_B is None else meta_G3[:, 2].long(), self.global_ids(),
                           self.row_video, self.last_updated_step < 0)

            max_G, sumexp_G, weighted_GD = softmax_stats(feat_GD, inv_tau_G, self.centroids, self.cfg.chunk_rows, mask)
            global_max_G = max_G.clone()
            dist.all_reduce(global_max_G, op=dist.ReduceOp.MAX, group=self.group)
            rescale_G = torch.exp(max_G - global_max_G)
            owned_G, local_G = self._local_rows(pid_G)
            positive_GD = torch.zeros_like(feat_GD)
            positive_GD[owned_G] = self.centroids[local_G[owned_G]].float()
            packed_GX = torch.cat([(sumexp_G * rescale_G)[:, None], weighted_GD * rescale_G[:, None], positive_GD], 1)
            dist.all_reduce(packed_GX, op=dist.ReduceOp.SUM, group=self.group)

            mine = slice(self.rank * num_local, (self.rank + 1) * num_local)
            dim = feat_BD.shape[1]
            sumexp_B = packed_GX[mine, 0]
            weighted_BD = packed_GX[mine, 1:1 + dim]
            positive_BD = packed_GX[mine, 1 + dim:]
        loss_B = cross_entropy_from_stats(feat_BD, inv_tau_G[mine], global_max_G[mine], sumexp_B, weighted_BD,
                                          positive_BD)
        return domain_mean(loss_B, None, is_single_B)
