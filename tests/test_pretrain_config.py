"""The pre-training config tree and command line: cross-field checks name the field to change, the
driver's path checks fail before Ray starts, --print-config shows the resolved tree."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT
from dynamix_core.config import ConfigError, load_config
from pipelines.pretrain.config import PretrainConfig

DEMO = REPO_ROOT / "recipes" / "pretrain_demo.yaml"


@pytest.mark.parametrize("override, field", [
    ("data.view2.height=64", "data.view2"),
    ("data.batch_size=64", "data.buffer_videos"),
    ("run.monitor_every=15", "run.monitor_every"),
    ("run.checkpoint_every=15", "run.checkpoint_every"),
    ("scaling.precision=bf16", "scaling.precision"),
    ("objective.temperature=0", "objective.temperature"),
    ("data.single=[]", "data.single"),
])
def test_inconsistent_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(PretrainConfig, DEMO, [override])


def test_missing_shards_fail_in_the_driver_with_the_field_named(tmp_path):
    from pipelines.pretrain.driver import resolve_paths

    cfg = load_config(PretrainConfig, DEMO, [f"data.single=[{tmp_path / 'nope'}]", "data.monitor=[]"])
    with pytest.raises(FileNotFoundError, match=r"data\.single: .*nope.*dynamix ingest"):
        resolve_paths(cfg)


def test_print_config_shows_the_resolved_tree(capsys):
    from pipelines.cli import main

    assert main(["pretrain", "--config", str(DEMO), "--run-name", "p1", "--set", "run.max_steps=7",
                 "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert (tree["run"]["name"], tree["run"]["max_steps"], tree["model"]["backbone"]) == ("p1", 7, "resnet18")
    assert tree["tracking"]["experiment"] == "dynamix-pretrain"
    assert main(["pretrain", "--config", str(DEMO), "--set", "run.max_stepz=7", "--print-config"]) == 2
    assert "max_stepz" in capsys.readouterr().err
