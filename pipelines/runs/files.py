"""Crash-safe files of a training run: atomic writes (temp + fsync + rename + fsync of the folder),
the metric history that tolerates a torn line and records each step once across restarts, and the
record of every (re)start. Checkpoints are :mod:`dynamix_core.engine.checkpoint`'s.

The run folder may be an object-store URI (``s3://bucket/runs/NAME``, :mod:`dynamix_core.storage`).
An object cannot be appended to: the metric history is written there in bounded parts that are
folded into ``history.jsonl`` when the writer opens and closes (:class:`MetricHistory`); the record of
(re)starts is rewritten whole (one upload, seen whole or not at all; one line per restart).
What cannot live in a bucket stays in a local folder of the run (:func:`local_run_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path


from dynamix_core import storage
from dynamix_core.atomic import fsync_dir, write_atomic  # noqa: F401  (re-exported for the run files)

log = logging.getLogger("dynamix.train")


def local_run_dir(run_dir: str | Path) -> Path:
    """The local folder of a run on an object store, for what must be a local file: the default
    MLflow sqlite store, the MLflow spools, the copy of the exported weights that is logged and
    registered. ``$XDG_CACHE_HOME/dynamix/runs/NAME-HASH`` (``~/.cache`` by default; the system
    temporary folder when that is not writable), HASH from the run's URI so that runs of the same name
    in two buckets stay apart. A local run folder is its own local folder."""
    if not storage.is_remote(run_dir):
        return Path(run_dir)
    run_dir = str(run_dir).rstrip("/")
    leaf = f"{storage.name(run_dir)}-{hashlib.sha256(run_dir.encode()).hexdigest()[:10]}"
    folder = storage.cache_dir("runs") / leaf
    folder.mkdir(exist_ok=True)
    return folder


def _read_text(path: str | Path) -> str | None:
    """The text of a local file or an object (None when there is none)."""
    try:
        return storage.read_bytes(path).decode(errors="replace")
    except FileNotFoundError:
        return None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a torn or garbled line (a crash mid-append) is skipped with a warning."""
    text = _read_text(path)
    return [] if text is None else parse_jsonl(text, path)


def parse_jsonl(text: str, source: str | Path) -> list[dict]:
    """The records of JSON-lines ``text`` read from ``source`` (named in the warning for a torn line)."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: line %d is not a JSON record (torn by a crash?); skipped", source, number)
    return rows


#: records per part of a history on an object store (each record rewrites its part, at most this many lines)
PART_RECORDS = 64


def _part_path(path: str | Path, number: int) -> str:
    return f"{str(path).rstrip('/')}.part-{number:06d}"


def _part_uris(path: str | Path) -> list[str]:
    """The parts of a history on an object store (``history.jsonl.part-NNNNNN``, beside it: a folder
    of their own would leave an empty-folder marker behind once they are folded), in write order;
    none for a local history."""
    if not storage.is_remote(path):
        return []
    folder, name = str(path).rstrip("/").rsplit("/", 1)
    return [storage.join(folder, n) for n in sorted(storage.listdir(folder)) if n.startswith(f"{name}.part-")]


def merge_history(parts: list[list[dict]]) -> list[dict]:
    """The records of ``history.jsonl`` and then of its unfolded parts, each step once (a step found
    twice, after a writer died between folding and deleting its parts, keeps its first record)."""
    rows, steps = [], set()
    for part in parts:
        for r in part:
            if "step" in r:
                if r["step"] in steps:
                    continue
                steps.add(r["step"])
            rows.append(r)
    return rows


def read_history_file(path: str | Path) -> list[dict]:
    """The records of a metric history: ``path`` (``history.jsonl``) and, on an object store, the parts
    a writer appended since it last folded them into ``path`` (:func:`merge_history`)."""
    return merge_history([read_jsonl(path)] + [read_jsonl(part) for part in _part_uris(path)])


class MetricHistory:
    """``history.jsonl`` of rank 0: one JSON line per metric report, each step recorded once.

    A restart replays the steps after its checkpoint; their rows (and MLflow values) from the
    attempt that first reached them are kept, and the replay does not write them again. Opening
    cuts a torn last line off (rewriting the file atomically).

    An object cannot be appended to: on an object store each record rewrites only the current part,
    ``history.jsonl.part-NNNNNN`` (at most :data:`PART_RECORDS` lines), and opening and closing
    fold the parts into ``history.jsonl`` (one upload of the whole history each). A record is thus
    uploaded a bounded number of times, not once per later record; readers use
    :func:`read_history_file`, which sees the parts of a writer that died before closing."""

    def __init__(self, path: str | Path):
        self.remote = storage.is_remote(path)
        self.path = str(path) if self.remote else Path(path)
        rows = read_history_file(self.path)
        self.steps = {int(r["step"]) for r in rows if "step" in r}
        self._text = "".join(json.dumps(r) + "\n" for r in rows)  # the whole history (folded at open and close)
        self._file = None
        if self.remote:
            self._part, self._part_text = 0, ""  # the part being written and its lines
            self._fold()
            return
        if self.path.is_file():
            text = self.path.read_text(errors="replace")
            if len([ln for ln in text.splitlines() if ln.strip()]) != len(rows) or not text.endswith("\n"):
                write_atomic(self.path, self._text)
        self._file = open(self.path, "a")

    def _fold(self) -> None:
        """history.jsonl := every record; then the parts are deleted (a reader meeting both keeps each step once)."""
        parts = _part_uris(self.path)
        if not parts and not self._part_text:
            return
        storage.write_bytes_atomic(self.path, self._text.encode())
        for part in parts:
            storage.delete(part)
        self._part, self._part_text = 0, ""

    def __contains__(self, step: int) -> bool:
        return step in self.steps

    def append(self, metrics: dict) -> None:
        """Record ``metrics`` (with its ``step``) unless that step is recorded already."""
        step = int(metrics["step"])
        if step in self.steps:
            return
        line = json.dumps(metrics) + "\n"
        if self.remote:
            if self._part_text.count("\n") == PART_RECORDS:
                self._part, self._part_text = self._part + 1, ""
            self._part_text += line
            storage.write_bytes_atomic(_part_path(self.path, self._part), self._part_text.encode())
            self._text += line
        else:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        self.steps.add(step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.remote:
            self._fold()


def record_start(run_dir: str | Path, start_step: int) -> None:
    """Append this (re)start of the worker group to ``starts.jsonl``: the step it resumed at."""
    line = json.dumps({"start_step": start_step, "time": time.time()}) + "\n"
    if storage.is_remote(run_dir):  # no append on an object store: rewrite it whole
        path = storage.join(run_dir, "starts.jsonl")
        storage.write_bytes_atomic(path, (_read_text(path) or "") + line)
        return
    with open(Path(run_dir) / "starts.jsonl", "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
