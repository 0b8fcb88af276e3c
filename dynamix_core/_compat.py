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

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def install_torchvision_shim() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if the torchvision extension did not."""
    for op in ("nms", "qnms"):
        if not _has_op(op):
            torch.library.define(f"torchvision::{op}", _SCHEMA)


install_torchvision_shim()
