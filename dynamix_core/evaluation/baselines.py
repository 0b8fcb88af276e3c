"""Reference points for reading a mAP: chance, raw pixels and a hand-crafted colour descriptor.

    chance = random_ranking(q_pids, g_pids, q_camids, g_camids)       # {"mAP": ..., "rank1": ...}
    colour = evaluate_features(colour_histogram(q_imgs), colour_histogram(g_imgs), ...)

A learned model is only worth something above these: on real data the colour histogram ranks far
above chance in-domain and drops on another domain, and a trained CNN beats it (SPEC 1.4).
Images are RGB uint8 arrays (H, W, 3).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dynamix_core.evaluation.features import evaluate_features

#: random feature draws averaged by :func:`random_ranking`
RANDOM_DRAWS = 50


def raw_pixels(imgs: list[np.ndarray], size: tuple[int, int] = (32, 16)) -> np.ndarray:
    """The image at ``size`` (H, W), flattened and mean-centred (cosine of centred pixels)."""
    feats = np.stack([np.asarray(Image.fromarray(im).resize(size[::-1], Image.BILINEAR), dtype=np.float32).ravel()
                      for im in imgs])
    return feats - feats.mean(axis=1, keepdims=True)


def colour_histogram(imgs: list[np.ndarray], stripes: int = 6, bins: tuple[int, int, int] = (16, 4, 4)) -> np.ndarray:
    """HSV histograms (``bins`` over H, S, V) of ``stripes`` horizontal stripes of the central half of
    the width, square-rooted (Hellinger) and concatenated: the classic hand-crafted re-ID colour
    descriptor (the centre keeps most of the background out of a detector crop)."""
    num_bins = bins[0] * bins[1] * bins[2]
    feats = []
    for im in imgs:
        hsv = np.asarray(Image.fromarray(im).convert("HSV"), dtype=np.int64)
        h, w = hsv.shape[:2]
        centre = hsv[:, w // 4: w - w // 4]
        code = ((centre[..., 0] * bins[0] // 256) * bins[1] + centre[..., 1] * bins[1] // 256) * bins[2] \
            + centre[..., 2] * bins[2] // 256
        parts = []
        for s in range(stripes):
            hist = np.bincount(code[s * h // stripes:(s + 1) * h // stripes].ravel(), minlength=num_bins)
            parts.append(np.sqrt(hist / max(1, hist.sum())))
        feats.append(np.concatenate(parts).astype(np.float32))
    return np.stack(feats)


def random_ranking(q_pids, g_pids, q_camids, g_camids, draws: int = RANDOM_DRAWS, seed: int = 0) -> dict[str, float]:
    """Expected mAP / Rank-1 of a random ranking: the mean over ``draws`` random feature sets."""
    rng = np.random.default_rng(seed)
    maps, rank1s = [], []
    for _ in range(draws):
        m = evaluate_features(rng.normal(size=(len(q_pids), 16)).astype(np.float32),
                              rng.normal(size=(len(g_pids), 16)).astype(np.float32), q_pids, g_pids, q_camids, g_camids)
        maps.append(m["mAP"])
        rank1s.append(float(m["cmc"][0]))
    return {"mAP": float(np.mean(maps)), "rank1": float(np.mean(rank1s))}


def baseline_ladder(q_imgs, g_imgs, q_pids, g_pids, q_camids, g_camids) -> dict[str, dict[str, float]]:
    """``{"random": ..., "pixels": ..., "colour": ...}``, each ``{"mAP", "rank1"}`` (fractions)."""
    out = {"random": random_ranking(q_pids, g_pids, q_camids, g_camids)}
    for name, fn in (("pixels", raw_pixels), ("colour", colour_histogram)):
        m = evaluate_features(fn(q_imgs), fn(g_imgs), q_pids, g_pids, q_camids, g_camids)
        out[name] = {"mAP": float(m["mAP"]), "rank1": float(m["cmc"][0])}
    return out


__all__ = ["baseline_ladder", "colour_histogram", "random_ranking", "raw_pixels"]
