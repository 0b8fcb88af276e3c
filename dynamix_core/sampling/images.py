"""The K images of one identity: spread over its cameras, repeats only when it has fewer than K."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def draw_images(rng: np.random.Generator, per_camera: Sequence[np.ndarray], k: int) -> np.ndarray:
    """``k`` picks among an identity's images, given as one non-empty array per camera.

    Round-robin over the cameras taken in random order, each round adding one not-yet-picked image
    of every camera that has one left, so the picks span ``min(k, num_cameras)`` cameras and every
    camera gives a uniformly random subset of its images. An identity with fewer than ``k`` images
    gives all of them once plus random repeats; a single-image identity gives ``k`` copies, whose
    independently augmented views are then each other's positives.
    """
    total = sum(len(cam) for cam in per_camera)
    if total < k:
        everything = np.concatenate(per_camera)
        return np.concatenate([everything, rng.choice(everything, k - total)])
    cameras = [per_camera[i] for i in rng.permutation(len(per_camera))]
    counts = [0] * len(cameras)
    taken = 0
    while taken < k:  # one round: one more image from every camera that still has one
        for j, cam in enumerate(cameras):
            if counts[j] < len(cam) and taken < k:
                counts[j] += 1
                taken += 1
    return np.concatenate([cam[rng.choice(len(cam), n, replace=False)] for cam, n in zip(cameras, counts) if n])
