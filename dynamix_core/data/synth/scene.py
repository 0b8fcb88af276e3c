"""One crop as a camera sees it: background, figure, occluder, then the camera's imaging pipeline.

Drawing happens on a canvas :data:`SUPERSAMPLE` times the output size and is box-filtered down, so
edges are anti-aliased like a real downscaled detection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dynamix_core.data.synth.cameras import VIEWS, CameraStyle, apply_camera, background, draw_occluder
from dynamix_core.data.synth.identities import Identity
from dynamix_core.data.synth.render import Pose, draw_person

SUPERSAMPLE = 2
#: Background scene size relative to the canvas: the crop pans over it (camera shots, walking).
BACKGROUND_SPAN = (2.5, 1.3)  # (width, height)


@dataclass(frozen=True, slots=True)
class Shot:
    """Everything about one crop except the person and the camera: pose and framing."""

    view: str
    facing: int
    phase: float
    scale: float  # figure height / crop height (before the identity's own height factor)
    dx: float  # figure centre offset / crop width
    feet: float  # feet line / crop height (> 1 cuts the feet off)
    bg_x: float  # background crop offset in [0, 1]
    bg_y: float
    shade: float
    scene: int = 0  # which of the camera's scenes is behind the person (see cameras.background)


def sample_shot(style: CameraStyle, rng: np.random.Generator) -> Shot:
    """A detection as ``style``'s camera and detector typically frame it."""
    return Shot(
        view=VIEWS[rng.choice(3, p=style.view_probs)],
        facing=1 if rng.random() < 0.5 else -1,
        phase=float(rng.uniform(0.0, 2.0 * math.pi)),
        scale=float(style.scale * (1.0 + rng.normal(0.0, style.scale_jitter))),
        dx=float(rng.normal(0.0, style.shift_jitter)),
        feet=float(np.clip(0.97 + rng.normal(0.0, 0.02), 0.9, 1.06)),
        bg_x=float(rng.uniform()),
        bg_y=float(rng.uniform()),
        shade=float(rng.uniform(0.7, 1.3)),  # sun and shadow: light on the person varies per detection
        scene=int(rng.integers(0, 2**31)),  # every detection of a Market-style set has a scene of its own
    )


def render_shot(ident: Identity | None, style: CameraStyle, shot: Shot, rng: np.random.Generator,
                height: int, width: int) -> Image.Image:
    """The ``height`` x ``width`` RGB crop of ``ident`` (None: background only) in ``shot``."""
    ch, cw = SUPERSAMPLE * height, SUPERSAMPLE * width
    bg = background(style, shot.scene, round(BACKGROUND_SPAN[0] * cw), round(BACKGROUND_SPAN[1] * ch))
    y0 = round(shot.bg_y * (bg.shape[0] - ch))
    x0 = round(shot.bg_x * (bg.shape[1] - cw))
    canvas = Image.fromarray(bg[y0:y0 + ch, x0:x0 + cw])
    if ident is not None:
        pose = Pose(view=shot.view, facing=shot.facing, phase=shot.phase, cx=(0.5 + shot.dx) * cw,
                    feet_y=shot.feet * ch, height=shot.scale * ident.height * ch, shade=shot.shade)
        draw_person(canvas, ident, pose)
    draw_occluder(canvas, style, rng)
    return apply_camera(canvas.reduce(SUPERSAMPLE), style, rng)
