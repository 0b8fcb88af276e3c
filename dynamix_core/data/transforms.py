"""The two training views of SPEC 2.1 and the test view, on single images, seeded for determinism.

* standard: resize to (H, W), horizontal flip (0.5), zero-pad 10 + random crop back to (H, W),
  normalise, random erasing (0.5);
* strong: the standard view plus a random resized crop (area 0.5-1) right after the resize, and
  colour jitter, grayscale and gaussian blur before normalising;
* test: resize + normalise.

Input: an RGB ``uint8`` image, numpy ``(H, W, 3)`` (what :func:`~dynamix_core.data.images.decode_image`
returns) or torch ``(3, H, W)``. Output: ``float32`` ``(3, H, W)``, normalised. Every random draw
comes from the ``torch.Generator`` passed in, in a fixed order, so the same image and generator
state always give the same view. :func:`sample_generator` seeds one generator per (seed, sample key, view),
which makes a sample's views independent of the order and the worker it is read in.

Shapes: C = 3 channels, H x W = the output size, h x w = an input or crop size.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dynamix_core.config import ConfigError, field

View = Literal["standard", "strong", "test"]
VIEWS = ("standard", "strong", "test")

# ITU-R BT.601 luma weights (what PIL's "L" conversion and torchvision's rgb_to_grayscale use)
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue jitter is a rotation of the chroma plane (I, Q), a linear approximation of
# torchvision's HSV hue shift that costs one 3x3 matrix product instead of an HSV round trip.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@dataclass(kw_only=True)
class TransformConfig:
    """Image size and augmentation parameters of the training views."""

    height: int = field(256, help="output height H in pixels")
    width: int = field(128, help="output width W in pixels")
    flip_prob: float = field(0.5, help="probability of a horizontal flip")
    pad: int = field(10, help="zero padding on each side before the random crop back to (H, W)")
    erase_prob: float = field(0.5, help="probability of random erasing (one rectangle, set to the mean colour)")
    erase_area: tuple[float, float] = field((0.02, 0.4), help="erased area as a fraction of the image (min, max)")
    erase_aspect: tuple[float, float] = field((0.3, 3.3), help="erased rectangle height/width ratio (min, max)")
    crop_scale: tuple[float, float] = field(
        (0.5, 1.0), help="strong view: random resized crop area fraction (min, max)"
    )
    crop_aspect: tuple[float, float] = field(
        (0.75, 4 / 3), help="strong view: crop aspect ratio relative to the image's own W/H (min, max)"
    )
    jitter_prob: float = field(0.8, help="strong view: probability of colour jitter")
    brightness: float = field(0.4, help="strong view: brightness factor drawn from [1-b, 1+b]")
    contrast: float = field(0.4, help="strong view: contrast factor drawn from [1-c, 1+c]")
    saturation: float = field(0.4, help="strong view: saturation factor drawn from [1-s, 1+s]")
    hue: float = field(0.1, help="strong view: hue rotation drawn from [-h, h] turns (h <= 0.5)")
    grayscale_prob: float = field(0.2, help="strong view: probability of converting to grayscale")
    blur_prob: float = field(0.5, help="strong view: probability of a gaussian blur")
    blur_sigma: tuple[float, float] = field((0.1, 2.0), help="strong view: blur sigma in pixels (min, max)")
    mean: tuple[float, float, float] = field((0.485, 0.456, 0.406), help="per-channel normalisation mean (RGB)")
    std: tuple[float, float, float] = field((0.229, 0.224, 0.225), help="per-channel normalisation std (RGB)")

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"height/width: must be positive, got {self.height}x{self.width}")
        for name in ("flip_prob", "erase_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: a probability must lie in [0, 1], got {getattr(self, name)}")
        for name in ("erase_area", "erase_aspect", "crop_scale", "crop_aspect", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ConfigError(f"{name}: expected 0 < min <= max, got {(lo, hi)}")
        if self.crop_scale[1] > 1.0:
            raise ConfigError(f"crop_scale: the area fraction cannot exceed 1, got {self.crop_scale}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue: expected 0 <= hue <= 0.5 turns, got {self.hue}")


def sample_generator(seed: int, key: str, view: View) -> torch.Generator:
    """A generator seeded by ``(seed, key, view)``: each view of a sample is reproducible wherever and
    in whatever order it is read. Change ``seed`` (e.g. ``base_seed + epoch``) for fresh views."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(f"{view}/{key}".encode())) % 2**63)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_uniform(g, math.log(lo), math.log(hi)))


def _randint(g: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (), generator=g))


def to_float_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An RGB uint8 image, numpy ``(h, w, 3)`` or torch ``(3, h, w)``, as float ``(3, h, w)`` in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (h, w, 3) RGB array, got {image.dtype} {image.shape}")
        image = torch.from_numpy(image).permute(2, 0, 1)
    elif image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (3, h, w) RGB tensor, got {image.dtype} {tuple(image.shape)}")
    return image.float().div_(255.0)


def _resize(img_Chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img_Chw.shape[1:]) == size:
        return img_Chw
    return F.interpolate(img_Chw[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _random_resized_crop(img_CHW: torch.Tensor, cfg: TransformConfig, g: torch.Generator) -> torch.Tensor:
    _, H, W = img_CHW.shape
    for _ in range(10):  # rejection sampling as in torchvision; full image if no draw fits
        area = _uniform(g, *cfg.crop_scale) * H * W
        aspect = _log_uniform(g, *cfg.crop_aspect) * W / H  # crop w / h
        h, w = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if 0 < h <= H and 0 < w <= W:
            top, left = _randint(g, H - h), _randint(g, W - w)
            return _resize(img_CHW[:, top:top + h, left:left + w], (H, W))
    return img_CHW


def _pad_crop(img_CHW: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    _, H, W = img_CHW.shape
    padded = F.pad(img_CHW, (pad, pad, pad, pad))
    top, left = _randint(g, 2 * pad), _randint(g, 2 * pad)
    return padded[:, top:top + H, left:left + W]


def _luma(img_CHW: torch.Tensor) -> torch.Tensor:
    r, g, b = _LUMA
    return (r * img_CHW[0] + g * img_CHW[1] + b * img_CHW[2])[None]


def _colour_jitter(img_CHW: torch.Tensor, cfg: TransformConfig, g: torch.Generator) -> torch.Tensor:
    # fixed order brightness -> contrast -> saturation -> hue (torchvision shuffles it; a fixed order
    # keeps the number of random draws constant, which keeps views reproducible)
    b = _uniform(g, 1 - cfg.brightness, 1 + cfg.brightness)
    c = _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast)
    s = _uniform(g, 1 - cfg.saturation, 1 + cfg.saturation)
    turns = _uniform(g, -cfg.hue, cfg.hue)
    img_CHW = (img_CHW * b).clamp_(0, 1)
    mean = _luma(img_CHW).mean()
    img_CHW = ((img_CHW - mean) * c + mean).clamp_(0, 1)
    gray_1HW = _luma(img_CHW)
    img_CHW = ((img_CHW - gray_1HW) * s + gray_1HW).clamp_(0, 1)
    cos, sin = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    mix_CC = _YIQ2RGB @ rotate @ _RGB2YIQ
    return torch.einsum("ij,jhw->ihw", mix_CC, img_CHW).clamp_(0, 1)


def _gaussian_blur(img_CHW: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    C = img_CHW.shape[0]
    x = F.pad(img_CHW[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)  # horizontal
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)  # vertical
    return x[0]


def _random_erase(img_CHW: torch.Tensor, cfg: TransformConfig, g: torch.Generator) -> torch.Tensor:
    _, H, W = img_CHW.shape
    for _ in range(10):
        area = _uniform(g, *cfg.erase_area) * H * W
        ratio = _log_uniform(g, *cfg.erase_aspect)  # h / w
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < h < H and 0 < w < W:
            top, left = _randint(g, H - h), _randint(g, W - w)
            img_CHW[:, top:top + h, left:left + w] = 0.0  # 0 after normalising = the mean colour
            return img_CHW
    return img_CHW


class ViewTransform:
    """One view (``"standard"``, ``"strong"`` or ``"test"``) as a callable:
    ``ViewTransform(cfg, "strong")(image, generator) -> float32 (3, H, W)``."""

    def __init__(self, cfg: TransformConfig, view: View):
        if view not in VIEWS:
            raise ValueError(f"view {view!r}: expected one of {VIEWS}")
        self.cfg, self.view = cfg, view
        self._mean_C11 = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std_C11 = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, image: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        img_CHW = _resize(to_float_chw(image), (cfg.height, cfg.width))
        if self.view == "test":
            return (img_CHW - self._mean_C11) / self._std_C11
        if generator is None:
            raise ValueError(f"the {self.view!r} view is random: pass a torch.Generator (see sample_generator)")
        g = generator
        strong = self.view == "strong"
        if strong:
            img_CHW = _random_resized_crop(img_CHW, cfg, g)
        if _uniform(g, 0, 1) < cfg.flip_prob:
            img_CHW = img_CHW.flip(-1)
        img_CHW = _pad_crop(img_CHW, cfg.pad, g)
        if strong:
            if _uniform(g, 0, 1) < cfg.jitter_prob:
                img_CHW = _colour_jitter(img_CHW, cfg, g)
            if _uniform(g, 0, 1) < cfg.grayscale_prob:
                img_CHW = _luma(img_CHW).expand(3, -1, -1)
            if _uniform(g, 0, 1) < cfg.blur_prob:
                img_CHW = _gaussian_blur(img_CHW, _uniform(g, *cfg.blur_sigma))
        img_CHW = (img_CHW - self._mean_C11) / self._std_C11  # a new tensor: erasing may write in place
        if _uniform(g, 0, 1) < cfg.erase_prob:
            img_CHW = _random_erase(img_CHW, cfg, g)
        return img_CHW
