"""Multi-camera part of a batch: P identities x K images (SPEC 2.2 step 3, 2.3c).

Identities are drawn uniformly over the *source datasets* first (pick a dataset uniformly, then an
identity inside it), so the largest dataset does not dominate; their K images are spread over
their cameras (:func:`~dynamix_core.sampling.images.draw_images`).

Data parallelism: every rank draws the same ``world_size * P`` distinct identities from one
shared random stream and keeps its own slice of ``P``, so within a step no identity - hence no
image - is in two ranks' batches, while across steps every rank sees every identity. Image picks
use a per-rank stream (only the rank's own identities need them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dynamix_core.sampling.images import draw_images
from dynamix_core.sampling.rng import MULTI_IDS_STREAM, MULTI_IMAGES_STREAM, make_rng, rng_state, set_rng_state


class MultiCameraSampler:
    """P x K sampler over the in-memory multi-camera train set.

    ``refs[i]`` is what a batch hands to the loader for sample ``i`` (an index into the train set);
    ``pids``/``camids`` are global ids (SPEC 1.1) and ``datasets`` the source dataset of each sample.
    """

    def __init__(
        self,
        refs: Sequence,
        pids: Sequence[int],
        camids: Sequence[int],
        datasets: Sequence,
        *,
        images_per_id: int,
        cross_camera: bool = True,
        balance_datasets: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.refs = np.asarray(refs)
        pids = np.asarray(pids, dtype=np.int64)
        camids = np.asarray(camids, dtype=np.int64)
        dataset_names, dataset_codes = np.unique(np.asarray(datasets), return_inverse=True)
        if not len(self.refs) == len(pids) == len(camids) == len(dataset_codes) > 0:
            raise ValueError(
                f"refs, pids, camids, datasets must be non-empty and of one length, got "
                f"{len(self.refs)}, {len(pids)}, {len(camids)}, {len(dataset_codes)}"
            )
        if (pids < 0).any():
            raise ValueError(
                f"{int((pids < 0).sum())} multi-camera samples have pid -1 (unlabeled); the multi-camera "
                "train set must be fully labeled: filter them out before building the sampler"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.images_per_id = images_per_id
        self.cross_camera = cross_camera
        self.balance_datasets = balance_datasets
        self.rank = rank
        self.world_size = world_size
        self.dataset_names: list[str] = [str(d) for d in dataset_names]

        order = np.lexsort((camids, pids))  # by identity, then camera
        pid_sorted = pids[order]
        starts = np.flatnonzero(np.r_[True, pid_sorted[1:] != pid_sorted[:-1]])
        ends = np.r_[starts[1:], len(order)]
        ds_sorted = dataset_codes[order]
        mixed = ds_sorted != np.repeat(ds_sorted[starts], ends - starts)
        if mixed.any():
            pid = int(pid_sorted[np.flatnonzero(mixed)[0]])
            raise ValueError(f"pid {pid} occurs in two source datasets; pids must be global (SPEC 1.1)")
        self.id_pids: np.ndarray = pid_sorted[starts]
        #: per identity, the positions of its samples split by camera
        self._id_cameras: list[list[np.ndarray]] = []
        for s, e in zip(starts, ends):
            positions = order[s:e]
            cams = camids[positions]
            self._id_cameras.append(np.split(positions, np.flatnonzero(cams[1:] != cams[:-1]) + 1))
        id_dataset = ds_sorted[starts]
        self._dataset_ids = [np.flatnonzero(id_dataset == d) for d in range(len(dataset_names))]

        self._ids_rng = make_rng(seed, MULTI_IDS_STREAM)
        self._img_rng = make_rng(seed, MULTI_IMAGES_STREAM, rank)

    @property
    def num_identities(self) -> int:
        return len(self.id_pids)

    def sample(self, num_ids: int) -> tuple[list, np.ndarray]:
        """This rank's ``num_ids`` identities x K images: ``(refs, pids)``, K consecutive refs per identity.

        Every rank must call this with the same ``num_ids`` at the same step (they share the
        identity stream)."""
        if num_ids == 0:
            return [], np.empty(0, dtype=np.int64)
        chosen = self._draw_identities(num_ids * self.world_size)
        mine = chosen[self.rank * num_ids:(self.rank + 1) * num_ids]
        positions = np.concatenate([self._draw_images(i) for i in mine])
        return self.refs[positions].tolist(), np.repeat(self.id_pids[mine], self.images_per_id)

    def _draw_identities(self, n: int) -> np.ndarray:
        """``n`` distinct identity indices, in random order."""
        if n > self.num_identities:
            raise ValueError(
                f"a step needs {n} distinct multi-camera identities (world_size x identities per batch) but the "
                f"train set has {self.num_identities}; lower sampler.num_multi_ids or the number of workers"
            )
        rng = self._ids_rng
        if not self.balance_datasets:
            return rng.choice(self.num_identities, n, replace=False)
        sizes = np.array([len(ids) for ids in self._dataset_ids])
        num_datasets = len(sizes)
        counts = rng.multinomial(n, np.full(num_datasets, 1.0 / num_datasets))
        # a dataset with fewer identities than drawn gives all it has; its excess is redrawn uniformly
        # over the datasets that still have identities left
        while (counts > sizes).any():
            excess = int(np.clip(counts - sizes, 0, None).sum())
            counts = np.minimum(counts, sizes)
            open_ = np.flatnonzero(counts < sizes)
            counts[open_] += rng.multinomial(excess, np.full(len(open_), 1.0 / len(open_)))
        chosen = np.concatenate(
            [ids[rng.choice(len(ids), c, replace=False)] for ids, c in zip(self._dataset_ids, counts)]
        )
        return rng.permutation(chosen)

    def _draw_images(self, identity: int) -> np.ndarray:
        cameras = self._id_cameras[identity]
        if not self.cross_camera:
            cameras = [np.concatenate(cameras)]
        return draw_images(self._img_rng, cameras, self.images_per_id)

    def state_dict(self) -> dict:
        """JSON-safe state: resuming from it continues the exact sequence of batches."""
        return {
            "rank": self.rank,
            "num_identities": self.num_identities,
            "ids_rng": rng_state(self._ids_rng),
            "img_rng": rng_state(self._img_rng),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self.rank or state["num_identities"] != self.num_identities:
            raise ValueError(
                f"sampler state of rank {state['rank']} over {state['num_identities']} identities cannot resume "
                f"rank {self.rank} over {self.num_identities}: save and load each rank's own sampler state"
            )
        set_rng_state(self._ids_rng, state["ids_rng"])
        set_rng_state(self._img_rng, state["img_rng"])
