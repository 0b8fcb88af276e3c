"""The articulated figure: head, neck, torso, two arms, two legs, shoes, hair and bag, in a walking pose.

Drawn with Pillow on a supersampled canvas (see :mod:`scene`), in canvas pixels. The viewpoint
decides what is visible: the face and a chest logo only from the front, a backpack from the back or
side, the walking scissor of the legs from the side. Angles are radians from the vertical; in the
side view a positive angle points the way the person walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from dynamix_core.data.synth.identities import RGB, Identity

#: Leg and arm swing amplitudes of the side view (radians); the front/back views show a fraction.
LEG_SWING = 0.45
ARM_SWING = 0.45
#: Far limbs of the side view are darker (they are in the body's shadow).
FAR_SHADE = 0.72


@dataclass(frozen=True, slots=True)
class Pose:
    """Where and how the figure is drawn, in canvas pixels."""

    view: str  # "front", "back" or "side"
    facing: int  # side view: +1 walks to the right, -1 to the left
    phase: float  # walking-cycle phase (radians)
    cx: float  # body centre line
    feet_y: float  # ground line under the feet
    height: float  # head top to feet
    shade: float  # illumination on the figure (1 = as sampled)


def _fill(colour: RGB, shade: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * shade))) for c in colour)


def _limb(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, fill) -> None:
    """A limb segment chain with round caps at both ends."""
    w = max(1, round(width))
    draw.line(points, fill=fill, width=w, joint="curve")
    r = w / 2
    for x, y in (points[0], points[-1]):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _step(x: float, y: float, angle: float, length: float, facing: int) -> tuple[float, float]:
    return x + facing * math.sin(angle) * length, y + math.cos(angle) * length


def _pattern_fill(img: Image.Image, polygon: list[tuple[float, float]], ident: Identity, shade: float,
                  period: float, show_logo: bool) -> None:
    """The top's body part: solid, stripes or checks (any view), plus a chest logo (front view)."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    x0, y0 = int(math.floor(min(xs))), int(math.floor(min(ys)))
    w, h = int(math.ceil(max(xs))) - x0 + 1, int(math.ceil(max(ys))) - y0 + 1
    base, second = _fill(ident.top, shade), _fill(ident.top_second, shade)
    patch = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(patch)
    step = max(2, round(period))
    if ident.top_pattern == "stripes":
        for y in range(0, h, 2 * step):
            draw.rectangle([0, y, w, y + step - 1], fill=second)
    elif ident.top_pattern == "checks":
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=second)
    elif ident.top_pattern == "logo" and show_logo:
        r = 1.4 * period
        cx, cy = w / 2, 0.35 * h
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=second)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in polygon], fill=255)
    img.paste(patch, (x0, y0), mask)


def draw_person(img: Image.Image, ident: Identity, pose: Pose) -> None:
    """Draw ``ident`` in ``pose`` onto ``img`` (RGB, in place), back to front."""
    draw = ImageDraw.Draw(img)
    h, cx, feet_y, shade = pose.height, pose.cx, pose.feet_y, pose.shade
    side, front, d = pose.view == "side", pose.view == "front", pose.facing if pose.view == "side" else 1
    top = feet_y - h
    head_h = ident.head * h
    head_w = 0.78 * head_h
    shoulder_y = top + head_h + 0.03 * h
    hip_y = feet_y - ident.leg_ratio * h
    leg_len = feet_y - 0.025 * h - hip_y
    sw = (0.09 if side else 0.145) * h * ident.width  # shoulder half-width
    hw = (0.085 if side else 0.11) * h * ident.width  # hip half-width
    arm_w, leg_w = 0.06 * h * ident.width, 0.08 * h * ident.width
    hair, bag = _fill(ident.hair, shade), _fill(ident.bag_colour, shade)

    def skin(f: float = 1.0) -> tuple[int, int, int]:
        return _fill(ident.skin, shade * f)

    def top_c(f: float = 1.0) -> tuple[int, int, int]:
        return _fill(ident.top, shade * f)

    def bottom(f: float = 1.0) -> tuple[int, int, int]:
        return _fill(ident.bottom, shade * f)

    strap = max(1.0, 0.016 * h)
    phi = pose.phase

    def leg(hip_x: float, phase: float, f: float) -> None:
        if side:
            thigh = LEG_SWING * math.sin(phase)
            shin = thigh - 0.6 * max(0.0, math.cos(phase))  # the knee bends while the leg swings forward
            knee = _step(hip_x, hip_y, thigh, leg_len / 2, d)
            ankle = _step(*knee, shin, leg_len / 2, d)
        else:  # the swing goes towards/away from the camera: only the lift of the foot shows
            lift = 0.035 * h * max(0.0, math.sin(phase))
            knee = (hip_x, hip_y + leg_len / 2 - 0.5 * lift)
            ankle = (hip_x, hip_y + leg_len - lift)
        upper_c = bottom(f) if ident.bottom_kind != "skirt" else skin(f)
        lower_c = bottom(f) if ident.bottom_kind == "trousers" else skin(f)
        lower_w = leg_w if ident.bottom_kind == "trousers" else 0.75 * leg_w
        _limb(draw, [knee, ankle], lower_w, lower_c)
        _limb(draw, [(hip_x, hip_y), knee], leg_w, upper_c)
        shoe_h = 0.035 * h
        ax, ay = ankle
        box = ([ax - 0.25 * leg_w if d > 0 else ax - 0.085 * h, ay - shoe_h / 2,
                ax + 0.085 * h if d > 0 else ax + 0.25 * leg_w, ay + shoe_h / 2] if side else
               [ax - 0.6 * leg_w, ay - shoe_h / 2, ax + 0.6 * leg_w, ay + shoe_h / 2])
        draw.ellipse(box, fill=_fill(ident.shoes, shade * f))

    def arm(sx: float, sy: float, phase: float, out: float, f: float) -> None:
        if side:
            upper = -ARM_SWING * math.sin(phase)
            lower = upper + 0.25 + 0.3 * max(0.0, -math.sin(phase))  # the forearm swings forward
            elbow = _step(sx, sy, upper, 0.17 * h, d)
            hand = _step(*elbow, lower, 0.15 * h, d)
        else:
            splay = 0.07 + 0.03 * math.sin(phase)
            elbow = (sx + out * math.sin(splay) * 0.17 * h, sy + math.cos(splay) * 0.17 * h)
            hand = (elbow[0] + out * math.sin(splay * 0.6) * 0.15 * h, elbow[1] + math.cos(splay * 0.6) * 0.15 * h)
        _limb(draw, [elbow, hand], 0.85 * arm_w, top_c(f) if ident.long_sleeves else skin(f))
        _limb(draw, [(sx, sy), elbow], arm_w, top_c(f))
        r = 0.5 * arm_w
        draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=skin(f))

    head_cx, head_cy = cx + (0.02 * h * d if side else 0.0), top + head_h / 2
    torso = [(cx - sw, shoulder_y), (cx + sw, shoulder_y), (cx + 1.05 * hw, hip_y + 0.02 * h),
             (cx - 1.05 * hw, hip_y + 0.02 * h)]
    if side:  # a slight forward lean
        lean = 0.015 * h * d
        torso = [(torso[0][0] + lean, shoulder_y), (torso[1][0] + lean, shoulder_y), torso[2], torso[3]]

    # --- behind the body
    if side:
        leg(cx, phi + math.pi, FAR_SHADE)
        arm(cx + 0.01 * h * d, shoulder_y + 0.5 * arm_w, phi + math.pi, 0, FAR_SHADE)
        if ident.bag == "backpack":
            bx0, bx1 = sorted((cx - d * (sw + 0.07 * h), cx - d * (sw - 0.02 * h)))
            draw.rectangle([bx0, shoulder_y + 0.03 * h, bx1, shoulder_y + 0.23 * h], fill=bag)
    if ident.hair_length == "long" and pose.view != "back":
        if front:  # falls on both sides of the face
            x0, x1 = head_cx - 0.62 * head_w, head_cx + 0.62 * head_w
        else:  # falls behind the head
            x0, x1 = sorted((head_cx - d * 0.62 * head_w, head_cx))
        draw.rectangle([x0, head_cy, x1, shoulder_y + 0.07 * h], fill=hair)

    # --- legs, hips, torso
    if not side:
        leg(cx - 0.5 * hw, phi, 1.0)
        leg(cx + 0.5 * hw, phi + math.pi, 1.0)
    else:
        leg(cx, phi, 1.0)
    draw.rectangle([cx - hw, hip_y - 0.04 * h, cx + hw, hip_y + 0.045 * h], fill=bottom())
    if ident.bottom_kind == "skirt":
        flare = 1.5 * hw
        draw.polygon([(cx - hw, hip_y - 0.03 * h), (cx + hw, hip_y - 0.03 * h), (cx + flare, hip_y + 0.2 * h),
                      (cx - flare, hip_y + 0.2 * h)], fill=bottom())
    neck_w = 0.18 * head_w
    draw.rectangle([head_cx - neck_w, head_cy, head_cx + neck_w, shoulder_y + 0.01 * h], fill=skin())
    _pattern_fill(img, torso, ident, shade, 0.045 * h, show_logo=front)
    if not side:
        r = 0.65 * arm_w  # round the shoulders
        for sx in (cx - sw + 0.5 * arm_w, cx + sw - 0.5 * arm_w):
            draw.ellipse([sx - r, shoulder_y, sx + r, shoulder_y + 2 * r], fill=top_c())

    # --- what lies on the torso: hair down the back, bag, straps, arms
    if ident.hair_length == "long" and pose.view == "back":
        draw.rectangle([head_cx - 0.6 * head_w, head_cy, head_cx + 0.6 * head_w, shoulder_y + 0.13 * h], fill=hair)
    if ident.bag == "backpack":
        if pose.view == "back":
            draw.rounded_rectangle([cx - 0.65 * sw, shoulder_y + 0.03 * h, cx + 0.65 * sw, shoulder_y + 0.24 * h],
                                   radius=0.02 * h, fill=bag)
        elif front:
            for sx in (cx - 0.55 * sw, cx + 0.55 * sw):
                draw.line([(sx, shoulder_y), (sx + 0.05 * (sx - cx), shoulder_y + 0.16 * h)], fill=bag, width=round(strap))
    elif ident.bag == "shoulder":
        bag_x = cx + (hw + 0.01 * h if not side else -d * 0.03 * h)
        strap_from = (cx - (0.6 * sw if not side else -d * 0.3 * sw), shoulder_y)
        draw.line([strap_from, (bag_x, hip_y - 0.08 * h)], fill=bag, width=round(strap))
        if not front:
            draw.rectangle([bag_x - 0.05 * h, hip_y - 0.09 * h, bag_x + 0.05 * h, hip_y + 0.03 * h], fill=bag)
    if side:
        arm(cx + 0.01 * h * d, shoulder_y + 0.5 * arm_w, phi, 0, 1.0)
    else:
        arm(cx - sw + 0.5 * arm_w, shoulder_y + 0.5 * arm_w, phi + math.pi, -1, 1.0)
        arm(cx + sw - 0.5 * arm_w, shoulder_y + 0.5 * arm_w, phi, +1, 1.0)

    # --- head: hair cap, face
    hx0, hy0, hx1, hy1 = head_cx - head_w / 2, top, head_cx + head_w / 2, top + head_h
    if ident.hair_length == "short" and pose.view == "back":
        draw.ellipse([hx0, hy0, hx1, hy1], fill=skin())  # the nape shows under short hair
        draw.ellipse([hx0, hy0 - 0.02 * h, hx1, hy1 - 0.25 * head_h], fill=hair)
        return
    draw.ellipse([hx0, hy0 - 0.01 * h, hx1, hy1], fill=hair)
    if front:
        draw.ellipse([hx0 + 0.08 * head_w, hy0 + 0.28 * head_h, hx1 - 0.08 * head_w, hy1], fill=skin())
        eye_r, eye_y = max(0.8, 0.06 * head_w), hy0 + 0.58 * head_h
        for ex in (head_cx - 0.18 * head_w, head_cx + 0.18 * head_w):
            draw.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=(30, 22, 20))
    elif side:
        fx = head_cx + d * 0.18 * head_w
        draw.ellipse([fx - 0.4 * head_w, hy0 + 0.25 * head_h, fx + 0.4 * head_w, hy1], fill=skin())
