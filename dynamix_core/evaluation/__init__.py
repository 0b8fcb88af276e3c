"""Re-ID retrieval evaluation (SPEC 3): exact CMC / mAP / mINP, chunked and memory-bounded.

- :func:`evaluate_rank` - from a query x gallery distance matrix (``rank.py``);
- :func:`evaluate_features` / :func:`evaluate` - from features, distances chunk by chunk
  (``features.py``), optionally k-reciprocal re-ranked (``rerank.py``);
- :class:`~dynamix_core.evaluation.target.TargetSet` / :func:`~dynamix_core.evaluation.target.evaluate_target`
  - an encoder on the query/gallery of an ingested shard set (``target.py``, imported by its path).
"""

from dynamix_core.evaluation.features import (
    EvalConfig,
    evaluate,
    evaluate_features,
    pairwise_distance,
)
from dynamix_core.evaluation.rank import RankAccumulator, evaluate_rank
from dynamix_core.evaluation.rerank import RerankConfig, k_reciprocal_rerank

__all__ = [
    "EvalConfig",
    "RankAccumulator",
    "RerankConfig",
    "evaluate",
    "evaluate_features",
    "evaluate_rank",
    "k_reciprocal_rerank",
    "pairwise_distance",
]
