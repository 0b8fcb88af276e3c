"""The two augmented views of an image for pre-training, seeded by (step seed, sample key), so a
resumed run or another worker order gives the same pixels."""

from __future__ import annotations

import torch

from dynamix_core.data.images import decode_image
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator


class TwoViews:
    """``TwoViews(view1_cfg, view2_cfg)(jpeg_bytes, key, step_seed) -> (view1_CHW, view2_CHW)``: both run
    the 'strong' view pipeline with their own parameters (MoCo v3's asymmetric views)."""

    def __init__(self, view1: TransformConfig, view2: TransformConfig):
        if (view1.height, view1.width) != (view2.height, view2.width):
            raise ValueError(f"the two views must have one size, got {view1.height}x{view1.width} "
                             f"and {view2.height}x{view2.width}")
        self.views = (ViewTransform(view1, "strong"), ViewTransform(view2, "strong"))
        self.size = (view1.height, view1.width)

    def __call__(self, data: bytes, key: str, step_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = decode_image(data, self.size)
        return (self.views[0](img, sample_generator(step_seed, key, "strong")),
                self.views[1](img, sample_generator(step_seed, f"{key}#2", "strong")))
