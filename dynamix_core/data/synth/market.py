"""Market-1501-layout sets: the multi-camera source sets and the held-out target domain.

A set is planned first (which identity is seen by which cameras, how many images, which file name
and folder each image gets), then rendered unit by unit; a unit is one identity's images, or a block
of distractor/junk images. File names follow Market-1501 exactly: ``PPPP_cCsS_FFFFFF_NN.jpg``
(pid 0001-9999, camera 1-6, recording sequence 1-6, frame, detection index), ``0000_...`` for
distractors (gallery negatives) and ``-1_...`` for junk (dropped at load).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dynamix_core.data.synth.cameras import CameraStyle, sample_camera_style
from dynamix_core.data.synth.config import SynthConfig
from dynamix_core.data.synth.identities import Identity, sample_identity
from dynamix_core.data.synth.scene import Shot, render_shot, sample_shot
from dynamix_core.data.synth.seeding import rng_for

TRAIN, GALLERY, QUERY = "bounding_box_train", "bounding_box_test", "query"
#: Images per distractor/junk rendering unit.
EXTRAS_PER_UNIT = 32


@dataclass(frozen=True, slots=True)
class MarketSet:
    """One Market-layout set: its name, random stream and cameras."""

    name: str
    stream: tuple[str | int, ...]  # rng path prefix, e.g. ("multi", 0)
    cameras: tuple[CameraStyle, ...]
    num_train_ids: int  # pids 1..num_train_ids go to bounding_box_train/
    num_test_ids: int  # the next pids go to query/ + bounding_box_test/
    held_out: bool  # target domain: held-out attribute combinations


@dataclass(frozen=True, slots=True)
class MarketImage:
    """One planned image file."""

    folder: str
    name: str
    kind: str  # "person", "distractor" or "junk"
    pid: int  # the identity; for distractors/junk the running index of the extra image
    cam: int  # 0-based camera index
    index: int  # image number of this (pid, camera)


def multi_set(cfg: SynthConfig, index: int) -> MarketSet:
    """Source set ``synth_m<index>``: 4-6 (config) cameras of its own."""
    stream = ("multi", index)
    num_cameras = int(rng_for(cfg.seed, *stream, "num_cameras").integers(cfg.min_cameras, cfg.max_cameras + 1))
    cameras = tuple(sample_camera_style(rng_for(cfg.seed, *stream, "camera", c), cfg.held_out_cast_hue, held_out=False)
                    for c in range(num_cameras))
    return MarketSet(f"synth_m{index}", stream, cameras, cfg.multi_train_ids, cfg.multi_test_ids, held_out=False)


def target_set(cfg: SynthConfig) -> MarketSet:
    """The target domain ``synth_target``: unseen camera styles, held-out clothing hues, test ids only."""
    stream = ("target",)
    cameras = tuple(sample_camera_style(rng_for(cfg.seed, *stream, "camera", c), cfg.held_out_cast_hue, held_out=True)
                    for c in range(cfg.target_cameras))
    return MarketSet("synth_target", stream, cameras, 0, cfg.target_ids, held_out=True)


def _name(pid: str, cam: int, seq: int, frame: int, det: int) -> str:
    return f"{pid}_c{cam + 1}s{seq}_{frame:06d}_{det:02d}.jpg"


def plan_identity(cfg: SynthConfig, mset: MarketSet, pid: int) -> list[MarketImage]:
    """The images of identity ``pid`` (1-based): >= 2 cameras; a test identity gets one query in
    each of up to ``queries_per_id`` cameras, always leaving a camera whose images are all in the
    gallery, so every query has a cross-camera positive."""
    rng = rng_for(cfg.seed, *mset.stream, "plan", pid)
    num_cams = int(rng.integers(cfg.min_cameras_per_id, min(cfg.max_cameras_per_id, len(mset.cameras)) + 1))
    cams = rng.choice(len(mset.cameras), size=num_cams, replace=False)  # random order: the first ones hold the queries
    test = pid > mset.num_train_ids
    num_queries = min(cfg.queries_per_id, num_cams - 1) if test else 0
    images = []
    for rank, cam in enumerate(cams.tolist()):
        seq, first_frame = int(rng.integers(1, 7)), int(rng.integers(0, 90_000)) * 10
        for k in range(int(rng.integers(1, cfg.max_images_per_camera + 1))):
            folder = TRAIN if not test else (QUERY if rank < num_queries and k == 0 else GALLERY)
            # consecutive detections of one walk: frames a few apart, unique within (pid, camera)
            name = _name(f"{pid:04d}", cam, seq, first_frame + 5 * k + int(rng.integers(0, 5)), int(rng.integers(1, 9)))
            images.append(MarketImage(folder, name, "person", pid, cam, k))
    return images


def plan_extras(cfg: SynthConfig, mset: MarketSet, kind: str, count: int) -> list[MarketImage]:
    """``count`` distractor (pid 0000) or junk (pid -1) gallery images."""
    rng = rng_for(cfg.seed, *mset.stream, "plan", kind)
    pid = "0000" if kind == "distractor" else "-1"
    images = []
    for j in range(count):
        cam = int(rng.integers(0, len(mset.cameras)))
        name = _name(pid, cam, int(rng.integers(1, 7)), 10 * j + int(rng.integers(0, 10)), int(rng.integers(1, 9)))
        images.append(MarketImage(GALLERY, name, kind, j, cam, 0))
    return images


def plan_units(cfg: SynthConfig, mset: MarketSet) -> list[list[MarketImage]]:
    """The set's rendering units: one per identity, then blocks of distractors and junk."""
    units = [plan_identity(cfg, mset, pid) for pid in range(1, mset.num_train_ids + mset.num_test_ids + 1)]
    for kind, count in (("distractor", cfg.distractors_per_set), ("junk", cfg.junk_per_set)):
        extras = plan_extras(cfg, mset, kind, count)
        units.extend(extras[i:i + EXTRAS_PER_UNIT] for i in range(0, len(extras), EXTRAS_PER_UNIT))
    return units


def _bad_shot(shot: Shot, kind: str, rng: np.random.Generator) -> tuple[Shot, bool]:
    """Reframe ``shot`` like a failed detection; returns (shot, whether a person is drawn).

    Distractors: the person half out of the crop, or only background. Junk: a zoom on a body part."""
    if kind == "junk":
        scale = float(rng.uniform(1.8, 3.0))
        return dataclasses.replace(shot, scale=scale, feet=float(rng.uniform(0.9, 0.6 + scale))), True
    if rng.random() < 0.4:
        return shot, False
    dx = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.6))
    return dataclasses.replace(shot, dx=dx), True


def render_unit(cfg: SynthConfig, mset: MarketSet, unit: list[MarketImage]) -> list[Image.Image]:
    """The images of one unit, in order."""
    out = []
    people: dict[int, Identity] = {}
    for image in unit:
        style = mset.cameras[image.cam]
        rng = rng_for(cfg.seed, *mset.stream, "image", image.kind, image.pid, image.cam, image.index)
        shot = sample_shot(style, rng)
        if image.kind == "person":
            if image.pid not in people:
                people[image.pid] = sample_identity(rng_for(cfg.seed, *mset.stream, "identity", image.pid),
                                                    cfg.held_out_hue, target=mset.held_out)
            ident = people[image.pid]
        else:  # a stranger seen once
            shot, with_person = _bad_shot(shot, image.kind, rng)
            ident = sample_identity(rng, cfg.held_out_hue, target=mset.held_out) if with_person else None
        out.append(render_shot(ident, style, shot, rng, cfg.height, cfg.width))
    return out
