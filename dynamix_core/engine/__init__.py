"""The training engine: one loop with hooks, a checkpointer of named parts, a metric window.

Every recipe (mixing, clustering, pre-training) runs on :class:`Engine`, under Ray Train
(``pipelines.*.worker``) and in one process (:mod:`pipelines.train.local`): what is measured in
tests and ablations is the loop that ships.
"""

from dynamix_core.engine.checkpoint import (CheckpointDamaged, Checkpointer, load_json, load_tensors, rng_state,
                                            save_json, set_rng_state, verify_checkpoint)
from dynamix_core.engine.loop import Engine, EvalHook, Hook, MetricWindow, Reporter, StepResult, checkpoint_due
from dynamix_core.engine.prefetch import Prefetcher

__all__ = ["CheckpointDamaged", "Checkpointer", "Engine", "EvalHook", "Hook", "MetricWindow", "Prefetcher", "Reporter",
           "StepResult", "checkpoint_due", "load_json", "load_tensors", "rng_state", "save_json", "set_rng_state", "verify_checkpoint"]
