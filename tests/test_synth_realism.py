"""SynthReID behaves like re-ID data (SPEC 1.4 "Realism, measured"): detector-style crops,
backgrounds that vary within a camera, and the field's baseline ladder on the generated splits.

mAP here is computed with scikit-learn's average precision per query (independent of
``dynamix_core.evaluation``), after removing same-identity same-camera gallery entries (SPEC 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from dynamix_core.config import load_config
from dynamix_core.data.synth import SynthConfig, generate
from dynamix_core.data.synth.identities import sample_identity
from dynamix_core.data.synth.market import multi_set
from dynamix_core.data.synth.scene import render_shot, sample_shot
from dynamix_core.data.synth.seeding import rng_for


def person_mask(style, shot, ident, seed: int) -> np.ndarray:
    """Pixels where drawing the person changed the crop (same shot, camera noise and occluder)."""
    with_person = np.asarray(render_shot(ident, style, shot, rng_for(seed, "r"), 128, 64), dtype=float)
    empty = np.asarray(render_shot(None, style, shot, rng_for(seed, "r"), 128, 64), dtype=float)
    return np.abs(with_person - empty).max(axis=2) > 25


def test_crops_are_detector_style_the_person_fills_the_box():
    cfg = SynthConfig()
    cameras = multi_set(cfg, 0).cameras
    heights, widths = [], []
    for i in range(40):
        style = cameras[i % len(cameras)]
        mask = person_mask(style, sample_shot(style, rng_for(1, "shot", i)),
                           sample_identity(rng_for(1, "id", i), cfg.held_out_hue), seed=i)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        heights.append((rows[-1] - rows[0] + 1) / mask.shape[0])
        widths.append((cols[-1] - cols[0] + 1) / mask.shape[1])
    assert np.median(heights) >= 0.8, heights  # most of the box height
    assert np.median(widths) >= 0.5, widths  # the central half of the width or more


def test_backgrounds_vary_from_image_to_image_within_a_camera():
    style = multi_set(SynthConfig(), 0).cameras[0]
    scenes = [np.asarray(render_shot(None, style, sample_shot(style, rng_for(2, "shot", i)), rng_for(2, "r", i), 128, 64),
                         dtype=float) for i in range(6)]
    diffs = [np.abs(scenes[i] - scenes[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 15.0, diffs  # 0-255 units: another scene, not the same picture shifted by noise


# ------------------------------------------------------------------------- the baseline ladder

def market_split(root: Path, folder: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Images, pids and cameras of one Market folder, read from the file names (junk dropped)."""
    imgs, pids, cams = [], [], []
    for path in sorted((root / folder).glob("*.jpg")):
        pid, cam = path.name.split("_")[:2]
        if pid == "-1":
            continue
        imgs.append(np.asarray(Image.open(path).convert("RGB")))
        pids.append(int(pid))
        cams.append(int(cam[1]))
    return imgs, np.array(pids), np.array(cams)


def hsv_histogram(imgs: list[np.ndarray]) -> np.ndarray:
    """HSV 8x3x3 histograms of 6 stripes over the central half of the width, L2-normalised."""
    feats = []
    for im in imgs:
        hsv = np.asarray(Image.fromarray(im).convert("HSV"), dtype=np.int64)[:, im.shape[1] // 4: -(im.shape[1] // 4)]
        code = (hsv[..., 0] * 8 // 256) * 9 + (hsv[..., 1] * 3 // 256) * 3 + hsv[..., 2] * 3 // 256
        stripes = np.array_split(code, 6, axis=0)
        f = np.concatenate([np.bincount(s.ravel(), minlength=72) for s in stripes]).astype(float)
        feats.append(f / np.linalg.norm(f))
    return np.stack(feats)


def sklearn_map(q_feat, g_feat, q_pid, g_pid, q_cam, g_cam) -> float:
    sim = q_feat @ g_feat.T
    aps = []
    for i in range(len(q_pid)):
        keep = ~((g_pid == q_pid[i]) & (g_cam == q_cam[i]))
        rel = g_pid[keep] == q_pid[i]
        if rel.any():
            aps.append(average_precision_score(rel, sim[i, keep]))
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_calibration")
    generate(load_config(SynthConfig, None, ["num_videos=0", "num_multi_sets=2", "target_ids=40"]), root, progress=False)
    return root


def test_colour_histogram_beats_chance_in_domain_and_drops_on_the_target(calibration_set):
    rng = np.random.default_rng(0)
    scores = {}
    for name in ("multi/synth_m0", "multi/synth_m1", "target/synth_target"):
        (qi, qp, qc), (gi, gp, gc) = (market_split(calibration_set / name, f) for f in ("query", "bounding_box_test"))
        colour = sklearn_map(hsv_histogram(qi), hsv_histogram(gi), qp, gp, qc, gc)
        chance = np.mean([sklearn_map(rng.normal(size=(len(qp), 8)), rng.normal(size=(len(gp), 8)), qp, gp, qc, gc)
                          for _ in range(10)])
        scores[name] = (colour, chance)
    for name in ("multi/synth_m0", "multi/synth_m1"):
        colour, chance = scores[name]
        assert colour >= 3.0 * chance, scores  # person appearance, not the camera, decides the ranking
    in_domain = np.mean([scores[n][0] for n in ("multi/synth_m0", "multi/synth_m1")])
    assert scores["target/synth_target"][0] < in_domain, scores  # a domain gap, as on real data
    assert scores["target/synth_target"][0] >= 2.0 * scores["target/synth_target"][1], scores  # still solvable
