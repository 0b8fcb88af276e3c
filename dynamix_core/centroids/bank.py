"""The centroid bank: one unit centroid per identity, stored in fp16, updated by momentum (SPEC 2.3b).

Rows are indexed by the global identity index ``0..N-1`` that covers every multi-camera and
single-camera identity. Each row also keeps the video of its identity (-1 for multi-camera
identities; used to mask same-video negatives) and the step it was last written at (staleness).

    bank = CentroidBank(num_identities, 768, CentroidBankConfig())
    bank.reinit(feat_MD, pid_M, step=0, video_M=video_M)         # members' mean, e.g. at start
    loss = bank.loss(z_BD, pid_B, bank.temperatures(is_single_B), video_B)
    loss.backward()                                                 # gradients reach z only
    bank.update(z_momentum_BD, pid_B, step)                         # c <- mu c + (1-mu) mean, renormalised

This class holds every row on one process (modes ``all`` and ``sampled``);
:class:`~dynamix_core.centroids.sharded.ShardedCentroidBank` splits the rows across ranks and
overrides the few methods that know where a row lives.

Legend: B anchors of the batch, D feature dim, N rows held here, M members/identities to write,
U unique identities, K sampled negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dynamix_core.centroids.config import CentroidBankConfig
from dynamix_core.centroids.softmax import RowMask, cross_entropy_over_rows, hardest_rows
from dynamix_core.config import ConfigError
from dynamix_core.losses.common import domain_mean


class CentroidBank:
    """All ``num_identities`` centroids on one device (loss modes ``all`` and ``sampled``)."""

    def __init__(self, num_identities: int, dim: int, cfg: CentroidBankConfig,
                 *, device: torch.device | str | None = None) -> None:
        self._check_mode(cfg)
        self.cfg = cfg
        self.dim = dim
        self.num_identities = num_identities
        num_rows = self._num_local_rows(num_identities)
        self.centroids = torch.zeros(num_rows, dim, dtype=cfg.dtype, device=device)
        self.row_video = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
        # -1 = never written; a zero row has logit 0 for everyone, so initialise rows before training
        self.last_updated_step = torch.full((num_rows,), -1, dtype=torch.int64, device=device)

    # --- where rows live (overridden by the sharded bank) -------------------------------------

    def _check_mode(self, cfg: CentroidBankConfig) -> None:
        if cfg.loss_mode == "sharded":
            raise ConfigError("centroids.loss_mode=sharded needs ShardedCentroidBank (or build_centroid_bank)")

    def _num_local_rows(self, num_identities: int) -> int:
        return num_identities

    def _local_rows(self, pid_B: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(owned_B or None when all are owned, local row index_B)`` of global identity ids."""
        return None, pid_B

    def global_ids(self) -> Tensor:
        """Global identity id of every row held here."""
        return torch.arange(self.centroids.shape[0], device=self.centroids.device)

    # --- writing rows --------------------------------------------------------------------------

    def resize(self, new_num_identities: int) -> None:
        """Grow the bank to ``new_num_identities`` identities; new rows are zero and never written.

        Storage grows geometrically (to at least twice the rows held), so identities arriving a few
        per label version cost amortised O(1) per row instead of a copy of the bank per version;
        the spare rows are zero / -1 and not part of :meth:`state_dict`."""
        if new_num_identities < self.num_identities:
            raise ValueError(
                f"CentroidBank.resize: cannot shrink from {self.num_identities} to {new_num_identities} identities "
                "(identity indices are never reused)"
            )
        rows = self._num_local_rows(new_num_identities)
        storage = self.centroids if self.centroids._base is None else self.centroids._base
        capacity = storage.shape[0]
        if rows > capacity:
            capacity = max(rows, 2 * capacity, 16)
            held = self.centroids.shape[0]
            grown = [self.centroids.new_zeros(capacity, self.dim), self.row_video.new_full((capacity,), -1),
                     self.last_updated_step.new_full((capacity,), -1)]
            for new_t, old_t in zip(grown, (self.centroids, self.row_video, self.last_updated_step)):
                new_t[:held] = old_t
            self.centroids, self.row_video, self.last_updated_step = grown
        self.centroids = _rows_of(self.centroids, rows)
        self.row_video = _rows_of(self.row_video, rows)
        self.last_updated_step = _rows_of(self.last_updated_step, rows)
        self.num_identities = new_num_identities

    @torch.no_grad()
    def load_rows(self, pid_M: Tensor, centroid_MD: Tensor, *, step: int, video_M: Tensor | None = None) -> None:
        """Overwrite the rows of identities ``pid_M`` (distinct) with ``centroid_MD`` (renormalised).

        Rows this process does not own are skipped, so every rank can be handed the same published
        table. The bank grows when an id is >= the current identity count. ``video_M`` (-1 for
        multi-camera identities) sets the rows' videos; without it they keep theirs."""
        self._check_pids(pid_M, allow_growth=True)
        if len(pid_M) == 0:
            return
        needed = int(pid_M.max()) + 1
        if needed > self.num_identities:
            self.resize(needed)
        owned_M, local_M = self._local_rows(pid_M)
        rows_MD = F.normalize(centroid_MD.float(), dim=1)
        if owned_M is not None:
            local_M, rows_MD = local_M[owned_M], rows_MD[owned_M]
            video_M = None if video_M is None else video_M[owned_M]
        self.centroids[local_M] = rows_MD.to(self.centroids.dtype)
        self.last_updated_step[local_M] = step
        if video_M is not None:
            self.row_video[local_M] = video_M.to(self.row_video)

    @torch.no_grad()
    def reinit(self, feat_MD: Tensor, pid_M: Tensor, *, step: int, video_M: Tensor | None = None) -> None:
        """Re-initialise the rows of the identities in ``pid_M`` from the mean of their members'
        features ``feat_MD`` (one row per member; several members per identity), renormalised.

        Used when the Relabeling Module creates or changes identities; grows the bank as needed.
        ``video_M`` gives each member's video (members of one identity share it)."""
        pid_U, member_to_id_M = torch.unique(pid_M, return_inverse=True)
        sum_UD = feat_MD.new_zeros(len(pid_U), feat_MD.shape[1], dtype=torch.float32)
        sum_UD.index_add_(0, member_to_id_M, feat_MD.float())
        video_U = None
        if video_M is not None:
            video_U = video_M.new_empty(len(pid_U)).scatter_(0, member_to_id_M, video_M)
        self.load_rows(pid_U, sum_UD, step=step, video_M=video_U)  # normalising the sum = the mean's direction

    @torch.no_grad()
    def update(self, feat_BD: Tensor, pid_B: Tensor, step: int) -> None:
        """Momentum update from momentum-encoder features ``feat_BD`` (unit) of identities ``pid_B``:
        ``c <- mu*c + (1-mu)*mean(feat of the identity in the batch)``, renormalised."""
        self._check_pids(pid_B)
        self._momentum_update(feat_BD, pid_B, step)

    def _momentum_update(self, feat_BD: Tensor, pid_B: Tensor, step: int) -> None:
        owned_B, local_B = self._local_rows(pid_B)
        if owned_B is not None:
            feat_BD, local_B = feat_BD[owned_B], local_B[owned_B]
        row_U, sample_to_row_B = torch.unique(local_B, return_inverse=True)
        sum_UD = feat_BD.new_zeros(len(row_U), self.dim, dtype=torch.float32)
        sum_UD.index_add_(0, sample_to_row_B, feat_BD.float())
        count_U = torch.bincount(sample_to_row_B, minlength=len(row_U))
        mean_UD = sum_UD / count_U[:, None]
        mu = self.cfg.momentum
        new_UD = F.normalize(mu * self.centroids[row_U].float() + (1.0 - mu) * mean_UD, dim=1)
        self.centroids[row_U] = new_UD.to(self.centroids.dtype)
        self.last_updated_step[row_U] = step

    # --- the Centroids loss --------------------------------------------------------------------

    def temperatures(self, is_single_B: Tensor) -> Tensor:
        """Per-anchor temperature: ``temp_single`` for single-camera anchors, ``temp_multi`` otherwise."""
        return torch.where(is_single_B, self.cfg.temp_single, self.cfg.temp_multi).float()

    def loss(self, feat_BD: Tensor, pid_B: Tensor, tau_B: Tensor, video_B: Tensor | None = None,
             is_single_B: Tensor | None = None) -> Tensor:
        """Centroids loss (mean over the batch; per domain, summed, when ``is_single_B`` is given:
        :func:`~dynamix_core.losses.common.domain_mean`) of online features ``feat_BD`` (unit) with identities
        ``pid_B`` and temperatures ``tau_B``; ``video_B`` (-1 for multi-camera anchors) is required
        when ``mask_same_video`` is on. Mode ``all``: softmax over every centroid; ``sampled``: over
        the batch identities plus ``num_negatives`` negatives. Gradients reach ``feat_BD`` only."""
        self._check_pids(pid_B)
        video_B = self._check_video(video_B)
        inv_tau_B = 1.0 / tau_B.float()
        if self.cfg.loss_mode == "all":
            row_id_N, rows_ND, positive_B = None, self.centroids, pid_B
        else:
            pid_U, positive_B = torch.unique(pid_B, return_inverse=True)
            negative_K = self.sample_negatives(feat_BD, pid_B, tau_B, video_B)
            row_id_N = torch.cat([pid_U, negative_K])
            rows_ND = self.centroids[row_id_N]
        mask = self._mask(pid_B, video_B, row_id_N)
        loss_B = cross_entropy_over_rows(feat_BD, inv_tau_B, rows_ND, positive_B, self.cfg.chunk_rows, mask)
        return domain_mean(loss_B, None, is_single_B)

    @torch.no_grad()
    def sample_negatives(self, feat_BD: Tensor, pid_B: Tensor, tau_B: Tensor,
                         video_B: Tensor | None = None) -> Tensor:
        """Ids of the negative centroids of sampled mode: distinct, none of the batch's identities,
        ``num_hard_negatives`` of them the highest-logit rows for any anchor (same-video rows masked
        as in the loss), the rest uniform at random (torch's global generator). All the other
        identities when fewer than ``num_negatives`` remain."""
        video_B = self._check_video(video_B)
        num_rows = self.num_identities
        excluded_N = torch.zeros(num_rows, dtype=torch.bool, device=self.centroids.device)
        excluded_N[pid_B] = True
        num_free = num_rows - int(excluded_N.sum())
        num_negatives = min(self.cfg.num_negatives, num_free)
        num_hard = min(self.cfg.num_hard_negatives, num_negatives)
        hard_K = pid_B.new_empty(0)
        if num_hard > 0:  # mining is a full pass over the bank: skip it for purely random negatives
            hard_K = hardest_rows(feat_BD, 1.0 / tau_B.float(), self.centroids, num_hard, excluded_N,
                                  self.cfg.chunk_rows, self._mask(pid_B, video_B, None))
            excluded_N[hard_K] = True
        order_N = torch.randperm(num_rows, device=excluded_N.device)
        random_K = order_N[~excluded_N[order_N]][: num_negatives - num_hard]
        return torch.cat([hard_K, random_K])

    def _mask(self, pid_B: Tensor, video_B: Tensor | None, row_id_N: Tensor | None) -> RowMask | None:
        """Mask over the given rows (``None`` = every row held here, in order): never-written rows,
        and the anchor's own video when ``video_B`` is given. ``None`` when nothing is masked."""
        unwritten_N = self.last_updated_step < 0
        if row_id_N is None:
            row_id_N, row_video_N = self.global_ids(), self.row_video
        else:
            unwritten_N, row_video_N = unwritten_N[row_id_N], self.row_video[row_id_N]
        if video_B is None and not bool(unwritten_N.any()):
            return None
        return RowMask(pid_B, video_B, row_id_N, row_video_N, unwritten_N)

    def _check_video(self, video_B: Tensor | None) -> Tensor | None:
        """The anchors' videos when masking is on (required then), else ``None``."""
        if not self.cfg.mask_same_video:
            return None
        if video_B is None:
            raise ValueError(
                "CentroidBank.loss: centroids.mask_same_video is on, so pass video_B (the anchors' video ids, "
                "-1 for multi-camera anchors) or set centroids.mask_same_video=false"
            )
        return video_B

    def _check_pids(self, pid_B: Tensor, *, allow_growth: bool = False) -> None:
        if len(pid_B) == 0:
            return
        low, high = int(pid_B.min()), int(pid_B.max())
        if low < 0 or (high >= self.num_identities and not allow_growth):
            raise ValueError(
                f"CentroidBank: identity ids must lie in [0, {self.num_identities}), got [{low}, {high}]; "
                "unlabeled samples (pid -1) have no centroid, and new identities need reinit/load_rows first"
            )

    # --- bookkeeping ---------------------------------------------------------------------------

    def stale_rows(self, step: int, max_age: int | None = None) -> Tensor:
        """Global ids of written rows not updated for more than ``max_age`` steps
        (default ``stale_after_steps``). Rows never written are counted by :meth:`staleness_counts`."""
        max_age = self.cfg.stale_after_steps if max_age is None else max_age
        written_N = self.last_updated_step >= 0
        stale_N = written_N & (step - self.last_updated_step > max_age)
        return self.global_ids()[stale_N]

    def staleness_counts(self, step: int) -> dict[str, int]:
        """Counts for logging over the rows held here: rows, never written, stale."""
        return {
            "rows": self.centroids.shape[0],
            "never_written": int((self.last_updated_step < 0).sum()),
            "stale": len(self.stale_rows(step)),
        }

    @property
    def nbytes(self) -> int:
        """Bytes held by this bank (centroids + per-row video and step, spare capacity included)."""
        return sum(t.untyped_storage().nbytes() for t in (self.centroids, self.row_video, self.last_updated_step))

    def state_dict(self) -> dict[str, Tensor | int]:
        # a view into spare capacity would be saved with its whole storage: save the rows in use
        return {
            "num_identities": self.num_identities,
            "centroids": _compact(self.centroids),
            "row_video": _compact(self.row_video),
            "last_updated_step": _compact(self.last_updated_step),
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore a :meth:`state_dict` saved by a bank of the same layout (dim, dtype, sharding)."""
        centroids = state["centroids"]
        expected_rows = self._num_local_rows(int(state["num_identities"]))
        if centroids.shape != (expected_rows, self.dim) or centroids.dtype != self.centroids.dtype:
            raise ValueError(
                f"CentroidBank.load_state_dict: checkpoint centroids are {tuple(centroids.shape)} {centroids.dtype}, "
                f"this bank expects ({expected_rows}, {self.dim}) {self.centroids.dtype} for "
                f"{state['num_identities']} identities; check dim, storage_dtype and the number of ranks"
            )
        device = self.centroids.device
        self.num_identities = int(state["num_identities"])
        self.centroids = centroids.to(device).clone()
        self.row_video = state["row_video"].to(device).clone()
        self.last_updated_step = state["last_updated_step"].to(device).clone()


def _rows_of(tensor: Tensor, rows: int) -> Tensor:
    """The first ``rows`` rows of ``tensor``'s storage (a view; the rest is spare capacity)."""
    base = tensor if tensor._base is None else tensor._base
    return base[:rows]


def _compact(tensor: Tensor) -> Tensor:
    """``tensor`` itself when it owns exactly its storage, else a copy of just its elements."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()
