"""Typed configuration: YAML loading, unknown-key rejection, coercion, dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

import yaml

from dynamix_core.config import (
    ConfigError,
    apply_override,
    dump_yaml,
    dump_yaml_with_help,
    field,
    field_help,
    format_field_help,
    from_dict,
    load_config,
    to_dict,
)


@dataclass(kw_only=True)
class Inner:
    batch_size: int = field(32, help="images per batch")
    lr: float = field(1e-3, help="learning rate")
    img_size: tuple[int, int] = field((256, 128), help="input H, W")

    def __post_init__(self):
        if self.batch_size % 4:
            raise ConfigError(f"data.batch_size={self.batch_size} must be a multiple of 4; change data.batch_size")


@dataclass(kw_only=True)
class Outer:
    name: str = field("run", help="run name")
    mode: Literal["all", "sampled"] = field("all", help="loss mode")
    data: Inner = field(default_factory=Inner, help="data settings")
    tags: list[str] = field(default_factory=list, help="free tags")
    weights: str | None = field(None, help="optional path")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndata:\n  batch_size: 8\n  img_size: [64, 32]\n")
    cfg = load_config(Outer, p, ["data.lr=0.5", "mode=sampled", "tags=[a, b]"])
    assert cfg.name == "x" and cfg.mode == "sampled" and cfg.tags == ["a", "b"]
    assert cfg.data.batch_size == 8 and cfg.data.lr == 0.5 and cfg.data.img_size == (64, 32)
    assert cfg.weights is None


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"data": {"batch_sise": 8}})
    msg = str(e.value)
    assert "batch_sise" in msg and "batch_size" in msg and "lr" in msg and "data" in msg


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="no key 'bach'"):
        apply_override({}, "data.bach=3", Outer)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "data.batch_size", Outer)


def test_type_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.batch_size"):
        from_dict(Outer, {"data": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(Outer, {"mode": "none"})
    with pytest.raises(ConfigError, match=r"data.img_size.*2 items"):
        from_dict(Outer, {"data": {"img_size": [1, 2, 3]}})


def test_cross_field_check_names_field():
    with pytest.raises(ConfigError, match="change data.batch_size"):
        load_config(Outer, None, ["data.batch_size=6"])


def test_round_trip_and_help(tmp_path):
    cfg = load_config(Outer, None, ["data.batch_size=16"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(Outer, p) == cfg
    rows = {k: (h, d) for k, h, d in field_help(Outer)}
    assert rows["data.lr"] == ("learning rate", 1e-3)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


@dataclass(kw_only=True)
class WithOptional:
    extra: Inner | None = field(None, help="an optional section")
    note: str = field("a # b: c", help="a string YAML must quote")


def test_dump_with_help_loads_back_and_lists_help_beside_values():
    cfg = load_config(Outer, None, ["data.batch_size=16", "tags=[x, 'y z']", "weights=/w.pt"])
    text = dump_yaml_with_help(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert "  batch_size: 16  # images per batch" in text.splitlines()
    assert "data:  # data settings" in text.splitlines()
    opt = WithOptional(extra=Inner(batch_size=8))
    assert yaml.safe_load(dump_yaml_with_help(opt)) == {"extra": {"batch_size": 8, "lr": 1e-3, "img_size": [256, 128]},
                                                       "note": "a # b: c"}


def test_format_field_help_by_section_and_optional_sections():
    assert [k for k, _, _ in field_help(WithOptional)] == ["extra.batch_size", "extra.lr", "extra.img_size", "note"]
    lines = format_field_help(Outer, "data").splitlines()
    assert [line.split()[0] for line in lines] == ["data.batch_size", "data.lr", "data.img_size"]
    assert lines[0].split("  # ") == ["data.batch_size  32", "images per batch"]
    assert len(format_field_help(Outer).splitlines()) == 7
    with pytest.raises(ConfigError, match=r"no config key under 'dat'; sections are \['data', 'mode', 'name'"):
        format_field_help(Outer, "dat")


# ------------------------------------------------------------------ ${NAME} environment interpolation


def test_env_variables_expand_in_every_string_of_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DX_ROOT", "s3://bucket/prod")
    monkeypatch.delenv("DX_UNSET", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text('name: "${DX_ROOT}/runs"\n'
                 'tags: ["${DX_ROOT}/a", "b-${DX_UNSET:-local}", plain, "${DX_ROOT}${DX_ROOT}"]\n'
                 'weights: ${DX_UNSET:-}\n')
    cfg = load_config(Outer, p)
    assert cfg.name == "s3://bucket/prod/runs"
    assert cfg.tags == ["s3://bucket/prod/a", "b-local", "plain", "s3://bucket/prods3://bucket/prod"]
    assert cfg.weights == ""  # an empty default is a value
    monkeypatch.setenv("DX_UNSET", "")  # empty counts as unset: the default applies
    assert load_config(Outer, p).tags[1] == "b-local"


def test_env_variables_expand_in_override_values_and_nested_sections(tmp_path, monkeypatch):
    monkeypatch.setenv("DX_ROOT", "/mnt/x")
    monkeypatch.setenv("DX_BATCH", "16")
    cfg = load_config(Outer, None, ['tags=["${DX_ROOT}/a", "${DX_ROOT}/b"]', "weights=${DX_ROOT}/w.pt",
                                    "data.batch_size=${DX_BATCH}"])
    assert cfg.tags == ["/mnt/x/a", "/mnt/x/b"] and cfg.weights == "/mnt/x/w.pt"
    assert cfg.data.batch_size == 16  # expanded, then coerced to the field's type


def test_an_override_replaces_a_recipe_value_whose_variable_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("DX_UNSET", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text("weights: ${DX_UNSET}/w.pt\n")
    assert load_config(Outer, p, ["weights=/local/w.pt"]).weights == "/local/w.pt"


def test_an_unset_variable_names_the_file_the_field_the_variable_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("DYNAMIX_STORAGE_URI", raising=False)
    monkeypatch.delenv("DX_UNSET", raising=False)
    p = tmp_path / "recipe.yaml"
    p.write_text('tags: [fine, "${DYNAMIX_STORAGE_URI}/shards/market1501"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(p) in msg and "tags[1]" in msg and "${DYNAMIX_STORAGE_URI}" in msg
    assert "set DYNAMIX_STORAGE_URI (the Helm chart sets it from storage.uri" in msg and "edit the" in msg
    p.write_text("data: {batch_size: 8}\nweights: ${DX_UNSET}\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: weights: \$\{DX_UNSET\} is unset or empty; set DX_UNSET"):
        load_config(Outer, p)
    monkeypatch.setenv("DX_UNSET", "")
    with pytest.raises(ConfigError, match="DX_UNSET"):
        load_config(Outer, p)


def test_expand_env_walks_nested_mappings_and_lists(monkeypatch):
    from dynamix_core.config import expand_env

    monkeypatch.setenv("DX_ROOT", "gs://b")
    tree = {"data": {"multi": ["${DX_ROOT}/m", {"x": "${DX_ROOT}"}], "n": 3, "none": None}, "t": "$HOME ${ not a var"}
    assert expand_env(tree) == {"data": {"multi": ["gs://b/m", {"x": "gs://b"}], "n": 3, "none": None},
                                "t": "$HOME ${ not a var"}  # only ${NAME} and ${NAME:-default} are replaced
    monkeypatch.delenv("DX_ROOT")
    with pytest.raises(ConfigError, match=r"^data\.multi\[1\]\.x: \$\{DX_ROOT\} is unset"):
        expand_env({"data": {"multi": ["m", {"x": "${DX_ROOT}"}]}})
