"""Damaged, missing and cut-off checkpoints never take a run down: the snapshot Ray Train resumes
from is repaired to the newest intact checkpoint (local and on S3), and a real Ray Train run whose
newest checkpoint was truncated, or whose newest checkpoint folder was deleted by hand, resumes from
the one before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynamix_core import storage
from dynamix_core.engine import Checkpointer

SNAPSHOT = "checkpoint_manager_snapshot.json"


class Weights:
    def __init__(self, value: float):
        self.w = torch.full((64,), value)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def _fake_run(run_dir: str, tmp_path: Path, steps=(3, 6, 9)) -> list[str]:
    """A run folder as Ray Train leaves it: checkpoint folders written by the engine's checkpointer
    and a snapshot listing them (oldest first, report indices rising)."""
    names = []
    for i, step in enumerate(steps):
        ckpt = Checkpointer(0)
        ckpt.add("trainer.pt", Weights(float(step)), shared=True)
        local = ckpt.save(step, tmp_path / f"c{step}")
        name = f"checkpoint_2026-12-07_00-00-0{i}.000000"
        storage.makedirs(storage.join(run_dir, name))
        for f in local.iterdir():
            storage.write_bytes_atomic(storage.join(run_dir, name, f.name), f.read_bytes())
        names.append(name)
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"step": s}} for n, s in zip(names, steps)]
    snap = {"ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": [1, 3, 5],
            "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": 6, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    storage.write_bytes_atomic(storage.join(run_dir, SNAPSHOT), json.dumps(snap))
    return names


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/runs/r"


def test_truncated_newest_checkpoint_is_named_dropped_and_the_run_resumes_from_the_previous(run_dir, tmp_path):
    from pipelines.checkpoints import repair_checkpoints

    names = _fake_run(run_dir, tmp_path)
    newest = storage.join(run_dir, names[2], "trainer.pt")
    storage.write_bytes_atomic(newest, storage.read_bytes(newest)[:100])
    # a folder the snapshot does not list: an upload that was cut off
    storage.makedirs(storage.join(run_dir, "checkpoint_2026-12-07_00-00-09.000000"))
    storage.write_bytes_atomic(storage.join(run_dir, "checkpoint_2026-12-07_00-00-09.000000", "trainer.pt"), b"x")
    lines = []
    assert repair_checkpoints(run_dir, echo=lines.append) == 2
    assert lines[0] == (f"[train] checkpoint {storage.join(run_dir, names[2])} cannot be used: trainer.pt has 100 bytes, "
                        f"{len(storage.read_bytes(storage.join(run_dir, names[1], 'trainer.pt')))} were written; "
                        "resuming from an older one")
    assert "writing was cut off" in lines[1] and len(lines) == 2
    snap = json.loads(storage.read_bytes(storage.join(run_dir, SNAPSHOT)))
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == names[:2]
    assert snap["checkpoint_report_indices"] == [1, 3]
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == names[1]
    folders = {rel.split("/")[0] for rel in storage.list_tree(run_dir) if rel.startswith("checkpoint_") and "/" in rel}
    assert folders == set(names[:2])
    lines.clear()
    assert repair_checkpoints(run_dir, echo=lines.append) == 2 and lines == []  # nothing left to repair


def test_a_deleted_checkpoint_folder_and_a_flipped_byte_are_both_caught(run_dir, tmp_path):
    from pipelines.checkpoints import repair_checkpoints

    names = _fake_run(run_dir, tmp_path)
    for rel in storage.list_tree(storage.join(run_dir, names[2])):  # deleted by hand
        storage.delete(storage.join(run_dir, names[2], rel))
    middle = storage.join(run_dir, names[1], "trainer.pt")
    data = bytearray(storage.read_bytes(middle))
    data[-1] ^= 1  # same size, altered
    storage.write_bytes_atomic(middle, bytes(data))
    lines = []
    assert repair_checkpoints(run_dir, echo=lines.append) == 1
    assert "its folder is missing or empty" in lines[0] and "does not match its SHA-256" in lines[1]
    snap = json.loads(storage.read_bytes(storage.join(run_dir, SNAPSHOT)))
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == names[0]
