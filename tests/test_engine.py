"""The training engine: its cadences and metric window against a loop written by hand, checkpoints
verified before use, and the shipped multi-camera recipe on the local runner resumed after a crash
equal to an uninterrupted run step by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_reid
from dynamix_core.config import load_config
from dynamix_core.engine import CheckpointDamaged, Checkpointer, Engine, Hook, StepResult, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Recorder(Hook):
    def __init__(self):
        self.calls = []

    def before_step(self, step):
        self.calls.append(("before", step))
        self.engine.window.time("hook", 0.0)

    def at_report(self, done, metrics):
        self.calls.append(("report", done))
        metrics["hook/done"] = done


class ListReporter:
    def __init__(self):
        self.rows, self.saved, self.closed = [], [], False

    def report(self, done, metrics, checkpoint_dir):
        self.rows.append(metrics)
        self.saved.append(done if checkpoint_dir is not None else None)

    def close(self):
        self.closed = True


class Counter:
    def __init__(self):
        self.value = torch.zeros(1)

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"].clone()


def test_engine_cadences_and_window_means_match_a_hand_written_loop(tmp_path):
    losses = [float(s * s % 7) for s in range(10)]

    def step(s):
        return StepResult(means={"loss/x": losses[s]}, last={"lr": 0.1 * s}, images=4)

    counter = Counter()
    ckpt = Checkpointer(0, rng=False)
    ckpt.add("counter.pt", counter, shared=True)
    hook, reporter = Recorder(), ListReporter()
    Engine(step, max_steps=10, log_every=3, checkpoint_every=6, hooks=[hook], checkpointer=ckpt, reporter=reporter,
           world_size=2).run(1)
    # reports after 3 and 6 finished steps (6 is also a checkpoint) and at the last step, 10
    assert [r["step"] for r in reporter.rows] == [3, 6, 9, 10]
    assert reporter.saved == [None, 6, None, 10]
    # means over the steps of each window: steps 1-2, 3-5, 6-8, 9 (a hand loop)
    windows = [range(1, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert [r["loss/x"] for r in reporter.rows] == pytest.approx([sum(losses[s] for s in w) / len(w) for w in windows])
    assert [r["lr"] for r in reporter.rows] == pytest.approx([0.1 * w[-1] for w in windows])
    assert all("hook_fraction" in r and r["hook/done"] == r["step"] for r in reporter.rows)
    assert hook.calls[:3] == [("before", 1), ("before", 2), ("report", 3)]
    assert reporter.closed


def test_checkpoint_round_trip_and_damage_named(tmp_path):
    counter = Counter()
    counter.value += 5
    ckpt = Checkpointer(0, progress=lambda: {"label_version": 3})
    ckpt.add("counter.pt", counter, shared=True)
    folder = ckpt.save(12, tmp_path / "c")
    counter.value.zero_()
    assert ckpt.load(folder) == 12 and float(counter.value) == 5
    assert json.loads((folder / "progress.json").read_text())["label_version"] == 3

    data = (folder / "counter.pt").read_bytes()
    (folder / "counter.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointDamaged, match=r"counter\.pt has \d+ bytes"):
        ckpt.load(folder)
    (folder / "counter.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(CheckpointDamaged, match=r"counter\.pt does not match its SHA-256"):
        verify_checkpoint(folder)
    (folder / "counter.pt").write_bytes(data)
    (folder / "progress.json").unlink()  # killed before rank 0 finished: a partial checkpoint
    with pytest.raises(CheckpointDamaged, match="progress.json is missing"):
        verify_checkpoint(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("engine"), num_videos=1)


def _cfg(root: Path, recipe: str, *extra: str):
    from pipelines.train.config import TrainConfig

    shards = root / "shards"
    return load_config(TrainConfig, REPO / "recipes" / recipe, [
        "run.max_steps=12", "run.log_every=1", "run.checkpoint_every=3", "run.eval_every=0",
        f"data.multi=[{shards / 'synth_m0'},{shards / 'synth_m1'}]", "data.target=null",
        "data.camera_centroid_every=4", "data.transform.height=32", "data.transform.width=16",
        "model.img_size=[32,16]", "sampler.num_multi_ids=4", "scaling.num_workers=1", *extra])


def test_local_runner_resumed_after_a_crash_equals_the_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Crashed in step 7 (after the checkpoint at 6, before the one at 9), resumed: steps 7-12 are
    bit-identical to an uninterrupted run. Camera centroids were refreshed at step 4 and are next
    refreshed at 8: the resumed run must continue with the ones it saved, not recompute them at 6."""
    from pipelines.train import mixing
    from pipelines.train.local import train_local

    torch.set_num_threads(1)
    cfg = _cfg(tiny, "multicam_baseline_demo.yaml")
    straight = train_local(cfg).history

    real_call = mixing.MixingStep.__call__

    def crash_at_7(self, step):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return real_call(self, step)

    monkeypatch.setattr(mixing.MixingStep, "__call__", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        train_local(cfg, checkpoints=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_0000003", "step_0000006"]
    monkeypatch.setattr(mixing.MixingStep, "__call__", real_call)
    resumed = train_local(cfg, checkpoints=tmp_path / "ckpt").history

    assert [r["step"] for r in resumed] == list(range(7, 13))
    for a, b in zip(straight[6:], resumed):
        terms = sorted(k for k in a if k.startswith("loss/"))
        assert "loss/camera_centroid" in terms
        assert [a[k] for k in terms] == [b[k] for k in terms], (a["step"], {k: (a[k], b[k]) for k in terms})
