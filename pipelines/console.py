"""What the console shows: the project's own progress, one line per failure of Ray or MLflow, and
Ray's own logs kept in files (the Ray session folder) instead of on the terminal."""

from __future__ import annotations

import os

#: where Ray keeps a local session's logs unless RAY_TMPDIR / ray.init(_temp_dir=...) says otherwise
DEFAULT_RAY_LOGS = "/tmp/ray/session_latest/logs"


def ray_logs_dir() -> str:
    """The current Ray session's log folder (the default one when Ray is not running here)."""
    try:
        import ray

        if ray.is_initialized():
            from ray._private.worker import global_worker  # the session folder is not public API

            return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - a best-effort hint, never a reason to fail
        pass
    return DEFAULT_RAY_LOGS


def _origin(exc: BaseException) -> str | None:
    for cls in type(exc).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("ray", "mlflow"):
            return root
    return None


def _last_line(exc: BaseException) -> str:
    """The telling line of a possibly multi-line message (Ray wraps worker tracebacks: the cause is last)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def describe_failure(exc: BaseException) -> str | None:
    """One line saying what failed and what to do, for an exception raised by Ray or MLflow (or one
    they wrap); None for any other exception (its traceback is the useful output)."""
    origin = _origin(exc) or (_origin(exc.__cause__) if exc.__cause__ is not None else None)
    if origin == "ray":
        return (f"Ray: {type(exc).__name__}: {_last_line(exc)} -- check the cluster (--address, `ray status`); "
                f"Ray's logs: {ray_logs_dir()}; DYNAMIX_TRACEBACK=1 shows the traceback")
    if origin == "mlflow":
        return (f"MLflow: {_last_line(exc)} -- check the tracking URI (--tracking-uri, tracking.uri or "
                f"$MLFLOW_TRACKING_URI) and that the server is reachable; DYNAMIX_TRACEBACK=1 shows the traceback")
    return None
