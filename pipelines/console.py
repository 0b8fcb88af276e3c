"""What the console shows: the project's own progress, one line per failure of Ray or MLflow, and
Ray's own logs kept in files (the Ray session folder) instead of on the terminal."""

from __future__ import annotations

import logging
import os
import re

#: where Ray keeps a local session's logs unless RAY_TMPDIR / ray.init(_temp_dir=...) says otherwise
DEFAULT_RAY_LOGS = "/tmp/ray/session_latest/logs"


#: set to 1 to see Ray's worker, actor and controller output on the console again (debugging)
RAY_LOGS_TO_CONSOLE_ENV = "DYNAMIX_RAY_LOGS_TO_CONSOLE"
#: loggers of Ray libraries that narrate every execution on the console at INFO
_CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def ray_init_kwargs(local: bool = True) -> dict:
    """``ray.init`` arguments for a quiet console: the output of Ray's workers and actors (Ray Train's
    controller and placement-group cleaner, Ray Data operators, our workers) stays in the session's
    log files instead of being copied to the driver's terminal; the driver shows our own progress.
    A ``local`` instance runs without token authentication (a cluster brings its own mode and token)."""
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return {"log_to_driver": os.environ.get(RAY_LOGS_TO_CONSOLE_ENV) == "1", "logging_level": logging.WARNING}


def quiet_ray_libraries() -> None:
    """Ray Data / Ray Train progress bars and INFO narration off (warnings and errors still show),
    and the raylet's worker-pool advice off the console (:func:`quiet_raylet_advice`)."""
    if os.environ.get(RAY_LOGS_TO_CONSOLE_ENV) == "1":
        return
    quiet_raylet_advice()
    try:
        import ray.data  # first: importing it applies Ray Data's own logging configuration
    except ImportError:
        ray = None
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "progress bars disabled" (we disable them on purpose) and the per-dataset "execution finished"
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if ray is None:
        return
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except (ImportError, AttributeError):  # Ray Data absent or a version without the knob
        pass


#: raylet messages that are advice about Ray's worker pool, not news for a user of the service
_RAYLET_ADVICE = re.compile(r"(WARNING: )?\d+ \w+ worker processes have been started on node")


def quiet_raylet_advice() -> None:
    """Keep the raylet's worker-pool advice ("N PYTHON worker processes have been started on node ...")
    off the console and the job logs. The driver prints what the raylet publishes through
    ``ray._private.worker.print_to_stdstream`` whatever ``log_to_driver`` says (not public API: the
    filter wraps it by name, and does nothing where it is missing); every other raylet message (out
    of memory, a dead node) still shows, and the advice is still in the raylet's own log file."""
    if os.environ.get(RAY_LOGS_TO_CONSOLE_ENV) == "1":
        return
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    show = getattr(ray_worker, "print_to_stdstream", None)
    if show is None or getattr(show, "_dynamix_quiet", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not _RAYLET_ADVICE.match(str(ln))]
            if not lines:
                return
            data = {**data, "lines": lines}
        return show(data, *args, **kwargs)

    print_to_stdstream._dynamix_quiet = True
    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_libraries() -> None:
    """The console of every ``dynamix`` command: MLflow's and PyTorch's advice to library authors
    (type hints on ``predict``, deprecated pytree names, input-example validation, per-artifact
    download bars) and Ray Data's operator-concurrency notes are not for a user of the service.
    Warnings and errors of both libraries still show; ``DYNAMIX_RAY_LOGS_TO_CONSOLE=1`` keeps all."""
    import warnings

    if os.environ.get(RAY_LOGS_TO_CONSOLE_ENV) == "1":
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at": we say where, once
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its loggers' level at import
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for pattern, category in _ADVICE:
        warnings.filterwarnings("ignore", message=pattern.pattern, category=category)
    # MLflow logs models inside ``catch_warnings(); simplefilter("once", UserWarning)``, a filter in
    # front of ours: drop the advice where warnings are shown, which those contexts leave in place
    if not getattr(warnings.showwarning, "_dynamix_quiet", False):
        warnings.showwarning = _quiet_showwarning(warnings.showwarning)


#: (message pattern, category) of library advice that is not for a user of the service
_ADVICE = [
    (re.compile(r".*Add type hints to the `predict` method"), UserWarning),  # MLflow colours it: ANSI first
    (re.compile(r".*isinstance\(treespec, LeafSpec\)"), FutureWarning),
    (re.compile(r"The maximum number of concurrent tasks"), UserWarning),
]


def _quiet_showwarning(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if any(issubclass(category, c) and p.match(str(message)) for p, c in _ADVICE):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._dynamix_quiet = True
    return showwarning


def where_lines(report: str | None, tracking_uri: str | None) -> list[str]:
    """Where to look next: the report, the MLflow store, and Ray's log files."""
    lines = [f"report: {report}"] if report else []
    if tracking_uri:
        lines.append(f"MLflow: {tracking_uri}" + (f"  (mlflow ui --backend-store-uri {tracking_uri})"
                                                  if tracking_uri.startswith("sqlite") else ""))
    lines.append(f"Ray logs: {ray_logs_dir()}  (set {RAY_LOGS_TO_CONSOLE_ENV}=1 to see them on the console)")
    return lines


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
