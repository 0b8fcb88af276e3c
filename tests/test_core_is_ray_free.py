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
