"""Per-group DBSCAN loops over library implementations: scikit-learn (the reference) and cuML (GPU).

Both number clusters per group and make them unique across groups exactly like the batched torch
backend (:func:`dynamix_core.labeling.groups.offset_group_labels`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from dynamix_core.labeling.groups import GroupLayout, offset_group_labels


def cuml_available() -> bool:
    return importlib.util.find_spec("cuml") is not None


def dbscan_groups_sklearn(
    layout: GroupLayout,
    eps: float,
    min_samples: int,
    *,
    feat_ND: np.ndarray | None = None,
    dist_csr: sp.csr_matrix | None = None,
) -> np.ndarray:
    """``sklearn.cluster.DBSCAN`` on each group alone (cosine on float64 features, or precomputed sparse)."""
    if (feat_ND is None) == (dist_csr is None):
        raise ValueError("give exactly one of feat_ND (cosine) or dist_csr (precomputed)")
    local_N = np.full(len(layout.group_of_row), -1, dtype=np.int64)
    num_clusters_G = np.zeros(len(layout.group_ids), dtype=np.int64)
    for g in range(len(layout.group_ids)):
        rows = layout.rows_of(g)
        if feat_ND is not None:
            model = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit(feat_ND[rows])
        else:
            model = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(_sorted_graph(dist_csr, rows))
        local_N[rows] = model.labels_
        num_clusters_G[g] = model.labels_.max() + 1
    return offset_group_labels(layout, local_N, num_clusters_G)


def _sorted_graph(dist_csr: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """The group's sub-matrix with each row's entries sorted by distance (what sklearn expects)."""
    from sklearn.neighbors import sort_graph_by_row_values

    return sort_graph_by_row_values(dist_csr[rows][:, rows].tocsr(), copy=True, warn_when_not_sorted=False)


def dbscan_groups_cuml(
    layout: GroupLayout,
    eps: float,
    min_samples: int,
    *,
    feat_ND: torch.Tensor | None = None,
    dist_csr: sp.csr_matrix | None = None,
) -> np.ndarray:
    """cuML DBSCAN on each group alone. Border points reachable from two clusters may be assigned
    differently from sklearn; core points and noise are the same."""
    if not cuml_available():
        raise ImportError(
            "backend='cuml' needs RAPIDS cuML: install the GPU extra (pip install 'dynamix[gpu]'), "
            "or use backend='torch' (batched, CPU or GPU) or 'sklearn'"
        )
    from cuml.cluster import DBSCAN as CuDBSCAN

    if (feat_ND is None) == (dist_csr is None):
        raise ValueError("give exactly one of feat_ND (cosine) or dist_csr (precomputed)")
    local_N = np.full(len(layout.group_of_row), -1, dtype=np.int64)
    num_clusters_G = np.zeros(len(layout.group_ids), dtype=np.int64)
    for g in range(len(layout.group_ids)):
        rows = layout.rows_of(g)
        if feat_ND is not None:
            x = torch.nn.functional.normalize(feat_ND[torch.from_numpy(rows).to(feat_ND.device)].float(), dim=1)
            labels = CuDBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(x)
        else:
            dense = dist_csr[rows][:, rows].toarray()
            dense[dense == 0] = 2.0  # not stored = farther than any eps < 1
            np.fill_diagonal(dense, 0.0)
            labels = CuDBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
        labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
        local_N[rows] = _first_seen_numbering(labels)
        num_clusters_G[g] = local_N[rows].max() + 1
    return offset_group_labels(layout, local_N, num_clusters_G)


def _first_seen_numbering(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. in order of first appearance (noise stays -1)."""
    out = np.full_like(labels, -1)
    keep = labels >= 0
    _, first, inv = np.unique(labels[keep], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    out[keep] = order[inv]
    return out
