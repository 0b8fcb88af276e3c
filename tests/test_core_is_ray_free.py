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


# ------------------------------------------------------------------------------ the GPU machine's Python
# It has torch, timm, pyarrow and scikit-learn but not Ray, MLflow, webdataset, lmdb or faiss
# (docs/stack.md). benchmarks/gpu_checks.sh runs there; these imports are what its scripts need.
GPU_IMAGE_SCRIPT = r"""
import sys
for name in ("ray", "mlflow", "webdataset", "lmdb", "faiss", "cuml", "s3fs"):
    sys.modules[name] = None  # import raises ImportError, as where the package is not installed
import dynamix_core.data.synth.videos, dynamix_core.labeling, dynamix_core.pretrain.local, dynamix_core.centroids
import dynamix_core.evaluation.target, pipelines.pretrain.config
print("OK")
"""


def test_gpu_benchmark_imports_need_no_ray_lmdb_webdataset_or_faiss():
    out = subprocess.run([sys.executable, "-c", GPU_IMAGE_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


COMPAT_SCRIPT = r"""
import torch
loaded = []
torch.ops.load_library = loaded.append  # stands in for an extension that loads (CUDA torch + CUDA torchvision)
import dynamix_core._compat as compat
print("LOADED:" + ",".join(p.rsplit("/", 1)[-1] for p in loaded))
print("DEFINED:" + ",".join(op for op in ("nms", "qnms") if compat._has_op(op)))
"""


def test_torchvision_shim_defines_nothing_where_the_extension_loads():
    """Where torchvision's extension loads it registers torchvision::nms itself; a schema defined
    before it aborts the process (seen on the GPU image). The shim must load it first and then keep out."""
    out = subprocess.run([sys.executable, "-c", COMPAT_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in out.stdout.split())
    assert lines["LOADED"].startswith("_C"), out.stdout
    assert lines["DEFINED"] == "", out.stdout
