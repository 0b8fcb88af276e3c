"""Identity attributes: what a person looks like, independent of camera and pose.

Colours are RGB tuples in 0-255. Source identities wear the held-out clothing hue band only below
the waist (about 15 % of bottoms); every target identity wears it on its top: an attribute
combination the source sets never show, of colours they do show (SPEC 1.4 target domain). Clothing
follows street statistics: many achromatic garments and a few popular dyes, so colour alone does not
tell people apart; patterns, bags, hair, sleeves and build do the rest.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

RGB = tuple[float, float, float]

TOP_PATTERNS = ("solid", "stripes", "checks", "logo")
BOTTOM_KINDS = ("trousers", "shorts", "skirt")
BAG_KINDS = ("none", "backpack", "shoulder")
HAIR_LENGTHS = ("short", "long")

# Skin tones from light to dark: a tone is drawn between two neighbouring anchors.
_SKIN_ANCHORS = np.array([
    (250, 222, 196), (236, 192, 160), (222, 170, 130), (196, 136, 98), (160, 104, 70), (116, 74, 48), (78, 52, 36),
], dtype=float)
_HAIR_COLOURS = np.array([
    (24, 20, 18), (58, 40, 30), (104, 72, 44), (196, 166, 108), (150, 150, 148), (140, 60, 30),
], dtype=float)
_HAIR_PROBS = np.array([0.38, 0.24, 0.16, 0.1, 0.07, 0.05])
#: Share of garments in black/white/grey (no hue), as in real street clothing.
_ACHROMATIC_SHARE = 0.5
#: Hues most street clothing is dyed in (navy/denim, dark red, khaki/olive, brown), each with a spread:
#: many people share them, so colour alone does not tell people apart (real re-ID's hard negatives).
_POPULAR_HUES = ((0.61, 0.04), (0.99, 0.03), (0.13, 0.03), (0.07, 0.02))
_POPULAR_SHARE = 0.7


@dataclass(frozen=True, slots=True)
class Identity:
    """One person's appearance; the body numbers are relative to the figure height."""

    skin: RGB
    hair: RGB
    hair_length: str
    top: RGB
    top_second: RGB  # stripes / checks / logo colour
    top_pattern: str
    long_sleeves: bool
    bottom: RGB
    bottom_kind: str
    shoes: RGB
    bag: str
    bag_colour: RGB
    height: float  # 0.86-1.0 of the camera's figure height
    width: float  # body width factor, 0.8-1.25
    leg_ratio: float  # hip-to-foot share of the height
    head: float  # head height share of the height


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (255.0 * r, 255.0 * g, 255.0 * b)


def _hue_outside(rng: np.random.Generator, band: tuple[float, float]) -> float:
    lo, hi = band
    u = rng.uniform(0.0, 1.0 - (hi - lo))
    return u if u < lo else u + (hi - lo)


def _garment(rng: np.random.Generator, hue: float | None) -> RGB:
    """A clothing colour: achromatic when ``hue`` is None, else a saturated colour of that hue."""
    if hue is None:
        return _hsv(0.0, rng.uniform(0.0, 0.06), rng.uniform(0.08, 0.95))
    return _hsv(hue, rng.uniform(0.35, 1.0), rng.uniform(0.25, 0.95))


def _source_garment(rng: np.random.Generator, band: tuple[float, float] | None) -> RGB:
    """A street-clothing colour (achromatic, a popular dye, or any hue); never in ``band`` if given."""
    if rng.random() < _ACHROMATIC_SHARE:
        return _garment(rng, None)
    if rng.random() < _POPULAR_SHARE:
        centre, spread = _POPULAR_HUES[rng.choice(len(_POPULAR_HUES))]
        hue = (centre + rng.uniform(-spread, spread)) % 1.0
        if band is None or not band[0] <= hue <= band[1]:
            return _garment(rng, hue)
    return _garment(rng, rng.uniform() if band is None else _hue_outside(rng, band))


def _target_garments(rng: np.random.Generator, band: tuple[float, float]) -> tuple[RGB, RGB]:
    """(top, bottom) with a top in the held-out hue band, which source identities wear only as
    bottoms: a combination the source sets never show, of colours they do show."""
    return _garment(rng, rng.uniform(*band)), _source_garment(rng, None)


def sample_identity(rng: np.random.Generator, held_out_hue: tuple[float, float], *, target: bool = False) -> Identity:
    """A random person. ``target=True`` puts the held-out hue band on the top, the bottom or both."""
    i = rng.integers(0, len(_SKIN_ANCHORS) - 1)
    skin = _SKIN_ANCHORS[i] + rng.uniform() * (_SKIN_ANCHORS[i + 1] - _SKIN_ANCHORS[i])
    hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_PROBS)] * rng.uniform(0.85, 1.15)
    if target:
        top, bottom = _target_garments(rng, held_out_hue)
    else:  # the held-out hues exist in the source sets, but only below the waist
        top = _source_garment(rng, held_out_hue)
        bottom = _source_garment(rng, None) if rng.random() < 0.85 else _garment(rng, rng.uniform(*held_out_hue))
    return Identity(
        skin=tuple(skin),
        hair=tuple(np.clip(hair, 0, 255)),
        hair_length=HAIR_LENGTHS[rng.choice(2, p=[0.6, 0.4])],
        top=top,
        top_second=_source_garment(rng, held_out_hue),
        top_pattern=TOP_PATTERNS[rng.choice(4, p=[0.4, 0.2, 0.15, 0.25])],
        long_sleeves=bool(rng.random() < 0.55),
        bottom=bottom,
        bottom_kind=BOTTOM_KINDS[rng.choice(3, p=[0.65, 0.22, 0.13])],
        shoes=_garment(rng, None if rng.random() < 0.6 else rng.uniform()),
        bag=BAG_KINDS[rng.choice(3, p=[0.45, 0.35, 0.2])],
        bag_colour=_garment(rng, None if rng.random() < 0.4 else rng.uniform()),
        height=float(rng.uniform(0.86, 1.0)),
        width=float(rng.uniform(0.8, 1.25)),
        leg_ratio=float(rng.uniform(0.45, 0.52)),
        head=float(rng.uniform(0.12, 0.145)),
    )
