"""Seeded, independent random streams for the samplers, with JSON-serialisable state."""

from __future__ import annotations

import copy

import numpy as np

#: Stream ids under one seed (``SeedSequence.spawn_key``), so the streams never share draws.
MULTI_IDS_STREAM = 0  # identity draws of the multi-camera part: one stream shared by every rank
MULTI_IMAGES_STREAM = 1  # + rank: image draws of the multi-camera part
SINGLE_STREAM = 2  # + rank: video/identity/image draws of the single-camera part


def make_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of stream ``stream`` (a tuple of ints, e.g. ``(SINGLE_STREAM, rank)``) under ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=stream)))


def rng_state(rng: np.random.Generator) -> dict:
    """Plain-dict state of ``rng`` (ints and strings only: JSON-safe)."""
    return copy.deepcopy(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = copy.deepcopy(state)
