"""The method registry: one entry per training recipe family member, saying what it reads, how
its single-camera labels come about, and which loop trains it. Code asks the registry
(``METHODS[cfg.method].labeling_pool``) instead of comparing method names.

=================  ==========  ==========  ===================================================
method             family      data.single  single-camera labels
=================  ==========  ==========  ===================================================
dynamix            mixing      read        the dataset's (noisy) labels, relabelled on the fly;
                                           one centroid per single identity
remix              mixing      read        pseudo-labels of f~ at init (a round before training),
                                           refreshed by later rounds; no single centroids
multicam           mixing      no          -
cluster_contrast   clustering  no          -
calr               clustering  no          -
domainmix          clustering  read        clusters of f~ features each epoch (an unlabelled domain)
=================  ==========  ==========  ===================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "mixing": pipelines.train.mixing; "clustering": pipelines.train.clustering
    reads_single: bool = False  # data.single is part of the run
    labeling_pool: bool = False  # single-camera labels come from the label store + labelling pool
    starts_from_given_labels: bool = False  # version 0 holds the dataset's labels (else: none yet)
    single_centroids: bool = False  # the centroid bank holds one centroid per single identity
    first_round_before_training: bool = False  # the first pseudo-labels come from f~ at init

    def worker_loop(self):
        """The Ray Train loop of this method's workers."""
        if self.family == "clustering":
            from pipelines.train.cluster_worker import train_loop_per_worker
        else:
            from pipelines.train.worker import train_loop_per_worker
        return train_loop_per_worker


METHODS = {m.name: m for m in (
    Method("dynamix", "mixing", reads_single=True, labeling_pool=True, starts_from_given_labels=True,
           single_centroids=True),
    Method("remix", "mixing", reads_single=True, labeling_pool=True, first_round_before_training=True),
    Method("multicam", "mixing"),
    Method("cluster_contrast", "clustering"),
    Method("domainmix", "clustering", reads_single=True),
    Method("calr", "clustering"),
)}

CLUSTER_METHODS = tuple(name for name, m in METHODS.items() if m.family == "clustering")
