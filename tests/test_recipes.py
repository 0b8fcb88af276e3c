"""Every shipped recipe loads and validates with its config class, so none can rot (litgpt practice)."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from dynamix_core.config import load_config

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


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
