"""SynthReID preset ``real`` (docs/learning.md section 8): its counts, the shares of video people in
the target's clothing and of target-like video cameras measured from the generated people and
cameras against the configured values, and within-video variation present in the plans and in the
pixels."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math

import numpy as np
import pytest

from dynamix_core.config import load_config
from dynamix_core.data.synth import MANIFEST, SynthConfig, generate
from dynamix_core.data.synth.presets import preset_overrides
from dynamix_core.data.synth.videos import plan_video, render_video, video_person, video_plans

REAL = load_config(SynthConfig, None, preset_overrides("real"))


def in_band(rgb, band) -> bool:
    """Hue of an RGB triple inside ``band`` (hue is unchanged by scaling and by adding grey, so a
    camera's cast multipliers give the hue of the cast direction they were made from)."""
    h, s, _ = colorsys.rgb_to_hsv(*(c / max(rgb) for c in rgb))
    return s > 1e-3 and band[0] <= h <= band[1]


def binomial_ok(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def plans():
    return list(video_plans(REAL))


def test_real_preset_sizes(plans):
    assert (REAL.num_multi_sets, REAL.multi_train_ids) == (1, 60)
    assert REAL.target_ids >= 200
    assert len(plans) == 600
    people = sum(len(p.walks) for p in plans)
    assert people >= 20 * REAL.num_multi_sets * REAL.multi_train_ids  # tens of times the labelled identities
    assert 2400 <= people <= 3000  # 3-6 people per video


def test_real_preset_videos_are_drawn_from_the_world(plans):
    """Shares measured on what was drawn - the people's tops, the cameras' colour casts - against the
    configured shares; the source prior never puts the held-out hue on a top, the source cameras
    never cast in the held-out band."""
    walks = [(p, w) for p in plans for w in p.walks]
    target_tops = sum(in_band(video_person(REAL, p.video, w).top, REAL.held_out_hue) for p, w in walks)
    assert binomial_ok(target_tops, len(walks), REAL.video_target_clothing_share), target_tops / len(walks)
    target_cams = sum(in_band(p.style.cast, REAL.held_out_cast_hue) for p in plans)
    assert binomial_ok(target_cams, len(plans), REAL.video_target_camera_share), target_cams / len(plans)
    # and the knobs at 0 (the demo) give none of either
    demo = load_config(SynthConfig, None, preset_overrides("demo"))
    for plan in (plan_video(demo, v, 0, 0) for v in range(40)):
        assert not in_band(plan.style.cast, demo.held_out_cast_hue)
        assert not any(in_band(video_person(demo, plan.video, w).top, demo.held_out_hue) for w in plan.walks)


def test_real_preset_walks_vary_within_a_video(plans):
    walks = [w for p in plans for w in p.walks]
    scenes = [len({w.at(t)[1] for t in range(w.length)}) for w in walks]
    views = [len({w.at(t)[0] for t in range(w.length)}) for w in walks]
    shades = [abs(w.at(w.length - 1)[2] - w.at(0)[2]) for w in walks]
    assert binomial_ok(sum(s > 1 for s in scenes), len(walks), REAL.scene_change_rate)
    assert binomial_ok(sum(v > 1 for v in views), len(walks), REAL.turn_rate)
    # |U1 - U2| for U uniform on a band of width 2*0.3: mean 0.6 / 3
    assert np.mean(shades) == pytest.approx(2 * REAL.light_change / 3, rel=0.1)
    # several people of a video meet in its later scenes (same-video hard negatives there too)
    shared = sum(len({s for w in p.walks for s in w.scenes[1:]}) < sum(len(w.scenes) - 1 for w in p.walks)
                 for p in plans)
    assert shared > 0


def test_a_scene_change_shows_in_the_background_pixels():
    """Along a walk that changes scene, the image border (background beside the person) jumps at the
    cut: the mean absolute difference of consecutive frames' border columns across a cut is far
    above that of consecutive frames within one scene."""
    across, within = [], []
    small = dataclasses.replace(REAL, height=64, width=32)
    for video in range(8):
        plan = plan_video(small, video, 0, 0)
        images = render_video(small, plan)
        frames = {}
        for box, img in zip(plan.boxes, images):
            frames[(box.person, box.frame)] = np.asarray(img, dtype=np.float32)
        for w in plan.walks:
            for f in range(w.start, w.start + w.length - 1):
                if (w.person, f) not in frames or (w.person, f + 1) not in frames:
                    continue
                a, b = frames[(w.person, f)], frames[(w.person, f + 1)]
                border = lambda x: np.concatenate([x[:, :3], x[:, -3:]], axis=1)  # noqa: E731
                diff = float(np.abs(border(a) - border(b)).mean())
                t = f + 1 - w.start
                (across if w.at(t)[1] != w.at(t - 1)[1] else within).append(diff)
    assert len(across) >= 5
    assert np.median(across) > 2 * np.median(within), (np.median(across), np.median(within))


def test_generated_manifest_counts_the_world_and_the_variation(tmp_path):
    """A reduced scale of the preset, written to disk: the manifest's counts are those of the plans
    and the people's clothing measured on the drawn identities."""
    cfg = dataclasses.replace(REAL.scaled(0.01), height=64, width=32)
    summary = generate(cfg, tmp_path / "real", progress=False)
    video = next(s for s in summary["sets"] if s["kind"] == "single")
    assert json.loads((tmp_path / "real" / MANIFEST).read_text())["sets"] == summary["sets"]
    plans = list(video_plans(cfg))
    assert video["videos"] == len(plans) == 6
    assert video["target_look_people"] == sum(in_band(video_person(cfg, p.video, w).top, cfg.held_out_hue)
                                              for p in plans for w in p.walks)
    assert video["target_camera_videos"] == sum(in_band(p.style.cast, cfg.held_out_cast_hue) for p in plans)
    assert video["scene_changing_walks"] > 0 and video["turning_walks"] > 0
    assert [s["name"] for s in summary["sets"]] == ["synth_m0", "synth_video", "synth_target"]


def test_cli_preset_and_the_experiment_sees_its_one_labelled_set(tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.demo import multi_sets

    assert main(["synth", "--out", str(tmp_path / "data"), "--preset", "real", "--scale", "0.01", "--set", "height=64",
                 "--set", "width=32", "--no-progress"]) == 0
    assert "people in the target's clothing" in capsys.readouterr().out
    config = json.loads((tmp_path / "data" / MANIFEST).read_text())["config"]
    assert (config["video_target_clothing_share"], config["scene_change_rate"], config["num_videos"]) == (0.3, 0.5, 6)
    assert multi_sets(tmp_path) == ["synth_m0"]
