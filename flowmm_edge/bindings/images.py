"""Generated pictures for calibration and evaluation, encoded as PNG by Pillow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def pattern(seed: int, size: int = 64) -> bytes:
    """A seeded picture: a gradient with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 8, 2)
        img[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.integers(0, 256, 3)
    return png_bytes(img)
