"""``labeling.deterministic``: the demo recipe (DynaMix, two Ray Train workers, the labelling pool
relabelling while they train), killed after a checkpoint and run again, equals an uninterrupted run
step by step: every loss term of every step, bit for bit. The reference is that uninterrupted run,
trained in the same test; the kill comes whenever the first checkpoint is registered (the equality
must hold wherever it lands)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import live_actor_pids, make_tiny_reid
from dynamix_core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray
MAX_STEPS, CHECKPOINT_EVERY = 20, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("deterministic"), num_videos=8)


def _cfg(root: Path, name: str, *extra: str):
    from pipelines.train.config import TrainConfig

    shards = root / "shards"
    return load_config(TrainConfig, REPO / "recipes" / "dynamix_demo.yaml", [
        f"run.name={name}", f"run.storage={root / 'runs'}", f"run.max_steps={MAX_STEPS}", "run.log_every=1",
        f"run.checkpoint_every={CHECKPOINT_EVERY}", "run.eval_every=0", "tracking.uri=null",
        f"data.multi=[{shards / 'synth_m0'},{shards / 'synth_m1'}]", f"data.single=[{shards / 'synth_video'}]",
        "data.target=null", "data.transform.height=32", "data.transform.width=16", "model.img_size=[32,16]",
        "sampler.num_multi_ids=4", "sampler.num_videos=2", "sampler.ids_per_video=2", "sampler.single_images_per_id=2",
        "sampler.video_buffer_size=3", "labeling.publish_every=4", "labeling.relabel.warmup_fraction=0.0",
        "labeling.embed_batch_size=64", "labeling.ground_truth=[]", "labeling.deterministic=true",
        "labeling.apply_after=2", "scaling.max_failures=0", *extra])


def _history(run_dir: Path) -> dict[int, dict]:
    from pipelines.runs.files import read_history_file

    return {r["step"]: r for r in read_history_file(run_dir / "history.jsonl")}


def _losses(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith("loss/") or k == "label_version"}


@pytest.mark.slow
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one_step_by_step(ray_local, tiny):
    from pipelines.runs.files import read_jsonl
    from pipelines.train.driver import run_training

    straight = run_training(_cfg(tiny, "straight"), progress=False)
    want = _history(straight.run_dir)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    versions = [want[s]["label_version"] for s in sorted(want)]
    assert len(set(versions)) >= 3, versions  # relabelling rounds changed the labels during the run

    cfg = _cfg(tiny, "killed")
    run_dir = Path(cfg.run.storage) / cfg.run.name
    killed: dict[str, int] = {}

    def killer():
        # Ray Train registers a checkpoint when its controller next polls the workers (every 2 s)
        seen, deadline = None, time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if seen is None and any(run_dir.glob("checkpoint_*/progress.json")):
                seen = time.monotonic()
            if seen is not None and time.monotonic() > seen + 3:
                pids = live_actor_pids("RayTrainWorker")
                steps = sorted(_history(run_dir)) if (run_dir / "history.jsonl").exists() else [0]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.update(pid=pids[-1], step=steps[-1])
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(Exception):
        run_training(cfg, progress=False)  # scaling.max_failures=0: the run stops; re-running resumes it
    thread.join(timeout=10)
    assert killed and killed["step"] < MAX_STEPS, killed
    resumed = run_training(cfg, progress=False)
    starts = [r["start_step"] for r in read_jsonl(run_dir / "starts.jsonl")]
    assert starts[0] == 0 and starts[-1] > 0 and starts[-1] % CHECKPOINT_EVERY == 0, starts
    got = _history(resumed.run_dir)
    assert sorted(got) == sorted(want)
    for step in sorted(want):
        assert _losses(got[step]) == _losses(want[step]), (step, starts, _losses(got[step]), _losses(want[step]))


def test_only_dynamix_has_step_locked_label_versions(tmp_path, monkeypatch):
    from pipelines.train.config import TrainConfig

    monkeypatch.setenv("DYNAMIX_STORAGE_URI", str(tmp_path))
    with pytest.raises(ConfigError, match="labeling.deterministic: step-locked label versions are DynaMix's"):
        load_config(TrainConfig, REPO / "recipes" / "remix_demo.yaml", ["labeling.deterministic=true"])
    assert load_config(TrainConfig, REPO / "recipes" / "dynamix_demo.yaml",
                       ["labeling.deterministic=true"]).labeling.apply_after == 10
