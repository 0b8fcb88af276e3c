"""Checkpoints of named stateful parts, per rank, verified before use.

A recipe registers its parts once: the *shared* ones (the networks and optimizers: written by rank
0 only) and the *per-rank* ones (a sharded centroid bank, the sampler position, the RNGs). A part
whose file ends in ``.pt`` holds tensors in plain containers (written with ``torch.save``, read
with ``weights_only=True``: never unpickles code); ``.json`` holds the rest. ``{rank}`` in a file
name is replaced by the rank.

Every rank also writes ``manifest_rank<R>.json``: the size and SHA-256 of each file it wrote, and
rank 0 writes ``progress.json`` (the step and the recipe's progress fields) last. A checkpoint is
*intact* when every file its manifests list is there with its size and digest
(:func:`verify_checkpoint`); loading a damaged one raises :class:`CheckpointDamaged` naming the
folder and the file.

    ckpt = Checkpointer(rank, progress=lambda: {"label_version": client.version})
    ckpt.add("trainer.pt", trainer, shared=True)
    ckpt.add("bank_rank{rank}.pt", bank)
    ckpt.add_state("state_rank{rank}.json", save=lambda step: {...}, load=lambda state: ...)
    folder = ckpt.save(step)           # a new temporary folder holding this rank's files
    start = ckpt.load(folder)          # the step it was written at
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

PROGRESS_FILE = "progress.json"
MANIFEST_GLOB = "manifest_rank*.json"


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is missing, truncated or altered (the message names folder and file)."""


# --- RNG and file helpers ------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as JSON-safe data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _numpy_scalar(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable checkpoint state")


def save_json(path: str | Path, obj) -> None:
    """Checkpoint state as JSON (NumPy scalars become Python numbers)."""
    Path(path).write_text(json.dumps(obj, default=_numpy_scalar))


def load_json(path: str | Path):
    return json.loads(Path(path).read_text())


def load_tensors(path: str | Path, device: torch.device | str = "cpu"):
    """A checkpoint ``.pt`` (tensors in plain containers): never unpickles code (``weights_only``)."""
    return torch.load(path, map_location=device, weights_only=True)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CheckpointDamaged` unless every file the manifests list is intact and rank 0's
    progress is there. A checkpoint without manifests (written before they existed) passes."""
    folder = Path(folder)
    manifests = sorted(folder.glob(MANIFEST_GLOB))
    if not manifests:
        return
    if not (folder / PROGRESS_FILE).is_file():
        raise CheckpointDamaged(f"checkpoint {folder}: {PROGRESS_FILE} is missing (a partial checkpoint)")
    for manifest in manifests:
        try:
            listed = load_json(manifest)["files"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointDamaged(f"checkpoint {folder}: {manifest.name} is unreadable ({exc})") from None
        for name, want in listed.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointDamaged(f"checkpoint {folder}: {name} is missing")
            size = path.stat().st_size
            if size != want["size"]:
                raise CheckpointDamaged(f"checkpoint {folder}: {name} has {size} bytes, {want['size']} were written")
            if file_digest(path) != want["sha256"]:
                raise CheckpointDamaged(f"checkpoint {folder}: {name} does not match its SHA-256 (altered after writing)")


# --- parts ---------------------------------------------------------------------------------------


@dataclass
class Part:
    file: str  # may contain "{rank}"
    save: Callable[[int], Any]  # step -> state
    load: Callable[[Any], None]
    shared: bool  # written by rank 0 only, read by every rank


class Checkpointer:
    """Saves and restores the registered parts of one rank (see the module docstring)."""

    def __init__(self, rank: int, *, progress: Callable[[], dict] | None = None,
                 device: torch.device | str = "cpu", rng: bool = True):
        self.rank, self.device = rank, device
        self.progress = progress or (lambda: {})
        self.parts: list[Part] = []
        if rng:
            self.add_state("rng_rank{rank}.json", save=lambda step: rng_state(), load=set_rng_state)

    def add(self, file: str, obj, *, shared: bool = False) -> None:
        """A part with ``state_dict()`` / ``load_state_dict()``."""
        self.parts.append(Part(file, lambda step: obj.state_dict(), obj.load_state_dict, shared))

    def add_state(self, file: str, *, save: Callable[[int], Any], load: Callable[[Any], None],
                  shared: bool = False) -> None:
        self.parts.append(Part(file, save, load, shared))

    def _mine(self) -> list[tuple[Part, str]]:
        return [(p, p.file.format(rank=self.rank)) for p in self.parts if self.rank == 0 or not p.shared]

    def save(self, step: int, folder: str | Path | None = None) -> Path:
        """Write this rank's parts for ``step`` into ``folder`` (default: a new temporary folder);
        the manifest after the parts, rank 0's progress last."""
        out = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"dynamix-ckpt-{step}-r{self.rank}-"))
        out.mkdir(parents=True, exist_ok=True)
        listed = {}
        for part, name in self._mine():
            state = part.save(step)
            if name.endswith(".pt"):
                torch.save(state, out / name)
            else:
                save_json(out / name, state)
            listed[name] = {"size": (out / name).stat().st_size, "sha256": file_digest(out / name)}
        _write_synced(out / f"manifest_rank{self.rank}.json", json.dumps({"step": step, "files": listed}))
        if self.rank == 0:
            _write_synced(out / PROGRESS_FILE, json.dumps({"step": step, **self.progress()}, default=_numpy_scalar))
        return out

    def read_progress(self, folder: str | Path) -> dict:
        """Rank 0's ``progress.json`` of a verified checkpoint."""
        verify_checkpoint(folder)
        return load_json(Path(folder) / PROGRESS_FILE)

    def load(self, folder: str | Path) -> int:
        """Verify the checkpoint, restore every part of this rank; returns its step."""
        folder = Path(folder)
        progress = self.read_progress(folder)
        for part, name in [(p, p.file.format(rank=self.rank)) for p in self.parts]:
            path = folder / name
            if not path.is_file():
                raise CheckpointDamaged(f"checkpoint {folder}: {name} is missing")
            part.load(load_tensors(path, self.device) if name.endswith(".pt") else load_json(path))
        return int(progress["step"])


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
