"""The MLflow pyfunc model of a registered re-ID encoder: images in, unit-norm embeddings out.

This file is logged as MLflow *model code* ("models from code"): :func:`services.registry.register_model`
passes its path as ``python_model``, MLflow copies it into the model and executes it when the
model is loaded; its last line hands MLflow the model object. Nothing is pickled (MLflow 3 refuses
to unpickle models by default, and a pickle would tie the model to this process's classes).

    model = mlflow.pyfunc.load_model("models:/dynamix-reid@champion")
    emb_BD = model.predict([open("person.jpg", "rb").read()])   # encoded images, any size
    emb_BD = model.predict(img_BHW3)                             # uint8 RGB pixels, any size

Input, any of:
- encoded images (JPEG/PNG bytes): a list, a 1-D object array, or a DataFrame whose ``image`` column
  holds them; base64 text is accepted in their place (what a JSON request to ``mlflow models
  serve`` carries: ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}``);
- raw RGB pixels: uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` at any size (also as nested lists);
- already preprocessed float32 ``(B, 3, H, W)`` at the model's ``img_size``, normalised as below.
Raw and encoded images get the preprocessing stored with the model (the training run's test view:
resize to ``img_size``, scale to [0, 1], subtract ``mean``, divide by ``std``), exactly as the
training run evaluated them.
Output: float32 ``(B, D)`` L2-normalised embeddings of the momentum encoder (compare with a dot product).

Artifacts (``context.artifacts`` keys, written by the registry): ``weights`` - the encoder's state
dict (safetensors); ``config`` - its :class:`~dynamix_core.model.ModelConfig` as JSON;
``preprocessing`` - ``{"height", "width", "mean", "std"}`` as JSON.
Code dependencies: ``dynamix_core`` is bundled with the model (``code_paths``), so loading needs
only torch, timm, safetensors, numpy, pillow, pyyaml and mlflow, and always runs the encoder and
preprocessing code the version was registered with.

Shape legend: B batch, C image channels, H/W image height/width, D embedding dim.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

import dynamix_core  # noqa: F401  (installs the torchvision shim before timm is imported)
from dynamix_core.config import from_dict
from dynamix_core.data.images import decode_image
from dynamix_core.data.transforms import TransformConfig, ViewTransform
from dynamix_core.model import ModelConfig, build_encoder, load_weights


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """Builds the encoder from the ``config`` artifact, loads the ``weights`` artifact, embeds."""

    def load_context(self, context) -> None:
        cfg = from_dict(ModelConfig, json.loads(Path(context.artifacts["config"]).read_text()))
        self.img_size: tuple[int, int] = cfg.img_size
        self.encoder = build_encoder(cfg)
        load_weights(self.encoder, context.artifacts["weights"], strict=True)
        self.encoder.eval()
        stored = context.artifacts.get("preprocessing")
        prep = json.loads(Path(stored).read_text()) if stored else {"height": cfg.img_size[0], "width": cfg.img_size[1]}
        self.view = ViewTransform(TransformConfig(**prep), "test")

    def preprocess(self, model_input) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` model input from any accepted input form (see the module doc)."""
        if isinstance(model_input, pd.DataFrame):
            column = "image" if "image" in model_input.columns else model_input.columns[0]
            model_input = list(model_input[column])
        if isinstance(model_input, np.ndarray) and model_input.dtype.kind == "f":
            img_BCHW = model_input.astype(np.float32, copy=False)
            if img_BCHW.ndim != 4 or img_BCHW.shape[1:] != (3, *self.img_size):
                raise ValueError(f"preprocessed input must be float32 (B, 3, {self.img_size[0]}, {self.img_size[1]}), "
                                 f"got {img_BCHW.shape}; or pass raw uint8 (H, W, 3) images or JPEG/PNG bytes")
            return img_BCHW
        if isinstance(model_input, np.ndarray) and model_input.dtype != object:
            model_input = [model_input] if model_input.ndim == 3 else list(model_input)
        return np.stack([self.view(self._pixels(item)).numpy() for item in model_input])

    def _pixels(self, item) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB of one image given as bytes, base64 text, an array or nested lists."""
        if isinstance(item, str):
            item = base64.b64decode(item, validate=True)
        if isinstance(item, (bytes, bytearray, memoryview)):
            return decode_image(bytes(item), self.img_size)  # the decode training-time evaluation uses
        pixels = np.asarray(item)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype.kind not in "ui" or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"expected an RGB image as uint8 (H, W, 3) pixels or JPEG/PNG bytes, got "
                             f"{pixels.dtype} {pixels.shape}")
        return pixels.astype(np.uint8, copy=False)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        img_BCHW = self.preprocess(model_input)
        with torch.inference_mode():
            return self.encoder.embed(torch.from_numpy(np.ascontiguousarray(img_BCHW))).numpy()


mlflow.models.set_model(EmbeddingModel())
