"""The training step of ReMix / DynaMix in plain PyTorch (no Ray): optimizer and LR schedule, the
four-loss step with momentum encoder and centroid bank, and checkpoint state. ``pipelines.train``
runs it under Ray Train; ``benchmarks/bench_train_step.py`` and the GPU machine run it bare."""

from dynamix_core.training.optim import OptimConfig, build_optimizer, lr_factor
from dynamix_core.training.step import StepBatch, StepOutput, TrainStep

__all__ = ["OptimConfig", "StepBatch", "StepOutput", "TrainStep", "build_optimizer", "lr_factor"]
