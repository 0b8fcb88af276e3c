"""The training runs under a storage root, as ``dynamix runs`` lists them.

A run folder is what ``dynamix train`` writes under ``run.storage/run.name``: ``config.yaml``,
``history.jsonl`` (one metric report per line, rank 0), Ray Train's ``checkpoint_*`` folders,
``labels/`` (the label store: ``v00000000.snap.npy`` and one ``vNNNNNNNN.delta.npz`` per later
version, old ones retired) and, once the run has ended, ``result.json``. Local folders
and object-store URIs (through pyarrow's file systems) are read the same way.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipelines.runs.files import merge_history, parse_jsonl

#: the deployment's shared storage root: the Helm chart sets it (its ``storage.uri``) on every Ray pod
STORAGE_URI_ENV = "DYNAMIX_STORAGE_URI"
_LABEL_VERSION_RE = re.compile(r"v(\d{8})\.(?:delta\.npz|snap\.npy)")
#: metrics shown per run, in this order (the ones a run reported)
SHOWN_METRICS = ("eval/mAP", "eval/rank1", "images_per_s")


@dataclass
class RunInfo:
    """One run folder, summarised."""

    name: str
    status: str  # finished | unfinished (interrupted, or still running)
    last_step: int | None
    checkpoints: int
    label_versions: int
    metrics: dict[str, float] = field(default_factory=dict)


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read().decode()
    except (FileNotFoundError, OSError):
        return None


def _entries(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []


def _history(fs: pafs.FileSystem, path: str, entries: dict) -> tuple[list[dict], list]:
    """The run's metric reports: history.jsonl, then the parts a writer on an object store has not
    folded into it yet (:func:`pipelines.runs.files.merge_history`); and the modification times of
    the files that hold them."""
    parts = sorted((i for i in entries.values() if i.base_name.startswith("history.jsonl.part-")),
                   key=lambda i: i.base_name)
    files = [f"{path}/history.jsonl"] + [part.path for part in parts]
    mtimes = [i.mtime for i in parts] + ([entries["history.jsonl"].mtime] if "history.jsonl" in entries else [])
    return merge_history([parse_jsonl(_read_text(fs, f) or "", f) for f in files]), mtimes


def summarise_run(fs: pafs.FileSystem, path: str, name: str) -> RunInfo:
    entries = {info.base_name: info for info in _entries(fs, path)}
    history, history_mtimes = _history(fs, path, entries)
    result_text = _read_text(fs, f"{path}/result.json") if "result.json" in entries else None
    # finished: its result is newer than every report (a resumed run trains on after an older result)
    finished = result_text is not None and all(entries["result.json"].mtime >= t for t in history_mtimes)
    metrics: dict[str, float] = {}
    for report in history:  # the latest value of each metric over the run
        metrics.update({k: float(v) for k, v in report.items() if k in SHOWN_METRICS})
    if finished:
        metrics.update({k: float(v) for k, v in json.loads(result_text).get("metrics", {}).items() if k in SHOWN_METRICS})
    checkpoints = sum(1 for n, info in entries.items() if n.startswith("checkpoint_") and info.type == pafs.FileType.Directory)
    versions = [info.base_name for info in _entries(fs, f"{path}/labels")]
    return RunInfo(
        name=name, status="finished" if finished else "unfinished", last_step=history[-1]["step"] if history else None,
        # versions are numbered from 0 and old ones are retired: the count is the newest number + 1
        checkpoints=checkpoints, label_versions=1 + max(
            (int(m.group(1)) for v in versions if (m := _LABEL_VERSION_RE.fullmatch(v))), default=-1),
        metrics={k: metrics[k] for k in SHOWN_METRICS if k in metrics},
    )


def storage_root() -> str | None:
    """The deployment's shared storage root, ``$DYNAMIX_STORAGE_URI`` (None when unset)."""
    root = os.environ.get(STORAGE_URI_ENV, "").strip()
    return root.rstrip("/") or None


def default_runs_root() -> str:
    """Where training runs go unless ``run.storage`` says otherwise: ``$DYNAMIX_STORAGE_URI/runs``
    (where the chart's training job puts them), else ``runs`` in the working directory."""
    root = storage_root()
    return f"{root}/runs" if root else "runs"


def list_runs(storage: str) -> list[RunInfo]:
    """Every run folder (a folder holding ``config.yaml``) directly under ``storage``, by name."""
    from dynamix_core.storage import resolve

    fs, root = resolve(storage)  # the endpoint and region from the AWS variables, as training uses them
    runs = []
    for info in sorted(_entries(fs, root), key=lambda i: i.base_name):
        if info.type == pafs.FileType.Directory and fs.get_file_info(f"{info.path}/config.yaml").is_file:
            runs.append(summarise_run(fs, info.path, info.base_name))
    return runs


def format_runs(runs: list[RunInfo], storage: str) -> str:
    if not runs:
        return f"no runs under {storage} (a run is a folder with config.yaml; see --storage)"
    header = ("run", "status", "last step", "checkpoints", "label versions", "mAP", "Rank-1", "img/s")
    rows = [header]
    for r in runs:
        pct = {k: f"{100 * r.metrics[k]:.1f}" if k in r.metrics else "-" for k in ("eval/mAP", "eval/rank1")}
        rows.append((r.name, r.status, "-" if r.last_step is None else str(r.last_step), str(r.checkpoints),
                     str(r.label_versions), pct["eval/mAP"], pct["eval/rank1"],
                     f"{r.metrics['images_per_s']:.0f}" if "images_per_s" in r.metrics else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
