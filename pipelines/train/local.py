"""Training in one process, without Ray, on the engine the service runs.

:func:`train_local` runs a recipe exactly as a Ray Train worker of a one-worker job does (the same
:func:`~pipelines.train.mixing.run_mixing` or :func:`~pipelines.train.clustering.run_clustering`:
sampler, prefetching, step, centroid refreshes, evaluation hook, checkpoint parts), with a
:class:`LocalReporter` instead of Ray's. Tests, the learning ablations and the GPU machine (which
has no Ray) use it, so what they measure is the loop that ships. Recipes that relabel single-camera
data need the labelling service and run through ``dynamix train``.

    run = train_local(load_config(TrainConfig, "recipes/multicam_baseline_demo.yaml", overrides))
    encoder, history = run.encoder, run.history
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


class LocalReporter:
    """Keeps every report in ``history``; checkpoints go to ``checkpoints/step_NNNNNNN`` (the newest
    ``keep``), or are dropped when no folder is given."""

    def __init__(self, checkpoints: str | Path | None = None, keep: int = 2):
        self.history: list[dict] = []
        self.checkpoints = Path(checkpoints) if checkpoints is not None else None
        self.keep = keep

    def report(self, done: int, metrics: dict, checkpoint_dir) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        if self.checkpoints is None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step_{done:07d}"
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(str(checkpoint_dir), final)
        for old in sorted(self.checkpoints.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step_*")) if self.checkpoints is not None else []
        return found[-1] if found else None

    def close(self) -> None:
        pass


@dataclass
class LocalRun:
    encoder: torch.nn.Module  # the momentum encoder f~ (what a job exports)
    history: list[dict]


def train_local(cfg, *, checkpoints: str | Path | None = None, resume: bool = True,
                device: torch.device | None = None) -> LocalRun:
    """Train ``cfg`` in this process. With ``checkpoints`` (a folder), checkpoints are kept there
    and, with ``resume``, a run continues from the newest one."""
    import dynamix_core  # noqa: F401  (the torchvision shim, before anything imports timm)
    from pipelines.train.clustering import run_clustering
    from pipelines.train.data import MultiCameraSet
    from pipelines.train.methods import METHODS
    from pipelines.train.mixing import MixingInputs, Runtime, run_mixing
    from pipelines.train.worker import seed_all

    if cfg.uses_labeling_pool:
        raise ValueError(f"method {cfg.method!r} relabels single-camera data with the labelling service: "
                         "run it with `dynamix train` (the local runner trains recipes without it)")
    seed_all(cfg.run.seed)
    rt = Runtime(device=device or torch.device("cpu"))
    reporter = LocalReporter(checkpoints)
    restore_dir = reporter.latest() if resume else None
    if METHODS[cfg.method].family == "clustering":
        encoder = run_clustering(cfg, rt, reporter=reporter, restore_dir=restore_dir)
    else:
        encoder = run_mixing(cfg, rt, MixingInputs(multi=MultiCameraSet.load(cfg.data.multi), reporter=reporter,
                                                   restore_dir=restore_dir)).momentum
    return LocalRun(encoder, reporter.history)
