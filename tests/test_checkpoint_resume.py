"""A real Ray Train run whose newest checkpoint was truncated resumes from the one before it (named
on the console), and a run whose newest checkpoint folder was deleted by hand resumes too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_reid
from dynamix_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_reid(tmp_path_factory.mktemp("resume"), num_videos=1)


def _cfg(data: Path, runs: Path, max_steps: int):
    """The multi-camera demo recipe on the tiny shards under ``data``, its run folder under ``runs``."""
    from pipelines.train.config import TrainConfig

    shards = data / "shards"
    return load_config(TrainConfig, REPO / "recipes" / "multicam_baseline_demo.yaml", [
        "run.name=damaged", f"run.storage={runs}", f"run.max_steps={max_steps}", "run.log_every=2",
        "run.checkpoint_every=2", "run.eval_every=0", "run.keep_checkpoints=3",
        f"data.multi=[{shards / 'synth_m0'},{shards / 'synth_m1'}]", "data.target=null",
        "data.transform.height=32", "data.transform.width=16", "model.img_size=[32,16]", "sampler.num_multi_ids=4",
        "scaling.num_workers=1", "scaling.max_failures=0"])


def _starts(run_dir: Path) -> list[int]:
    return [json.loads(line)["start_step"] for line in (run_dir / "starts.jsonl").read_text().splitlines()]


def _newest(run_dir: Path) -> Path:
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return run_dir / snap["latest_checkpoint_result"]["checkpoint_dir_name"]


def _truncated_newest_resumes_from_the_previous(data: Path, runs: Path, capsys) -> Path:
    from pipelines.train.driver import run_training

    run_dir = run_training(_cfg(data, runs, 4), progress=False).run_dir
    newest = _newest(run_dir)
    assert json.loads((newest / "progress.json").read_text())["step"] == 4
    (newest / "trainer.pt").write_bytes((newest / "trainer.pt").read_bytes()[:1000])  # truncated

    result = run_training(_cfg(data, runs, 6), progress=True)
    assert f"checkpoint {newest} cannot be used: trainer.pt has 1000 bytes" in capsys.readouterr().out
    assert _starts(run_dir) == [0, 2]  # resumed from the checkpoint at step 2, not from scratch
    assert result.metrics["step"] == 6 and not newest.exists()
    return run_dir


def test_truncated_newest_checkpoint_resumes_from_the_previous(ray_local, tiny, tmp_path, capsys):
    _truncated_newest_resumes_from_the_previous(tiny, tmp_path, capsys)


@pytest.mark.slow
def test_truncated_then_deleted_newest_checkpoint_resumes_from_the_previous(ray_local, tiny, tmp_path, capsys):
    """The same, then the newest folder deleted by hand (each case is also caught without Ray by
    tests/test_checkpoint_repair.py)."""
    from pipelines.train.driver import run_training

    run_dir = _truncated_newest_resumes_from_the_previous(tiny, tmp_path, capsys)
    shutil.rmtree(_newest(run_dir))  # the newest folder deleted by hand
    result = run_training(_cfg(tiny, tmp_path, 8), progress=False)
    assert _starts(run_dir) == [0, 2, 4]
    assert result.metrics["step"] == 8
