"""The run's checkpoints as Ray Train keeps them, checked before a (re)start.

Ray Train records the run's checkpoints in ``RUN/checkpoint_manager_snapshot.json`` and restores the
newest one it lists; a listed checkpoint that is gone stops every later start, and a damaged one
fails every restart inside the workers. Before ``fit()`` the drivers call :func:`repair_checkpoints`:

* every listed checkpoint is checked against its manifests (:mod:`dynamix_core.engine.checkpoint`:
  each file there with its size; SHA-256 too for the one the run will resume from);
* a damaged or missing one is reported in one line naming it and dropped from the snapshot, so the
  run resumes from the newest intact one (a damaged folder is removed: it can never be used);
* a ``checkpoint_*`` folder the snapshot does not list (its upload was cut off) is removed.

The run folder may be local or on an object store (:mod:`dynamix_core.storage`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

from dynamix_core import storage

SNAPSHOT = "checkpoint_manager_snapshot.json"
_MANIFEST = re.compile(r"manifest_rank\d+\.json")


def checkpoint_problem(folder: str | Path, *, digests: bool = True) -> str | None:
    """Why the checkpoint ``folder`` cannot be used, or None when it is intact. A checkpoint from
    before manifests existed passes when its ``progress.json`` is there."""
    files = storage.list_tree(folder)
    if not files:
        return "its folder is missing or empty"
    if "progress.json" not in files:
        return "progress.json is missing (a partial checkpoint)"
    for name in sorted(n for n in files if _MANIFEST.fullmatch(n)):
        try:
            listed = json.loads(storage.read_bytes(storage.join(folder, name)))["files"]
        except (OSError, ValueError, KeyError) as exc:
            return f"{name} is unreadable ({exc})"
        for part, want in listed.items():
            if part not in files:
                return f"{part} is missing"
            if files[part] != want["size"]:
                return f"{part} has {files[part]} bytes, {want['size']} were written"
            if digests and hashlib.sha256(storage.read_bytes(storage.join(folder, part))).hexdigest() != want["sha256"]:
                return f"{part} does not match its SHA-256"
    return None


def _remove_tree(uri: str | Path) -> None:
    if not storage.is_remote(uri):
        shutil.rmtree(storage.local_path(uri), ignore_errors=True)
        return
    for rel in storage.list_tree(uri):
        storage.delete(storage.join(uri, rel))


def repair_checkpoints(run_dir: str | Path, echo: Callable[[str], None] = print, prefix: str = "train") -> int | None:
    """Make Ray Train resume ``run_dir`` from its newest intact checkpoint (see the module
    docstring); returns the number of usable checkpoints (None: the run has no snapshot yet)."""
    snapshot_path = storage.join(run_dir, SNAPSHOT)
    if not storage.exists(snapshot_path):
        return None
    snap = json.loads(storage.read_bytes(snapshot_path))
    results, indices = snap["checkpoint_results"], snap["checkpoint_report_indices"]
    # newest first: only the checkpoint the run will resume from has its digests read
    order = sorted(range(len(results)), key=lambda i: indices[i], reverse=True)
    bad: set[str] = set()
    resume_found = False
    for i in order:
        name = results[i]["checkpoint_dir_name"]
        folder = storage.join(run_dir, name)
        problem = checkpoint_problem(folder, digests=not resume_found)
        if problem is None:
            resume_found = True
            continue
        bad.add(name)
        echo(f"[{prefix}] checkpoint {folder} cannot be used: {problem}; "
             + ("resuming from an older one" if len(bad) < len(results) else "no intact checkpoint left: starting over"))
        _remove_tree(folder)
    listed = {r["checkpoint_dir_name"] for r in results}
    for entry in _checkpoint_folders(run_dir) - listed:
        echo(f"[{prefix}] removing {storage.join(run_dir, entry)}: a checkpoint whose writing was cut off")
        _remove_tree(storage.join(run_dir, entry))
    if bad:
        kept = [(r, i) for r, i in zip(results, indices) if r["checkpoint_dir_name"] not in bad]
        snap["checkpoint_results"] = [r for r, _ in kept]
        snap["checkpoint_report_indices"] = [i for _, i in kept]
        snap["latest_checkpoint_result"] = max(kept, key=lambda ri: ri[1])[0] if kept else None
        pending = [(r, v) for r, v in zip(snap.get("pending_training_results", []), snap.get("pending_validation_specs", []))
                   if r["checkpoint_dir_name"] not in bad]
        snap["pending_training_results"] = [r for r, _ in pending]
        snap["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            snap[key] = [n for n in snap.get(key, []) if n not in bad]
        storage.write_bytes_atomic(snapshot_path, json.dumps(snap))
    return len(results) - len(bad)


def _checkpoint_folders(run_dir: str | Path) -> set[str]:
    """Names of the ``checkpoint_*`` folders directly in the run folder."""
    if not storage.is_remote(run_dir):
        root = Path(storage.local_path(run_dir))
        return {p.name for p in root.glob("checkpoint_*") if p.is_dir()} if root.is_dir() else set()
    return {rel.split("/", 1)[0] for rel in storage.list_tree(run_dir) if rel.startswith("checkpoint_") and "/" in rel}
