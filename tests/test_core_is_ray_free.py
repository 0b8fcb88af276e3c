"""dynamix_core must run in a bare PyTorch process: importing all of it pulls in neither Ray nor MLflow."""

import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = r"""
import importlib, pkgutil, sys
import dynamix_core
for mod in pkgutil.walk_packages(dynamix_core.__path__, "dynamix_core."):
    importlib.import_module(mod.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "mlflow"})
print("LEAKED:" + ",".join(bad))
"""


def test_dynamix_core_imports_neither_ray_nor_mlflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LEAKED:\n" in out.stdout or out.stdout.strip() == "LEAKED:", out.stdout


# ------------------------------------------------------------------------------------------ layering
# dynamix_core <- services <- pipelines: a layer imports only the layers below it (function-local
# imports included, so the check reads the source instead of importing it).
FORBIDDEN = {"dynamix_core": {"ray", "mlflow", "services", "pipelines"}, "services": {"pipelines"}}
#: known exceptions to the layering (none)
PENDING: set[tuple[str, str]] = set()


def _imports(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_layers_import_only_downwards():
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((REPO_ROOT / layer).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            bad += [f"{rel} imports {name}" for name in _imports(path)
                    if name.split(".")[0] in forbidden and (rel, name) not in PENDING]
    assert bad == []
