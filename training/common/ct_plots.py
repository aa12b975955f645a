"""Overlay PNGs for the CT model cards: label maps drawn over windowed slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# label value -> RGB; lesion maps (1 GGO yellow, 2 consolidation red) and lungs (1 right, 2 left)
LESION_COLOURS = {1: (255, 220, 0), 2: (230, 30, 30)}
LUNG_COLOURS = {1: (40, 120, 255), 2: (40, 220, 120)}


def overlay(grey: np.ndarray, labels: np.ndarray, colours: dict[int, tuple], alpha: float = 0.45
            ) -> np.ndarray:
    """uint8 RGB: `grey` in [0, 1] with every labelled pixel tinted by its colour."""
    rgb = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.float32)[..., None], 3, axis=2)
    for value, colour in colours.items():
        where = labels == value
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float32)
    return rgb.astype(np.uint8)


def tile(image: np.ndarray, size: int, caption: str = "") -> np.ndarray:
    """Resize an RGB image to size x size (aspect kept, padded) and write a caption on it."""
    img = Image.fromarray(image)
    img.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    if caption:
        ImageDraw.Draw(canvas).text((4, 4), caption, fill=(255, 255, 255))
    return np.asarray(canvas)


def save_grid(rows: list[list[np.ndarray]], path: Path) -> None:
    """Rows of equally sized tiles -> one PNG (short rows padded with black)."""
    width = max(len(r) for r in rows)
    blank = np.zeros_like(rows[0][0])
    grid = np.concatenate(
        [np.concatenate(r + [blank] * (width - len(r)), axis=1) for r in rows], axis=0
    )
    Image.fromarray(grid).save(path, optimize=True)
