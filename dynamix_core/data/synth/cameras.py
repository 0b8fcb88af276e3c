"""Camera styles: the scene behind the person and the imaging pipeline of one camera.

A :class:`CameraStyle` fixes everything one camera does to every image it takes: its background
scene, illumination gain, colour cast, gamma, contrast, haze, blur, resolution, sensor noise, the
viewpoints people are seen from, how the detector frames them (scale and shift jitter) and how often
something stands in front of them. Source and target cameras draw their colour cast from disjoint
hue bands, so the target styles are unseen (SPEC 1.4).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dynamix_core.data.synth.seeding import rng_for

RGB = tuple[float, float, float]
VIEWS = ("front", "back", "side")


@dataclass(frozen=True, slots=True)
class CameraStyle:
    """One camera. Colours are RGB in 0-255; ``cast`` multiplies R, G, B."""

    bg_seed: int
    sky: RGB  # upper scene (walls, sky)
    ground: RGB
    horizon: float  # scene share above the ground line
    gain: float
    cast: RGB
    gamma: float
    contrast: float
    haze: float
    haze_colour: RGB
    blur: float  # Gaussian radius in output pixels
    lowres: float  # >= 1: the sensor resolution is this many times coarser than the crop
    noise: float  # sensor noise std, 0-255 units
    view_probs: tuple[float, float, float]  # P(front), P(back), P(side)
    scale: float  # mean figure height / crop height
    scale_jitter: float
    shift_jitter: float  # horizontal detector offset std / crop width
    occlusion_rate: float
    occluder: RGB


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (255.0 * r, 255.0 * g, 255.0 * b)


def _hue_in(rng: np.random.Generator, band: tuple[float, float], inside: bool) -> float:
    lo, hi = band
    if inside:
        return float(rng.uniform(lo, hi))
    u = rng.uniform(0.0, 1.0 - (hi - lo))
    return float(u if u < lo else u + (hi - lo))


def sample_camera_style(rng: np.random.Generator, cast_band: tuple[float, float], *, held_out: bool) -> CameraStyle:
    """A random camera; its colour-cast hue lies inside ``cast_band`` iff ``held_out``.

    Strengths are those of real surveillance cameras with automatic white balance and exposure: a
    colour cast of a few percent per channel, gain within +-20 %, mild gamma/contrast/haze. (The
    first SynthReID used casts of up to +-40 % per channel; camera style then outweighed clothing
    in every feature, and a colour histogram ranked below chance.)"""
    direction = np.array(_hsv(_hue_in(rng, cast_band, held_out), 1.0, 1.0)) / 255.0
    # the target domain is another site: older cameras, mixed indoor/outdoor light (a domain gap)
    harsh = 3.0 if held_out else 1.0
    cast = 1.0 + harsh * rng.uniform(0.06, 0.16) * (direction - direction.mean())
    views = rng.dirichlet([1.5, 1.5, 1.5])
    return CameraStyle(
        bg_seed=int(rng.integers(0, 2**31)),
        sky=_hsv(rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.4, 0.9)),
        ground=_hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.7)),
        horizon=float(rng.uniform(0.35, 0.6)),
        gain=float(rng.uniform(1.0 - 0.18 * harsh, 1.0 + 0.18 * harsh)),
        cast=tuple(float(c) for c in cast),
        gamma=float(rng.uniform(0.9, 1.12)),
        contrast=float(rng.uniform(0.85, 1.1)),
        haze=float(rng.uniform(0.0, 0.12)),
        haze_colour=_hsv(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.6, 1.0)),
        blur=float(rng.uniform(0.0, 0.7 * harsh)),
        lowres=float(rng.choice([1.0, 1.5, 2.0] if held_out else [1.0, 1.0, 1.0, 1.5])),
        noise=float(rng.uniform(1.0, 5.0)),
        view_probs=(float(views[0]), float(views[1]), float(views[2])),
        scale=float(rng.uniform(0.88, 0.96)),
        scale_jitter=float(rng.uniform(0.01, 0.05)),
        shift_jitter=float(rng.uniform(0.02, 0.07)),
        occlusion_rate=float(rng.uniform(0.0, 0.15 * harsh)),
        occluder=_hsv(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.1, 0.8)),
    )


def _jitter(colour: RGB, rng: np.random.Generator, hue: float, sat: float, val: float) -> RGB:
    """``colour`` with its HSV hue/saturation/value moved by up to +-``hue`` / ``sat`` / ``val``."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in colour))
    return _hsv(h + rng.uniform(-hue, hue), float(np.clip(s + rng.uniform(-sat, sat), 0, 1)),
                float(np.clip(v + rng.uniform(-val, val), 0.05, 1)))


@lru_cache(maxsize=64)
def background(style: CameraStyle, scene: int, width: int, height: int) -> np.ndarray:
    """Scene number ``scene`` of the camera, ``(height, width, 3)`` uint8, read-only: a wall/sky
    gradient over a ground gradient, buildings, windows, trees and poles, large-scale shading and fine
    texture.

    The camera decides the palette family (its wall and ground colours, shifted per scene) and the
    horizon; every scene has its own layout and clutter. Market-style images each get a scene of
    their own (a detector crop shows a different patch of street, other passers-by, another time of
    day), while a video keeps one scene and pans over it."""
    rng = rng_for(style.bg_seed, "background", scene)
    horizon_share = float(np.clip(style.horizon + rng.uniform(-0.12, 0.12), 0.2, 0.75))
    horizon = int(horizon_share * height)
    ramp_H1 = np.linspace(0.0, 1.0, height)[:, None]
    sky = np.array(_jitter(style.sky, rng, 0.08, 0.15, 0.2))
    ground = np.array(_jitter(style.ground, rng, 0.08, 0.15, 0.2))
    colour_H3 = np.where(ramp_H1 < horizon_share, sky * (1.0 - 0.25 * ramp_H1), ground * (0.85 + 0.3 * ramp_H1))
    img = Image.fromarray(np.broadcast_to(colour_H3[:, None, :], (height, width, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):  # buildings, shop fronts, signs
        x0, w = rng.uniform(-0.2, 1.0) * width, rng.uniform(0.15, 0.6) * width
        y0 = rng.uniform(-0.2, 0.8) * horizon
        fill = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0.05, 0.6), rng.uniform(0.2, 0.95)))
        draw.rectangle([x0, y0, x0 + w, horizon], fill=fill)
        if rng.random() < 0.6:  # a row of windows
            win = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.9)))
            step = rng.uniform(0.12, 0.3) * width
            for wx in np.arange(x0 + 0.3 * step, x0 + w - 0.5 * step, step):
                draw.rectangle([wx, y0 + 0.1 * (horizon - y0), wx + 0.5 * step, y0 + 0.3 * (horizon - y0)], fill=win)
    for _ in range(int(rng.integers(0, 4))):  # trees and bushes
        cx, cy, r = rng.uniform(0, width), rng.uniform(0.3, 1.0) * horizon, rng.uniform(0.08, 0.3) * width
        fill = tuple(int(c) for c in _hsv(rng.uniform(0.2, 0.42), rng.uniform(0.3, 0.8), rng.uniform(0.15, 0.6)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    for _ in range(int(rng.integers(0, 3))):  # poles and lamp posts
        x, w = rng.uniform(0, width), rng.uniform(0.01, 0.04) * width
        draw.rectangle([x, rng.uniform(0, 0.5) * horizon, x + w, horizon + rng.uniform(0, 0.1) * height],
                       fill=tuple(int(c) for c in _hsv(0, 0, rng.uniform(0.1, 0.6))))
    tile = rng.uniform(0.03, 0.08) * height  # paving lines on the ground
    line = tuple(int(c * 0.8) for c in ground)
    for y in np.arange(horizon + tile, height, tile):
        draw.line([(0, y), (width, y)], fill=line, width=1)
    shade = Image.fromarray(rng.normal(0.0, 1.0, (4, 6)).astype(np.float32)).resize((width, height), Image.BICUBIC)
    out = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.15)  # time of day, clouds
    out += rng.uniform(6.0, 20.0) * np.asarray(shade)[:, :, None]
    out += rng.normal(0.0, rng.uniform(2.0, 7.0), out.shape).astype(np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    out.flags.writeable = False
    return out


def draw_occluder(img: Image.Image, style: CameraStyle, rng: np.random.Generator) -> None:
    """With probability ``style.occlusion_rate``, paint something in front of the person: a pole,
    an object rising from the bottom (bench, car, another person's back), or a side obstacle."""
    if rng.random() >= style.occlusion_rate:
        return
    w, h = img.size
    colour = tuple(int(c * f) for c, f in zip(style.occluder, rng.uniform(0.8, 1.2, 3)))
    draw = ImageDraw.Draw(img)
    kind = rng.choice(3)
    if kind == 0:
        x, pw = rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.2) * w
        draw.rectangle([x - pw / 2, 0, x + pw / 2, h], fill=colour)
    elif kind == 1:
        draw.rectangle([rng.uniform(-0.3, 0.3) * w, (1.0 - rng.uniform(0.2, 0.45)) * h, w * rng.uniform(0.7, 1.3), h],
                       fill=colour)
    else:
        ow = rng.uniform(0.25, 0.4) * w
        x0 = 0 if rng.random() < 0.5 else w - ow
        draw.rectangle([x0, rng.uniform(0.0, 0.5) * h, x0 + ow, h], fill=colour)


def apply_camera(img: Image.Image, style: CameraStyle, rng: np.random.Generator) -> Image.Image:
    """The camera's imaging pipeline on a rendered scene: gamma, gain (with a small per-frame
    flicker), colour cast, contrast, haze, sensor resolution, blur and noise."""
    x_HW3 = np.asarray(img, dtype=np.float32) / 255.0
    x_HW3 = x_HW3 ** style.gamma
    x_HW3 = x_HW3 * (style.gain * rng.uniform(0.92, 1.08)) * np.asarray(style.cast, dtype=np.float32)
    mean = x_HW3.mean()
    x_HW3 = mean + style.contrast * (x_HW3 - mean)
    x_HW3 = (1.0 - style.haze) * x_HW3 + style.haze * (np.asarray(style.haze_colour, dtype=np.float32) / 255.0)
    out = Image.fromarray((x_HW3 * 255.0).clip(0, 255).astype(np.uint8))
    if style.lowres > 1.0:
        w, h = out.size
        out = out.resize((max(1, round(w / style.lowres)), max(1, round(h / style.lowres))), Image.BILINEAR)
        out = out.resize((w, h), Image.BILINEAR)
    radius = style.blur * rng.uniform(0.8, 1.2)
    if radius > 0.2:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(out, dtype=np.float32) + rng.normal(0.0, style.noise, (out.size[1], out.size[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


__all__ = ["VIEWS", "CameraStyle", "apply_camera", "background", "draw_occluder", "sample_camera_style"]
