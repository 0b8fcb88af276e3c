"""The single-camera set: people walking through videos, tracked by a noisy tracker.

Each video is one static camera (one :class:`CameraStyle`) with several people, each visible on a
run of consecutive frames (a *walk*). The tracker's output is simulated with known ground truth:

* fragmentation - with probability ``fragment_rate`` a walk is cut into 2-3 tracklets;
* identity switch - about ``switch_rate`` of the tracklets hold two people: the tracker joined
  pieces of two people that never share a frame (it follows one box per frame).

Who the videos show and how a walk varies are knobs (0 by default: the source's people and cameras,
one scene, one viewpoint and one light per walk):

* ``video_target_clothing_share`` of the people wear the target's clothing combination, and
  ``video_target_camera_share`` of the videos are filmed by a camera drawn like the target's
  (held-out colour-cast band, harsher imaging): a video population drawn from the world, not from
  the labelled source;
* ``scene_change_rate`` of the walks cross into another scene of the video (1-2 times: every walk
  starts in the video's first scene, the later ones come from a pool of three more);
  ``turn_rate`` of the people turn once (another viewpoint from then on); ``light_change`` makes the
  light on a person drift between two levels along the walk.

Every such draw comes from its own random stream, so with the knobs at 0 the output is byte-identical
to a generator without them.

People are never shared between videos. Keys are LUPerson-NL's ``VVVVV_PPPPPP_FFFFFFF_OO``
(video, tracklet, frame, object), all 0-based; the object number is the person's rank among the
people visible in that frame.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from dynamix_core.data.synth.cameras import VIEWS, CameraStyle, sample_camera_style
from dynamix_core.data.synth.config import SynthConfig
from dynamix_core.data.synth.identities import Identity, sample_identity
from dynamix_core.data.synth.scene import Shot, render_shot
from dynamix_core.data.synth.seeding import rng_for


@dataclass(frozen=True, slots=True)
class Walk:
    """One person crossing the scene, visible on frames ``start`` .. ``start + length - 1``."""

    person: int  # video-local index
    true_pid: int  # global ground-truth identity
    start: int
    length: int
    view: str
    facing: int
    phase0: float
    phase_step: float  # walking-cycle advance per frame
    scale0: float
    scale_step: float  # relative size change per frame (walking towards or away from the camera)
    bg_x0: float
    bg_step: float  # background pan per frame (the detector's crop follows the person)
    bg_y: float
    target_look: bool = False  # wears the target's clothing combination
    scene_cuts: tuple[int, ...] = ()  # walk frames (from 0) at which the next scene of ``scenes`` starts
    scenes: tuple[int, ...] = (0,)  # the video's scenes the walk crosses, in order
    turn_at: int = -1  # walk frame from which the person is seen from ``turned_view`` (-1: never)
    turned_view: str = ""
    shade0: float = 1.0  # light on the person at the first and the last frame of the walk
    shade1: float = 1.0

    def at(self, t: int) -> tuple[str, int, float]:
        """``(view, scene, shade)`` at walk frame ``t``."""
        view = self.turned_view if 0 <= self.turn_at <= t else self.view
        scene = self.scenes[sum(cut <= t for cut in self.scene_cuts)]
        shade = self.shade0 + (self.shade1 - self.shade0) * t / max(1, self.length - 1)
        return view, scene, shade


@dataclass(frozen=True, slots=True)
class Box:
    """One detection as the tracker labels it."""

    frame: int
    person: int
    tracklet: int  # video-local tracker id (noisy)
    obj: int

    def key(self, video: int) -> str:
        return f"{video:05d}_{self.tracklet:06d}_{self.frame:07d}_{self.obj:02d}"


@dataclass(frozen=True, slots=True)
class VideoPlan:
    video: int
    style: CameraStyle
    walks: tuple[Walk, ...]
    boxes: tuple[Box, ...]  # key order: tracklet, then frame
    first_tracker_pid: int  # global tracker pid of tracklet 0 (the ``pids`` of keys.pkl)
    num_tracklets: int
    num_fragmented: int  # people cut into >= 2 tracklets
    num_switched: int  # tracklets holding two people
    owed_switches: int  # switches no pair of this video could take, carried to the next video
    target_camera: bool = False  # filmed by a camera drawn like the target's


#: Scenes a video's walks can cross into besides its first one.
EXTRA_SCENES_PER_VIDEO = 3


def _vary(cfg: SynthConfig, walk: Walk, rng: np.random.Generator) -> Walk:
    """``walk`` with its clothing kind, scene changes, turn and light drift (the within-video knobs)."""
    changes = {"target_look": bool(rng.random() < cfg.video_target_clothing_share)}
    inner = walk.length - 2  # cuts and turns fall on frames 1 .. length-2, so both sides are seen
    if rng.random() < cfg.scene_change_rate and inner >= 1:
        num = min(inner, 2 if rng.random() < 0.3 else 1)
        cuts = np.sort(rng.choice(np.arange(1, walk.length - 1), size=num, replace=False))
        extra = rng.choice(np.arange(1, EXTRA_SCENES_PER_VIDEO + 1), size=num, replace=False)
        changes.update(scene_cuts=tuple(int(c) for c in cuts), scenes=(0,) + tuple(int(s) for s in extra))
    if rng.random() < cfg.turn_rate and inner >= 1:
        changes.update(turn_at=int(rng.integers(1, walk.length - 1)),
                       turned_view=str(rng.choice([v for v in VIEWS if v != walk.view])))
    if cfg.light_change > 0:
        lo, hi = 1.0 - cfg.light_change, 1.0 + cfg.light_change
        changes.update(shade0=float(rng.uniform(lo, hi)), shade1=float(rng.uniform(lo, hi)))
    return dataclasses.replace(walk, **changes)


def _walk(cfg: SynthConfig, style: CameraStyle, rng: np.random.Generator, person: int, true_pid: int) -> Walk:
    length = int(rng.integers(cfg.min_track_frames, cfg.max_track_frames + 1))
    view = VIEWS[rng.choice(3, p=style.view_probs)]
    facing = 1 if rng.random() < 0.5 else -1
    if view == "side":  # crossing the image: the crop pans over the scene, the size barely changes
        scale_step, bg_step = rng.normal(0.0, 0.003), facing * rng.uniform(0.005, 0.02)
    else:  # towards (front) or away from (back) the camera: the figure grows or shrinks
        scale_step, bg_step = (1 if view == "front" else -1) * rng.uniform(0.003, 0.01), rng.normal(0.0, 0.003)
    return Walk(
        person=person, true_pid=true_pid, start=int(rng.integers(0, cfg.video_frames - length + 1)), length=length,
        view=view, facing=facing, phase0=float(rng.uniform(0, 2 * math.pi)), phase_step=float(rng.uniform(0.5, 1.1)),
        scale0=float(style.scale * (1.0 - scale_step * length / 2)), scale_step=float(scale_step),
        bg_x0=float(rng.uniform()), bg_step=float(bg_step), bg_y=float(rng.uniform()),
    )


def _fragment(cfg: SynthConfig, rng: np.random.Generator, walk: Walk) -> list[tuple[int, int]]:
    """The walk's tracklet pieces as ``(first frame, end frame)``; >= 2 with probability fragment_rate."""
    end = walk.start + walk.length
    if rng.random() >= cfg.fragment_rate:
        return [(walk.start, end)]
    min_len = cfg.min_fragment_frames
    num = 3 if walk.length >= 3 * min_len and rng.random() < 0.3 else 2
    spare = walk.length - num * min_len
    cuts = np.sort(rng.integers(0, spare + 1, size=num - 1))
    lengths = min_len + np.diff(np.concatenate([[0], cuts, [spare]]))
    bounds = walk.start + np.concatenate([[0], np.cumsum(lengths)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _switch(cfg: SynthConfig, rng: np.random.Generator, pieces: list[tuple[int, int, int]],
            owed: int) -> tuple[list[list[int]], int]:
    """Group pieces ``(person, first, end)`` into tracklets: about ``switch_rate`` of the tracklets
    join two pieces of different people that share no frame (a tracker follows one box per frame).

    Returns the groups and the switches still owed: a crowded video may have no such pair, so the
    shortfall (plus ``owed`` from earlier videos) is carried to the next video."""
    num = len(pieces)
    # k switches leave num - k tracklets: k ~ num * r / (1 + r) makes k / (num - k) about r
    wanted = int(rng.binomial(num, cfg.switch_rate / (1.0 + cfg.switch_rate))) + owed
    pairs = [(i, j) for i in range(num) for j in range(i + 1, num)
             if pieces[i][0] != pieces[j][0] and (pieces[i][2] <= pieces[j][1] or pieces[j][2] <= pieces[i][1])]
    taken = [False] * num
    groups = []
    for p in rng.permutation(len(pairs)).tolist():
        if len(groups) == wanted:
            break
        i, j = pairs[p]
        if not (taken[i] or taken[j]):
            taken[i] = taken[j] = True
            groups.append([i, j])
    return groups + [[i] for i in range(num) if not taken[i]], wanted - len(groups)


def plan_video(cfg: SynthConfig, video: int, first_true_pid: int, first_tracker_pid: int,
               owed_switches: int = 0) -> VideoPlan:
    """The people, walks and (noisy) tracker output of one video (``owed_switches``: see :func:`_switch`)."""
    target_camera = bool(rng_for(cfg.seed, "video", video, "camera kind").random() < cfg.video_target_camera_share)
    style = sample_camera_style(rng_for(cfg.seed, "video", video, "camera"), cfg.held_out_cast_hue,
                                held_out=target_camera)
    rng = rng_for(cfg.seed, "video", video, "plan")
    num_people = int(rng.integers(cfg.min_people_per_video, cfg.max_people_per_video + 1))
    walks = tuple(_walk(cfg, style, rng, p, first_true_pid + p) for p in range(num_people))
    walks = tuple(_vary(cfg, w, rng_for(cfg.seed, "video", video, "variation", w.person)) for w in walks)
    pieces = [(w.person, a, b) for w in walks for a, b in _fragment(cfg, rng, w)]
    groups, owed = _switch(cfg, rng, pieces, owed_switches)
    groups.sort(key=lambda g: min((pieces[i][1], pieces[i][0]) for i in g))
    visible = {}
    for w in walks:
        for f in range(w.start, w.start + w.length):
            visible.setdefault(f, []).append(w.person)
    boxes = sorted(
        (Box(f, pieces[i][0], tracklet, visible[f].index(pieces[i][0]))
         for tracklet, group in enumerate(groups) for i in group for f in range(pieces[i][1], pieces[i][2])),
        key=lambda b: (b.tracklet, b.frame),
    )
    num_pieces = [0] * num_people
    for person, _, _ in pieces:
        num_pieces[person] += 1
    return VideoPlan(
        video=video, style=style, walks=walks, boxes=tuple(boxes), first_tracker_pid=first_tracker_pid,
        num_tracklets=len(groups), num_fragmented=sum(n >= 2 for n in num_pieces),
        num_switched=sum(len(g) == 2 for g in groups), owed_switches=owed, target_camera=target_camera,
    )


def video_plans(cfg: SynthConfig) -> Iterator[VideoPlan]:
    """Every video's plan, in order (lazily: at scale the plans do not fit in memory together)."""
    true_pid = tracker_pid = owed = 0
    for video in range(cfg.num_videos):
        plan = plan_video(cfg, video, true_pid, tracker_pid, owed)
        owed = plan.owed_switches
        true_pid += len(plan.walks)
        tracker_pid += plan.num_tracklets
        yield plan


def video_person(cfg: SynthConfig, video: int, walk: Walk) -> Identity:
    """What the person of ``walk`` looks like: the source's prior, or the target's combination."""
    return sample_identity(rng_for(cfg.seed, "video", video, "person", walk.person), cfg.held_out_hue,
                           target=walk.target_look)


def render_video(cfg: SynthConfig, plan: VideoPlan) -> list[Image.Image]:
    """The crops of ``plan.boxes``, in order."""
    walks = plan.walks
    people = [video_person(cfg, plan.video, w) for w in walks]
    out = []
    for box in plan.boxes:
        w = walks[box.person]
        t = box.frame - w.start
        view, scene, shade = w.at(t)
        rng = rng_for(cfg.seed, "video", plan.video, "box", box.person, box.frame)
        shot = Shot(  # the walk's smooth motion plus detector jitter
            view=view, facing=w.facing, phase=w.phase0 + w.phase_step * t,
            scale=w.scale0 * (1.0 + w.scale_step * t) * (1.0 + rng.normal(0.0, plan.style.scale_jitter / 2)),
            dx=float(rng.normal(0.0, plan.style.shift_jitter / 2)),
            feet=float(np.clip(0.97 + rng.normal(0.0, 0.01), 0.93, 1.02)),
            bg_x=float(np.clip(w.bg_x0 + w.bg_step * t, 0.0, 1.0)), bg_y=w.bg_y, shade=shade, scene=scene,
        )
        out.append(render_shot(people[box.person], plan.style, shot, rng, cfg.height, cfg.width))
    return out
