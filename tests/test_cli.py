"""The command line as a person meets it: help without noise, config keys with their help, and one
clear line (not a traceback) when Ray or MLflow fails."""

from __future__ import annotations

import re

import pytest
import yaml

from pipelines.cli import COMMANDS, build_parser, main
from pipelines.console import describe_failure


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_no_empty_or_doubled_defaults(command):
    parser = build_parser(command)
    sub = next(a for a in parser._subparsers._group_actions).choices[command]  # noqa: SLF001
    text = sub.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert not re.search(r"default[^()]*\) \(default:", text)


def test_help_config_lists_keys_with_help(capsys):
    assert main(["train", "--help-config", "centroids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("centroids.") for line in lines)
    row = next(line for line in lines if line.startswith("centroids.loss_mode"))
    assert row.split()[1] == "all" and "sharded" in row.split("#", 1)[1]
    assert main(["train", "--help-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(keys) > 100 and "run.max_steps" in keys and "cluster_method.images_per_id" in keys
    assert main(["train", "--help-config", "nope"]) == 2
    assert "sections are" in capsys.readouterr().err
    assert main(["train"]) == 2  # neither a recipe nor --help-config
    assert "--config RECIPE is required" in capsys.readouterr().err


def test_print_config_shows_help_beside_values_and_stays_yaml(capsys):
    assert main(["train", "--config", "recipes/dynamix_demo.yaml", "--set", "run.max_steps=7", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["run"]["max_steps"] == 7
    assert "  max_steps: 7  # optimizer steps of the whole run" in text.splitlines()


def test_ray_and_mlflow_failures_are_one_line():
    import mlflow.exceptions
    import ray.exceptions

    line = describe_failure(mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no such model"))
    assert line.startswith("MLflow: RESOURCE_DOES_NOT_EXIST: no such model -- check the tracking URI")
    worker = ray.exceptions.RaySystemError("Traceback (most recent call last):\n  File x\nValueError: bad shard")
    line = describe_failure(worker)
    assert line.startswith("Ray: RaySystemError: ValueError: bad shard -- check the cluster") and "\n" not in line
    assert describe_failure(ValueError("ours")) is None  # our own bugs keep their traceback


def test_an_mlflow_failure_ends_the_command_in_one_line(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("backbone: test_vit\n")
    argv = ["register", "--weights", str(tmp_path / "w.safetensors"), "--config", str(tmp_path / "c.yaml"),
            "--name", "n", "--tracking-uri", "nosuchscheme://x", "--no-onnx"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynamix register: error: MLflow: ") and "nosuchscheme" in err[0]
