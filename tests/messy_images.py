"""A small image folder with every kind of bad input a real scrape contains.

``write_messy_folder(root)`` writes ``root/cats`` (label 0) and ``root/dogs``
(label 1) and returns what trainers/data.py must make of them. Constant-colour
images survive crop and resize unchanged, so tests can find them in a batch.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# Expected outcome for config.data.image_size <= 64 (tiny threshold 8 px).
NUM_USABLE = 6
NUM_UNREADABLE = 3  # truncated JPEG, non-image bytes, empty file
NUM_TOO_SMALL = 1  # 4x4 PNG
# RGB colour each constant-colour file must come out as (channels=3), by label.
CONVERTED_COLOURS = {
    "cats/gray.png": ((100, 100, 100), 0),  # grayscale -> RGB
    "cats/cmyk.jpg": ((255, 0, 0), 0),  # CMYK (0, 255, 255, 0) -> red (JPEG: approximately)
    "dogs/transparent.png": ((255, 255, 255), 1),  # fully transparent RGBA -> white background
    "dogs/palette.png": ((0, 0, 255), 1),  # palette -> RGB
}


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_messy_folder(root: str) -> dict[str, bytes]:
    """Writes the folder; returns {relative path: bytes written}."""
    palette = Image.new("P", (33, 33), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    noise_jpeg = _encode(_noise(64, 48, seed=1), "JPEG", quality=95)
    files = {
        "cats/noise_rect.jpg": _encode(_noise(40, 30, seed=0), "JPEG", quality=95),
        "cats/gray.png": _encode(Image.new("L", (32, 32), 100), "PNG"),
        "cats/cmyk.jpg": _encode(Image.new("CMYK", (36, 36), (0, 255, 255, 0)), "JPEG",
                                 quality=100),
        "cats/empty.png": b"",
        "cats/tiny.png": _encode(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG"),
        "dogs/noise_rect.png": _encode(_noise(50, 20, seed=2), "PNG"),
        "dogs/transparent.png": _encode(Image.new("RGBA", (30, 30), (255, 0, 0, 0)), "PNG"),
        "dogs/palette.png": _encode(palette, "PNG"),
        "dogs/truncated.jpg": noise_jpeg[: len(noise_jpeg) // 2],
        "dogs/not_an_image.jpg": b"<html>404 not found</html>",
    }
    for relpath, payload in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(relpath)), exist_ok=True)
        with open(os.path.join(root, relpath), "wb") as f:
            f.write(payload)
    return files
