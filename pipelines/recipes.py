"""Where a ``--config`` file comes from: a local file, an object-store URI, or a recipe shipped with
the package named by file name or stem.

    resolve_config_path("recipes/dynamix_demo.yaml")   # a file, relative to the working directory
    resolve_config_path("dynamix_demo")                 # the shipped recipes/dynamix_demo.yaml
    resolve_config_path("s3://bucket/recipes/x.yaml")   # a cached local copy of the object

The recipes are package data (``pipelines/recipe_files/``, installed with the package; the
repository's ``recipes/`` is a link to it). A job runs in whatever folder its Ray node gives it, and
an installed package has no checkout around it, so a name, or a ``recipes/NAME.yaml`` path that does
not exist in the working directory, is looked up among the shipped recipes.
"""

from __future__ import annotations

from pathlib import Path

from dynamix_core import storage
from dynamix_core.config import ConfigError

#: the recipes shipped with the package
RECIPES_DIR = Path(__file__).resolve().parent / "recipe_files"


def resolve_config_path(path: str | Path) -> Path:
    """The local file to read for ``--config path`` (see the module docstring); a clear error when none."""
    text = str(path)
    if storage.is_remote(text):
        try:
            return storage.local_file(text)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {text} does not exist ({exc})") from None
    local = Path(text)
    if local.is_file():
        return local
    name = local.name if local.parent in (Path("."), Path("recipes")) else None
    if name is not None:
        for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {text} does not exist (in {Path.cwd()}); give a path, an object-store URI, "
                      f"or a shipped recipe: {', '.join(shipped)}")
