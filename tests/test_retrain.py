"""Scheduled retraining (pipelines/retrain.py): cycle ids, recipe resolution, the single-camera
check, and a cycle interrupted twice (after registering, after promoting) that still ends with
exactly one new registered version and one promotion decision."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mlflow")

from dynamix_core.config import ConfigError, dump_yaml, load_config  # noqa: E402
from dynamix_core.data.synth import SynthConfig, generate  # noqa: E402
from dynamix_core.model import ModelConfig, build_encoder, read_state_dict, save_weights  # noqa: E402
from pipelines.cli import main as cli_main  # noqa: E402
from pipelines.ingest import IngestConfig, run_ingest  # noqa: E402
from pipelines.retrain import (  # noqa: E402
    JOURNAL, STEPS, RetrainConfig, RetrainError, TrainSpec, recipe_config, resolve_cycle, run_retrain, train_config,
)
from services.registry import register_model, registry_client  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "reid-retrain"
IMG = (32, 16)
MODEL = ModelConfig(backbone="test_vit", img_size=IMG, drop_path_rate=0.0)
TINY = SynthConfig(height=32, width=16, num_multi_sets=1, min_cameras=3, max_cameras=3, multi_train_ids=6,
                   multi_test_ids=3, max_cameras_per_id=3, distractors_per_set=1, junk_per_set=1, num_videos=4,
                   min_people_per_video=3, max_people_per_video=4, video_frames=24, min_track_frames=8,
                   max_track_frames=12, target_ids=4, target_cameras=3)


class InjectedCrash(Exception):
    pass


def crash_after(step_name: str):
    def hook(step: str, outputs: dict) -> None:
        if step == step_name:
            raise InjectedCrash(step)
    return hook


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny SynthReID with its multi-camera and target sets ingested (the single-camera set is
    left to the retraining's ingest step) and a 4-step DynaMix recipe on one worker."""
    root = tmp_path_factory.mktemp("retrain")
    generate(TINY, root / "data", progress=False)
    for kind, name in (("multi", "synth_m0"), ("target", "synth_target")):
        run_ingest(IngestConfig(root=root / "data" / kind / name, out=root / "shards" / name, dataset=name, workers=0),
                   progress=False)
    recipe = {
        "method": "dynamix",
        "run": {"storage": str(root / "runs"), "max_steps": 4, "log_every": 2, "checkpoint_every": 2},
        "data": {"multi": [str(root / "shards" / "synth_m0")], "target": str(root / "shards" / "synth_target"),
                 "transform": {"height": IMG[0], "width": IMG[1]}, "decode_threads": 1, "prefetch_batches": 1},
        "model": {"backbone": MODEL.backbone, "img_size": list(IMG), "drop_path_rate": 0.0, "ema_momentum": 0.9},
        "sampler": {"num_multi_ids": 4, "multi_images_per_id": 2, "num_videos": 2, "ids_per_video": 2,
                    "single_images_per_id": 2, "video_buffer_size": 2},
        "labeling": {"publish_every": 2, "max_staleness": 10, "embed_batch_size": 32},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root}


def retrain_config(root: Path, **changes) -> RetrainConfig:
    source = IngestConfig(root=root / "data" / "single" / "synth_video", out=root / "shards" / "synth_video",
                          format="luperson_nl", dataset="synth_video", workers=0)
    values = dict(name=NAME, tracking_uri=f"sqlite:///{root}/mlflow.db", state_dir=root / "state", sources=[source],
                  train=TrainSpec(recipe=root / "recipe.yaml"), suite=root / "data" / "target" / "synth_target",
                  export_onnx=False)
    return RetrainConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("recipe, expected_single", [
    ("retrain.yaml", ["/mnt/dynamix/shards/luperson_nl", "/mnt/dynamix/shards/luperson_nl_incoming"]),
    # the demo's source is already in the demo recipe's data.single: listed once
    ("retrain_demo.yaml", [str(REPO / "runs/demo/shards/synth_video")]),
])
def test_shipped_recipes_resolve(recipe, expected_single, monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root
    monkeypatch.setenv("DYNAMIX_STORAGE_URI", "/mnt/dynamix")  # the production recipe's paths live under it
    cfg = load_config(RetrainConfig, REPO / "recipes" / recipe)
    train = recipe_config(cfg)
    assert [str(Path(p).resolve()) for p in train.data.single] == expected_single
    assert train.method == "dynamix"


def test_recipe_overrides_apply_and_typos_fail(world):
    cfg = retrain_config(world["root"], train=TrainSpec(recipe=world["root"] / "recipe.yaml",
                                                        overrides=["run.max_steps=6", "optim.lr=0.01"]))
    train = recipe_config(cfg)
    assert (train.run.max_steps, train.optim.lr) == (6, 0.01)
    assert train.data.single == [str(world["root"] / "shards" / "synth_video")]  # the recipe had none
    with pytest.raises(ConfigError, match="max_stepz"):
        recipe_config(retrain_config(world["root"], train=TrainSpec(recipe=world["root"] / "recipe.yaml",
                                                                    overrides=["run.max_stepz=6"])))


def test_start_from_champion_or_recipe_weights(world):
    recipe_weights = "/weights/lup_backbone.safetensors"
    cfg = retrain_config(world["root"], train=TrainSpec(recipe=world["root"] / "recipe.yaml",
                                                        overrides=[f"model.weights={recipe_weights}"]))
    first = train_config(cfg, "c1", {"weights": None})  # no champion yet
    assert (first.model.weights, first.model.weights_scope) == (recipe_weights, "backbone")
    later = train_config(cfg, "c2", {"weights": "/state/c2/champion/weights.safetensors"})
    assert (later.model.weights, later.model.weights_scope) == ("/state/c2/champion/weights.safetensors", "encoder")
    assert (first.run.name, later.run.name) == (f"{NAME}-retrain-c1", f"{NAME}-retrain-c2")
    assert later.tracking.uri == cfg.tracking_uri


def test_cycle_id_given_dated_or_unfinished(tmp_path):
    now = datetime(2026, 11, 21, 3, 0, tzinfo=timezone.utc)
    assert resolve_cycle(tmp_path, "nightly-7", "%Y%m%d", now)[0] == "nightly-7"
    assert resolve_cycle(tmp_path, None, "%Y%m%d", now)[0] == "20261121"
    assert resolve_cycle(tmp_path, None, "%G-w%V", now)[0] == "2026-w47"
    with pytest.raises(ConfigError, match="cycle_format"):
        resolve_cycle(tmp_path, None, "%Y/%m/%d", now)
    with pytest.raises(ConfigError, match="--cycle"):
        resolve_cycle(tmp_path, "a/b", "%Y%m%d", now)
    for cycle, started, finished in (("old", "2026-11-01T00:00:00+00:00", "2026-11-01T05:00:00+00:00"),
                                     ("crashed", "2026-11-14T00:00:00+00:00", None)):
        (tmp_path / cycle).mkdir()
        (tmp_path / cycle / JOURNAL).write_text(json.dumps({"cycle": cycle, "started": started, "finished": finished}))
    # a crashed cycle is continued, even on a later day
    assert resolve_cycle(tmp_path, None, "%Y%m%d", now)[0] == "crashed"


def test_multi_camera_source_is_rejected(world):
    root = world["root"]
    multi = IngestConfig(root=root / "data" / "multi" / "synth_m0", out=root / "shards" / "m0_as_source",
                         dataset="synth_m0", workers=0)
    cfg = retrain_config(root, sources=[multi], state_dir=root / "state_multi")
    with pytest.raises(RetrainError, match=r"sources\[0\].*no single-camera videos"):
        run_retrain(cfg, cycle="c1", echo=lambda line: None)
    assert json.loads((root / "state_multi" / "c1" / JOURNAL).read_text())["steps"] == {}


# ------------------------------------------------------------------------------------- full cycle


def test_retrain_rerun_after_crashes_registers_one_version(world, ray_local, monkeypatch, capsys):
    root = world["root"]
    monkeypatch.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the test folder
    cfg = retrain_config(root, margin=-1.0)  # any score wins: the promotion outcome is known in advance
    client = registry_client(cfg.tracking_uri)

    # the current champion: a seeded random encoder, registered as version 1
    torch.manual_seed(7)
    champion = build_encoder(MODEL).eval()
    save_weights(champion, root / "champion.safetensors")
    assert register_model(root / "champion.safetensors", MODEL, NAME, cfg.tracking_uri, export_onnx=False,
                          artifact_location=str(root / "artifacts")).version == "1"
    client.set_registered_model_alias(NAME, "champion", "1")

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))

    lines: list[str] = []
    run_name = None
    try:
        # 1. crash right after register_model returned, before the journal recorded it
        with pytest.raises(InjectedCrash):
            run_retrain(cfg, echo=lines.append, before_commit=crash_after("register"))
        assert versions() == ["1", "2"]
        journal_path = next((root / "state").glob(f"*/{JOURNAL}"))
        journal = json.loads(journal_path.read_text())
        cycle = journal["cycle"]
        assert list(journal["steps"]) == ["ingest", "base", "train", "evaluate"]
        assert journal["steps"]["ingest"]["outputs"]["sources"][0]["videos"] == TINY.num_videos
        base = journal["steps"]["base"]["outputs"]
        assert base["champion_version"] == "1"
        # training started from the champion's weights: the downloaded file holds its tensors
        downloaded = read_state_dict(base["weights"])
        expected = champion.state_dict()
        assert downloaded.keys() == expected.keys()
        assert all(torch.equal(downloaded[k], expected[k]) for k in expected)
        train = journal["steps"]["train"]["outputs"]
        run_name = train["run_name"]
        assert run_name == f"{NAME}-retrain-{cycle}"
        run_cfg = yaml.safe_load((Path(train["run_dir"]) / "config.yaml").read_text())
        assert (run_cfg["model"]["weights"], run_cfg["model"]["weights_scope"]) == (base["weights"], "encoder")

        # 2. the re-run continues the unfinished cycle: registering again finds version 2; crash after promoting
        with pytest.raises(InjectedCrash):
            run_retrain(cfg, echo=lines.append, before_commit=crash_after("promote"))
        assert versions() == ["1", "2"]
        assert f"[retrain] register: done - models:/{NAME}/2 (already registered)" in lines
        journal = json.loads(journal_path.read_text())
        assert journal["steps"]["register"]["outputs"]["version"] == "2"
        assert journal["steps"]["register"]["outputs"]["created"] is False
        assert "promote" not in journal["steps"]
        tags = client.get_model_version(NAME, "2").tags
        assert (tags["promotion.decision"], tags["dynamix.retrain_cycle"], tags["dynamix.base_version"]) == \
            ("promoted", cycle, "1")
        decided_at = tags["promotion.timestamp"]

        # 3. the next re-run only finishes the promote step, adopting the decision already made
        result = run_retrain(cfg, echo=lines.append)
        assert (result.cycle, result.ran) == (cycle, ["promote"])
        assert result.journal["steps"]["promote"]["outputs"]["adopted"] is True
        assert result.journal["finished"] and list(result.journal["steps"]) == list(STEPS)
        tags = client.get_model_version(NAME, "2").tags
        assert (tags["promotion.decision"], tags["promotion.timestamp"]) == ("promoted", decided_at)  # decided once
        aliases = {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}
        assert aliases == {"champion": "2", "previous-champion": "1"}

        # 4. the command line on the finished cycle does nothing
        (root / "retrain.yaml").write_text(dump_yaml(cfg))
        capsys.readouterr()
        assert cli_main(["retrain", "--config", str(root / "retrain.yaml"), "--cycle", cycle]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert sum(line.startswith(f"[retrain] {s}: skipped") for line in lines for s in STEPS) == len(STEPS)
        assert versions() == ["1", "2"]
    finally:
        if run_name is not None:
            _stop_run_actors(ray_local, run_name)


def _stop_run_actors(ray, run_name: str) -> None:
    """The training driver leaves its label store (detached) and labeling coordinator alive; the
    session's shared Ray instance should not keep them (their CPUs) for the tests that follow."""
    from services.label_store import store_actor_name
    from services.labeling_pool import coordinator_name

    for name in (coordinator_name(run_name), store_actor_name(run_name)):
        try:
            ray.kill(ray.get_actor(name, namespace="dynamix"), no_restart=True)
        except ValueError:  # not running
            pass
