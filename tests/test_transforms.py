"""Training views: shapes, dtypes, determinism under a seed, and each step against a numpy/SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dynamix_core.config import ConfigError
from dynamix_core.data.transforms import TransformConfig, ViewTransform, sample_generator

H, W = 32, 16
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
OFF = dict(flip_prob=0.0, pad=0, erase_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
           crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0))


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def reference_normalised(img_HWC: np.ndarray) -> np.ndarray:
    return (img_HWC.transpose(2, 0, 1).astype(np.float32) / 255 - MEAN) / STD


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("view", ["standard", "strong", "test"])
def test_shapes_dtypes_and_determinism(view, image):
    t = ViewTransform(TransformConfig(height=H * 2, width=W * 2), view)
    a, b = t(image, g(1)), t(image, g(1))
    assert a.shape == (3, H * 2, W * 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(t(chw, g(1)), a, rtol=0, atol=0)  # numpy HWC and torch CHW agree
    if view != "test":
        assert not torch.equal(a, t(image, g(2)))


def test_sample_generator_depends_on_seed_key_and_view():
    draw = lambda *args: torch.rand(4, generator=sample_generator(*args))  # noqa: E731
    torch.testing.assert_close(draw(1, "k", "standard"), draw(1, "k", "standard"))
    for other in ((2, "k", "standard"), (1, "j", "standard"), (1, "k", "strong")):
        assert not torch.equal(draw(1, "k", "standard"), draw(*other))


def test_test_view_is_resize_and_normalise(image):
    out = ViewTransform(TransformConfig(height=H, width=W), "test")(image)
    np.testing.assert_allclose(out.numpy(), reference_normalised(image), atol=1e-6)


def test_random_view_needs_a_generator(image):
    with pytest.raises(ValueError, match="Generator"):
        ViewTransform(TransformConfig(height=H, width=W), "standard")(image)


def test_flip(image):
    out = ViewTransform(TransformConfig(height=H, width=W, **{**OFF, "flip_prob": 1.0}), "standard")(image, g())
    np.testing.assert_allclose(out.numpy(), reference_normalised(image[:, ::-1]), atol=1e-6)


def test_pad_and_crop_is_a_shifted_window_of_the_zero_padded_image(image):
    pad = 3
    cfg = TransformConfig(height=H, width=W, **{**OFF, "pad": pad})
    padded = np.pad(image.astype(np.float32) / 255, ((pad, pad), (pad, pad), (0, 0)))
    windows = set()
    for seed in range(12):
        out = ViewTransform(cfg, "standard")(image, g(seed)).numpy() * STD + MEAN
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.allclose(out, padded[dy:dy + H, dx:dx + W].transpose(2, 0, 1), atol=1e-5)]
        assert len(hits) == 1
        windows.add(hits[0])
    assert len(windows) > 3  # the offset is random


def test_random_erasing_blanks_one_rectangle_within_the_area_bounds(image):
    cfg = TransformConfig(height=H, width=W, **{**OFF, "erase_prob": 1.0})
    ref = reference_normalised(image)
    for seed in range(8):
        out = ViewTransform(cfg, "standard")(image, g(seed)).numpy()
        changed = np.any(np.abs(out - ref) > 1e-6, axis=0)
        rows, cols = np.nonzero(changed)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert np.all(out[:, box[0], box[1]] == 0.0)  # one filled rectangle at the mean colour
        area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1) / (H * W)
        assert 0.01 <= area <= 0.5  # [0.02, 0.4] drawn, then the sides are rounded to pixels


def test_grayscale_uses_bt601_luma(image):
    cfg = TransformConfig(height=H, width=W, **{**OFF, "grayscale_prob": 1.0})
    out = ViewTransform(cfg, "strong")(image, g()).numpy() * STD + MEAN
    luma = (image.astype(np.float32) / 255) @ np.array([0.299, 0.587, 0.114], np.float32)
    for c in range(3):
        np.testing.assert_allclose(out[c], luma, atol=1e-5)


def test_gaussian_blur_matches_scipy(image):
    cfg = TransformConfig(height=H, width=W, **{**OFF, "blur_prob": 1.0, "blur_sigma": (1.0, 1.0)})
    out = ViewTransform(cfg, "strong")(image, g()).numpy() * STD + MEAN
    x = image.astype(np.float32) / 255
    # torch "reflect" padding = SciPy "mirror"; radius ceil(3 sigma) = 3 = int(truncate * sigma + 0.5)
    want = np.stack([gaussian_filter(x[..., c], sigma=1.0, mode="mirror", truncate=3.0) for c in range(3)])
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_brightness_jitter_scales_and_clamps(image):
    cfg = TransformConfig(height=H, width=W, **{**OFF, "jitter_prob": 1.0, "brightness": 0.5,
                                                 "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    out = ViewTransform(cfg, "strong")(image, g(4)).numpy() * STD + MEAN
    x = image.transpose(2, 0, 1).astype(np.float32) / 255
    inside = (out > 1e-3) & (out < 1 - 1e-3) & (x > 1e-2)
    factor = np.median(out[inside] / x[inside])
    assert 0.5 <= factor <= 1.5
    np.testing.assert_allclose(out, np.clip(x * factor, 0, 1), atol=1e-4)


def test_random_resized_crop_keeps_the_output_size_and_identity_at_full_scale(image):
    full = TransformConfig(height=H, width=W, **OFF)
    np.testing.assert_allclose(ViewTransform(full, "strong")(image, g()).numpy(), reference_normalised(image),
                               atol=1e-6)
    cropped = TransformConfig(height=H, width=W, **{**OFF, "crop_scale": (0.5, 0.6)})
    out = ViewTransform(cropped, "strong")(image, g())
    assert out.shape == (3, H, W) and not np.allclose(out.numpy(), reference_normalised(image))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="flip_prob"):
        TransformConfig(flip_prob=1.5)
    with pytest.raises(ConfigError, match="crop_scale"):
        TransformConfig(crop_scale=(0.5, 1.2))
