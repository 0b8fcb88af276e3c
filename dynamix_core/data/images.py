"""Encoded image bytes (JPEG/PNG): format sniffing, full-decode validation, and fast decoding.

Decoding uses Pillow: ``torchvision.io`` cannot decode on the CPU build of torch here
(docs/stack.md). Images come back as ``uint8`` arrays of shape ``(H, W, 3)``, RGB, writable.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from dynamix_core.data.jpeg_check import jpeg_structure_problem

_MAGIC = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}


def sniff_format(data: bytes) -> str | None:
    """``"jpg"`` or ``"png"`` from the leading magic bytes, ``None`` for anything else."""
    for magic, ext in _MAGIC.items():
        if data.startswith(magic):
            return ext
    return None


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable JPEG/PNG image, or ``None`` when it decodes completely.

    The whole image is decoded (``Image.load``), not just its header (``verify`` would accept a
    truncated JPEG): a file that passes here will not fail later inside a training worker. A JPEG's
    Huffman-coded data is also checked symbol by symbol (:mod:`~dynamix_core.data.jpeg_check`):
    libjpeg decodes garbage in the middle of a scan into wrong pixels with only a warning, which
    Pillow drops."""
    if not data:
        return "unreadable image: empty file"
    if sniff_format(data) is None:
        return "unreadable image: not a JPEG or PNG (bad magic bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError:
        return "unreadable image: header not recognised by Pillow"
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's truncated/corrupt-stream errors
        reason = "truncated image" if "truncated" in str(exc).lower() else "unreadable image"
        return f"{reason}: {exc}"
    if sniff_format(data) == "jpg":
        problem = jpeg_structure_problem(data)
        if problem is not None:
            return f"corrupt image: {problem}"
    return None


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB ``uint8`` array ``(H, W, 3)``, resized to ``size = (H, W)``.

    When a JPEG is larger than ``size``, ``Image.draft`` lets libjpeg decode directly at a reduced
    DCT scale (1/2, 1/4, 1/8) that stays >= ``size``; the bilinear resize then starts from far fewer
    pixels. Never draft below the target size, so quality matches a full decode + resize closely."""
    with Image.open(io.BytesIO(data)) as img:
        if size is not None:
            height, width = size
            if img.format == "JPEG":
                img.draft("RGB", (width, height))  # a no-op unless a scale >= size exists
        img.load()
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    if size is not None and (rgb.height, rgb.width) != tuple(size):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.array(rgb)  # a writable copy (np.asarray of a PIL image is read-only)
