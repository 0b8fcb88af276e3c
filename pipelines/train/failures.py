"""Which failures of a job's workers Ray Train may retry.

``scaling.max_failures`` restarts the worker group from its last checkpoint after a failure: right
for a lost node or a killed process, useless for a failure that every restart meets again (settings
the data cannot satisfy, bad input, a :class:`~dynamix_core.errors.StopRun`): those would only repeat
minutes of start-up before the same error. :func:`fit` runs a trainer with a failure policy that ends
the run at once on such an error and reports it in one line.

The policy plugs into Ray Train's failure handling, which has no public hook for this (Ray 2.60:
``ray.train.v2``'s ``create_failure_policy``); where it is missing, every failure is retried as
``max_failures`` says and the error is still reported in one line.
"""

from __future__ import annotations

from dynamix_core.config import ConfigError
from dynamix_core.data.records import BadInputError
from dynamix_core.errors import StopRun

#: errors of a worker that a restart from the last checkpoint would meet again
DETERMINISTIC = (StopRun, ConfigError, BadInputError)


def _unwrap(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (``UserExceptionWithTraceback``, ``RayTaskError``)."""
    for _ in range(8):
        inner = getattr(exc, "_base_exc", None) or getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    return exc


def deterministic_cause(exc: BaseException) -> BaseException | None:
    """The deterministic worker error behind a failed training (``exc``: Ray Train's
    ``WorkerGroupError``, or a worker's error itself); None when every error could be transient."""
    failures = getattr(exc, "worker_failures", None)
    for err in (failures.values() if isinstance(failures, dict) else [exc]):
        cause = _unwrap(err)
        if isinstance(cause, DETERMINISTIC):
            return cause
    return None


def __getattr__(name: str):
    """``NoRetryOfDeterministicErrors``, built on first use (importing Ray Train's internals costs
    seconds); the controller actor that unpickles the policy gets it the same way."""
    if name != "NoRetryOfDeterministicErrors":
        raise AttributeError(name)
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    class NoRetryOfDeterministicErrors(DefaultFailurePolicy):
        """Ray Train's default policy, except that a deterministic worker error ends the run at once."""

        def make_decision(self, training_failed_error):
            if deterministic_cause(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    NoRetryOfDeterministicErrors.__module__ = __name__
    NoRetryOfDeterministicErrors.__qualname__ = name
    globals()[name] = NoRetryOfDeterministicErrors
    return NoRetryOfDeterministicErrors


def _install() -> None:
    """Make the trainers of this process use ``NoRetryOfDeterministicErrors`` (idempotent)."""
    try:
        from ray.train.v2.api import data_parallel_trainer

        policy = __getattr__("NoRetryOfDeterministicErrors")
    except ImportError:  # another Ray version: plain retries
        return
    data_parallel_trainer.create_failure_policy = policy


def fit(trainer):
    """``trainer.fit()``; a deterministic worker error stops the run without a retry and is raised as
    a :class:`StopRun` carrying its one-line message (the worker's traceback stays in Ray's logs)."""
    _install()
    try:
        return trainer.fit()
    except Exception as exc:
        cause = deterministic_cause(exc)
        if cause is None:
            raise
        lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        raise StopRun(lines[0] if lines else type(cause).__name__) from exc
