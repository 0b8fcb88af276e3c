"""The MLflow pyfunc model of a registered re-ID encoder: images in, unit-norm embeddings out.

This file is logged as MLflow *model code* ("models from code"): :func:`services.registry.register_model`
passes its path as ``python_model``, MLflow copies it into the model and executes it when the
model is loaded; its last line hands MLflow the model object. Nothing is pickled (MLflow 3 refuses
to unpickle models by default, and a pickle would tie the model to this process's classes).

    model = mlflow.pyfunc.load_model("models:/dynamix-reid@champion")
    emb_BD = model.predict(img_BCHW)        # float32 (B, 3, H, W), normalised like the test view

Input: float32 ``(B, 3, H, W)`` images already resized to the model's ``img_size`` and normalised
with the training mean/std (``dynamix_core.data.transforms.ViewTransform(cfg, "test")``).
Output: float32 ``(B, D)`` L2-normalised embeddings of the momentum encoder (compare with a dot product).

Artifacts (``context.artifacts`` keys, written by the registry): ``weights`` - the encoder's state
dict (safetensors); ``config`` - its :class:`~dynamix_core.model.ModelConfig` as JSON.
Code dependencies: ``dynamix_core`` is bundled with the model (``code_paths``), so loading needs
only torch, timm, safetensors, numpy, pyyaml and mlflow, and always runs the encoder code the
version was registered with.

Shape legend: B batch, C image channels, H/W image height/width, D embedding dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch

import dynamix_core  # noqa: F401  (installs the torchvision shim before timm is imported)
from dynamix_core.config import from_dict
from dynamix_core.model import ModelConfig, build_encoder, load_weights


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """Builds the encoder from the ``config`` artifact, loads the ``weights`` artifact, embeds."""

    def load_context(self, context) -> None:
        cfg = from_dict(ModelConfig, json.loads(Path(context.artifacts["config"]).read_text()))
        self.img_size: tuple[int, int] = cfg.img_size
        self.encoder = build_encoder(cfg)
        load_weights(self.encoder, context.artifacts["weights"], strict=True)
        self.encoder.eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        img_BCHW = np.asarray(model_input, dtype=np.float32)
        if img_BCHW.ndim != 4 or img_BCHW.shape[1:] != (3, *self.img_size):
            raise ValueError(
                f"expected float32 images of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}), got "
                f"{img_BCHW.shape}; resize and normalise them with the test view of the training transforms"
            )
        with torch.inference_mode():
            return self.encoder.embed(torch.from_numpy(np.ascontiguousarray(img_BCHW))).numpy()


mlflow.models.set_model(EmbeddingModel())
