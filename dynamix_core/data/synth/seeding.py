"""Per-item random streams: every identity, camera, video and image draws from its own generator.

A stream is keyed by the master seed plus a path such as ``("multi", set_index, "id", pid)``, so
growing a set never changes the images it already had, and items can be rendered in any order or
process with the same result.
"""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *path: int | str) -> np.random.Generator:
    """The generator of stream ``path`` under ``seed`` (strings are hashed with CRC-32: stable across runs)."""
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in path]
    return np.random.default_rng(np.random.SeedSequence(words))
