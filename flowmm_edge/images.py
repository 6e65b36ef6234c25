"""PNG bytes from an RGB array with zlib alone (for generated calibration and evaluation images)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def png_bytes(rgb: np.ndarray) -> bytes:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def pattern(seed: int, size: int = 64) -> bytes:
    """A seeded picture: a gradient with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 8, 2)
        img[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.integers(0, 256, 3)
    return png_bytes(img)
