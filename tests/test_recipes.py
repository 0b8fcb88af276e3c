"""Every shipped recipe loads and validates with its config class, so none can rot (litgpt practice)."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from dynamix_core.config import ConfigError, load_config

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
#: the production recipes keep every path under the deployment's storage root, ${DYNAMIX_STORAGE_URI}
PRODUCTION = [p for p in RECIPES if not p.stem.endswith("_demo")]
STORAGE_ROOT = "s3://reid-prod/dynamix"


@pytest.fixture(autouse=True)
def storage_root(monkeypatch):
    monkeypatch.setenv("DYNAMIX_STORAGE_URI", STORAGE_ROOT)  # as the Helm chart sets it on every Ray pod


def config_class(name: str):
    """Which tree a recipe file is: by its name (pretrain*, retrain*, else a training recipe)."""
    if name.startswith("pretrain"):
        from pipelines.pretrain.config import PretrainConfig
        return PretrainConfig
    if name.startswith("retrain"):
        from pipelines.retrain import RetrainConfig
        return RetrainConfig
    from pipelines.train.config import TrainConfig
    return TrainConfig


def test_the_recipe_folder_is_found():
    names = {p.name for p in RECIPES}
    assert {"pretrain.yaml", "pretrain_demo.yaml", "dynamix.yaml", "dynamix_demo.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(config_class(recipe.name), recipe)
    assert cfg is not None


def test_pretrain_recipes_use_the_production_and_demo_settings():
    from pipelines.pretrain.config import PretrainConfig

    prod = load_config(PretrainConfig, REPO_ROOT / "recipes" / "pretrain.yaml")
    assert (prod.model.backbone, prod.model.img_size) == ("vit_base_patch16_224", (256, 128))
    assert prod.scaling.use_gpu and prod.scaling.precision == "bf16"
    demo = load_config(PretrainConfig, REPO_ROOT / "recipes" / "pretrain_demo.yaml")
    assert not demo.scaling.use_gpu and demo.data.single == ["runs/demo/shards/synth_video"]


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)


@pytest.mark.parametrize("recipe", PRODUCTION, ids=[p.name for p in PRODUCTION])
def test_production_paths_live_under_the_storage_root(recipe):
    """No node-local path: a Ray pod has nothing but what the chart gives it (storage.uri)."""
    from dynamix_core.config import to_dict

    values = list(_strings(to_dict(load_config(config_class(recipe.name), recipe))))
    assert not [v for v in values if v.startswith("/") or "/mnt/" in v]
    assert sum(v.startswith(STORAGE_ROOT + "/") for v in values) >= 3  # run storage and the data sets at least


def test_a_production_recipe_without_the_storage_root_says_what_to_set(monkeypatch):
    from pipelines.train.config import TrainConfig

    monkeypatch.delenv("DYNAMIX_STORAGE_URI")
    with pytest.raises(ConfigError, match=r"recipes/dynamix\.yaml: .*\$\{DYNAMIX_STORAGE_URI\} is unset.*storage\.uri"):
        load_config(TrainConfig, REPO_ROOT / "recipes" / "dynamix.yaml")
