"""Loading and saving model weights from local files or storage URIs (never from a hub): an object
(``s3://``, ``gs://``, :mod:`dynamix_core.storage`) is read from a cached local copy.

Two formats are read: safetensors (``.safetensors``) and torch checkpoints read with
``torch.load(weights_only=True)``, which refuses to unpickle anything but tensors and plain
containers (a checkpoint from an untrusted source cannot execute code). Weights are written as
safetensors, atomically (temporary file + ``os.replace``), so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from dynamix_core import storage
from dynamix_core.atomic import fsync_dir, give_default_mode

#: How many missing / unexpected / mismatched keys an error message lists before "... and N more".
MAX_LISTED_KEYS = 10

#: Keys under which training frameworks nest the state dict inside a checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not match the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, local or a storage URI (safetensors, or a torch state dict / checkpoint on CPU).

    A torch checkpoint may nest its state dict under ``state_dict`` or ``model`` (the usual
    trainer layouts); anything else that is not a flat ``{name: tensor}`` mapping is an error."""
    if storage.is_remote(path):  # an object (s3://, gs://): read from a cached local copy
        try:
            path = storage.local_file(path)
        except FileNotFoundError as exc:
            raise WeightsError(f"weights file {path} does not exist ({exc}); pass the URI or path of a "
                               ".safetensors or .pth file") from None
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass the path of a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as exc:
            raise WeightsError(f"weights file {path} is not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a readable state dict"
        raise WeightsError(f"weights file {path} is not a readable torch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping):
        for key in _NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(obj)[:MAX_LISTED_KEYS] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(
            f"weights file {path} holds no flat {{name: tensor}} state dict (top level: {top}); "
            f"save model.state_dict() or nest it under one of {list(_NESTED_STATE_KEYS)}"
        )
    return dict(obj)


def strip_key_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove leading ``prefixes`` from every key, repeatedly (``module.backbone.x`` -> ``x``)."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if prefix and key.startswith(prefix):
                    key = key[len(prefix):]
                    stripped = True
        out[key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"{len(keys)}: [{shown}{f', ... and {more} more' if more > 0 else ''}]"


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    """Copy ``state`` into ``model``; mismatches raise :class:`WeightsError` naming the keys.

    Shape mismatches are always an error. With ``strict`` any missing or unexpected key is too;
    without it the matching keys are loaded and the rest left as they are."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    if wrong_shape:
        shapes = [f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})" for k in wrong_shape]
        problems.append(f"shape mismatch {_listing(shapes)}")
    if strict and missing:
        problems.append(f"missing from the file {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in the file {_listing(unexpected)}")
    if problems:
        hint = (
            "check that the file was saved from the same backbone and img_size; set "
            "model.strip_prefixes (e.g. ['module.', 'backbone.']) if its keys carry a wrapper prefix, "
            "or model.weights_scope='backbone' for backbone-only pre-trained weights"
        )
        raise WeightsError(f"weights {source} do not match {type(model).__name__}: " + "; ".join(problems) + f". To fix: {hint}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True, strip_prefixes: Iterable[str] = ()) -> None:
    """Load a local weights file into ``model`` (see :func:`read_state_dict`, :func:`load_state_dict_checked`)."""
    state = strip_key_prefixes(read_state_dict(path), strip_prefixes)
    load_state_dict_checked(model, state, source=str(path), strict=strict)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` to ``path`` as safetensors, crash-safe (temporary file, fsync, rename), with the
    mode of any other file (not the 0600 safetensors gives its files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    give_default_mode(tmp)  # safetensors creates its files 0600
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict to ``path`` as safetensors, atomically."""
    save_state_dict(model.state_dict(), path)
