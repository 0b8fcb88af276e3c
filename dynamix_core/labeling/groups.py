"""Pack many small groups of rows (videos, tracklets) into padded dense blocks for batched tensor ops.

Legend: N rows in total, G groups, B groups in one block, M padded group size of that block.

Groups are sorted by size and cut into consecutive blocks whose ``B * M * M`` stays under a budget
and whose sizes differ by at most a quarter, so padding stays small. Inside a group, rows keep their
input order: "the first row of a video" means the same thing here as in a per-video reference loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """One padded block: ``rows_BM[b, m]`` = global row of member m of group ``groups[b]``, -1 = padding."""

    groups: np.ndarray  # (B,) indices into GroupLayout.group_ids
    rows_BM: np.ndarray  # (B, M) int64

    @property
    def valid_BM(self) -> np.ndarray:
        return self.rows_BM >= 0


@dataclass(frozen=True)
class GroupLayout:
    """How the N rows split into groups and how those groups are packed into blocks."""

    group_ids: np.ndarray  # (G,) sorted distinct group ids
    group_of_row: np.ndarray  # (N,) index into group_ids
    sizes: np.ndarray  # (G,) rows per group
    rows_by_group: np.ndarray  # (N,) row indices grouped by group, input order inside a group
    starts: np.ndarray  # (G,) offset of each group in rows_by_group
    blocks: list[Block]

    def rows_of(self, g: int) -> np.ndarray:
        """Global rows of group index ``g`` in input order."""
        return self.rows_by_group[self.starts[g] : self.starts[g] + self.sizes[g]]


def group_layout(group_ids_N: np.ndarray, max_block_elements: int) -> GroupLayout:
    """Group rows by id and pack the groups into blocks of at most ``max_block_elements`` = B*M*M
    (a single group larger than the budget gets a block of its own)."""
    group_ids_N = np.asarray(group_ids_N)
    if group_ids_N.ndim != 1:
        raise ValueError(f"group ids must be one-dimensional, got shape {group_ids_N.shape}")
    uniq, inv = np.unique(group_ids_N, return_inverse=True)
    rows_by_group = np.argsort(inv, kind="stable")
    sizes = np.bincount(inv, minlength=len(uniq))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    blocks = []
    by_size = np.argsort(sizes, kind="stable")
    first = 0
    while first < len(by_size):
        last = first + 1
        # Sizes ascend, so the last group of a candidate block sets its padded size M; a block also
        # stops growing once M exceeds its smallest group by a quarter (+8), which bounds padding.
        max_size = int(sizes[by_size[first]]) * 5 // 4 + 8
        while (
            last < len(by_size)
            and sizes[by_size[last]] <= max_size
            and (last + 1 - first) * int(sizes[by_size[last]]) ** 2 <= max_block_elements
        ):
            last += 1
        groups = by_size[first:last]
        blocks.append(Block(groups=groups, rows_BM=_pad_rows(groups, sizes, starts, rows_by_group)))
        first = last
    return GroupLayout(uniq, inv.astype(np.int64), sizes, rows_by_group, starts, blocks)


def _pad_rows(groups: np.ndarray, sizes: np.ndarray, starts: np.ndarray, rows_by_group: np.ndarray) -> np.ndarray:
    n_B = sizes[groups]
    rows_BM = np.full((len(groups), int(n_B.max())), -1, dtype=np.int64)
    b_idx = np.repeat(np.arange(len(groups)), n_B)
    m_idx = np.arange(int(n_B.sum())) - np.repeat(np.cumsum(n_B) - n_B, n_B)
    rows_BM[b_idx, m_idx] = rows_by_group[np.repeat(starts[groups], n_B) + m_idx]
    return rows_BM


def offset_group_labels(layout: GroupLayout, local_labels_N: np.ndarray, num_clusters_G: np.ndarray) -> np.ndarray:
    """Make per-group cluster labels (0..C_g-1, -1 noise) unique across groups: group g's clusters get
    ``sum(C_h for groups h sorted before g) + local``; noise stays -1."""
    offsets_G = np.concatenate([[0], np.cumsum(num_clusters_G)[:-1]]).astype(np.int64)
    out = np.where(local_labels_N >= 0, local_labels_N + offsets_G[layout.group_of_row], -1)
    return out.astype(np.int64)
