"""The training engine every recipe runs on: a loop over a step function with hooks.

A recipe supplies a *step* (``step_fn(step) -> StepResult``: take a batch, optimise, return what
it measured) and *hooks* (what happens around steps: relabelling polls, centroid refreshes,
clustering at epoch starts, evaluation). The engine owns the cadences: it averages what the steps
measured over a report window (:class:`MetricWindow`), asks the hooks for their metrics at report
steps, has the :class:`~dynamix_core.engine.checkpoint.Checkpointer` write a checkpoint at
checkpoint steps, and hands both to a *reporter* (the Ray worker's reporter records the history,
MLflow and ``ray.train.report``; the local runner keeps them in memory or in a folder).

    engine = Engine(step_fn, max_steps=400, log_every=20, checkpoint_every=100,
                    hooks=[refresh, EvalHook(evaluate, every=100)], checkpointer=ckpt, reporter=reporter)
    engine.run(start_step)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class StepResult:
    """What one step measured.

    ``means`` are averaged over the steps of a report window (losses: ``loss/<term>``), ``last``
    are point values of which the window's last one is reported (``lr``, ``grad_norm``),
    ``images`` counts this rank's images, and ``timers`` are seconds spent in named phases
    (``data_wait``, ``compute``): each becomes ``<name>_fraction`` of the window's wall time."""

    means: dict[str, float]
    last: dict[str, float] = field(default_factory=dict)
    images: int = 0
    timers: dict[str, float] = field(default_factory=dict)


class MetricWindow:
    """Step results accumulated between two reports; :meth:`flush` turns them into metrics."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.timers: dict[str, float] = {}
        self.images = 0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, result: StepResult) -> None:
        for k, v in result.means.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.last.update(result.last)
        self.images += result.images
        self.steps += 1
        for k, v in result.timers.items():
            self.time(k, v)

    def time(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the phase ``name`` (hooks time their own work: labels, clustering)."""
        self.timers[name] = self.timers.get(name, 0.0) + seconds

    def flush(self) -> dict[str, float]:
        """Means, last values, throughput (every rank's images) and phase fractions; then reset."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(self.steps, 1)
        metrics = {k: v / steps for k, v in self.sums.items()}
        metrics.update(self.last)
        metrics["images_per_s"] = self.images * self.world_size / elapsed
        metrics.update({f"{k}_fraction": v / elapsed for k, v in self.timers.items()})
        self.reset()
        return metrics


class Hook:
    """Work around the steps. Every method is optional; ``engine`` is set when the engine starts."""

    engine: "Engine"

    def before_train(self, start_step: int) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, result: StepResult) -> None:
        pass

    def at_report(self, done: int, metrics: dict) -> None:
        """Add metrics to the report of step ``done`` (the number of finished steps)."""

    def close(self) -> None:
        pass


class EvalHook(Hook):
    """``evaluate()``'s metrics (prefixed) in the report every ``every`` steps and at the last step."""

    def __init__(self, evaluate: Callable[[], dict], every: int, *, prefix: str = "eval/"):
        self.evaluate, self.every, self.prefix = evaluate, every, prefix

    def at_report(self, done: int, metrics: dict) -> None:
        if done == self.engine.max_steps or (self.every and done % self.every == 0):
            metrics.update({f"{self.prefix}{k}": v for k, v in self.evaluate().items()})


class Reporter(Protocol):
    def report(self, done: int, metrics: dict, checkpoint_dir) -> None: ...

    def close(self) -> None: ...


def checkpoint_due(done: int, checkpoint_every: int, max_steps: int) -> bool:
    """Whether a checkpoint is written after ``done`` finished steps (every ``checkpoint_every`` and
    at the last step); prefetching producers keep their sampler state for exactly these steps."""
    return done % checkpoint_every == 0 or done == max_steps


class Engine:
    """Runs ``step_fn`` for steps ``start_step .. max_steps - 1`` with the hooks, the metric
    window, the checkpoint cadence and the reporter. A report happens every ``log_every`` finished
    steps, at every checkpoint step and at the last step; a checkpoint every ``checkpoint_every``
    finished steps and at the last step."""

    def __init__(self, step_fn: Callable[[int], StepResult], *, max_steps: int, log_every: int,
                 checkpoint_every: int, hooks: list[Hook] = (), checkpointer=None, reporter: Reporter | None = None,
                 world_size: int = 1):
        self.step_fn = step_fn
        self.max_steps, self.log_every, self.checkpoint_every = max_steps, log_every, checkpoint_every
        self.hooks = list(hooks)
        self.checkpointer = checkpointer
        self.reporter = reporter
        self.window = MetricWindow(world_size)
        for hook in self.hooks:
            hook.engine = self

    @classmethod
    def for_run(cls, step_fn: Callable[[int], StepResult], run, **kwargs) -> "Engine":
        """An engine with the cadences of a config's ``run`` section (max_steps, log_every, checkpoint_every)."""
        return cls(step_fn, max_steps=run.max_steps, log_every=run.log_every,
                   checkpoint_every=run.checkpoint_every, **kwargs)

    def is_checkpoint_step(self, done: int) -> bool:
        return checkpoint_due(done, self.checkpoint_every, self.max_steps)

    def is_report_step(self, done: int) -> bool:
        return done % self.log_every == 0 or self.is_checkpoint_step(done)

    def run(self, start_step: int = 0) -> None:
        try:
            for hook in self.hooks:
                hook.before_train(start_step)
            self.window.reset()
            for step in range(start_step, self.max_steps):
                for hook in self.hooks:
                    hook.before_step(step)
                result = self.step_fn(step)
                self.window.add(result)
                for hook in self.hooks:
                    hook.after_step(step, result)
                done = step + 1
                if not self.is_report_step(done):
                    continue
                metrics = {"step": done, **self.window.flush()}
                for hook in self.hooks:
                    hook.at_report(done, metrics)
                saved = None
                if self.checkpointer is not None and self.is_checkpoint_step(done):
                    saved = self.checkpointer.save(done)
                if self.reporter is not None:
                    self.reporter.report(done, metrics, saved)
                self.window.reset()
        finally:
            for hook in self.hooks:
                hook.close()
            if self.reporter is not None:
                self.reporter.close()
