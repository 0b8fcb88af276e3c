"""Compatibility shims applied before anything imports torchvision (through timm).

The registry's torchvision 0.28.0 is a CUDA build. Against the CPU build of torch its compiled
extension fails to load, and ``import torchvision`` then dies with
``operator torchvision::nms does not exist`` because its Python side registers fake kernels for
operators whose schemas the extension should have defined. Defining those two schemas first makes
the import work. Where the extension loads (CUDA torch, production) the schemas already exist and
this module does nothing. ``torchvision.ops`` and ``torchvision.io`` JPEG decoding stay unusable
on CPU; the project decodes with Pillow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _extension_loads() -> bool:
    """Load torchvision's compiled extension as ``import torchvision`` would (without importing the
    package). True where it loads: it then defines its operators itself, and defining them here
    first would abort the process on the duplicate registration (seen on the GPU image)."""
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for lib in sorted(Path(folder).glob("_C*.so")):
            try:
                torch.ops.load_library(str(lib))
                return True
            except OSError:
                return False
    return False


def install_torchvision_shim() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if the torchvision extension cannot."""
    if _extension_loads():
        return
    for op in ("nms", "qnms"):
        if not _has_op(op):
            torch.library.define(f"torchvision::{op}", _SCHEMA)


install_torchvision_shim()
