"""The MedSeg lesion slices as network-ready tensors, split as Inf-Net split them.

MedSeg gives no patient ids, so slices of one patient may sit on both sides of that split:
every metric computed on them carries that caveat.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covid_plugin.ml.ct_lesion import to_network_input
from training.common.data import read_grey

INPUT_SIZE = 256


def load_slices(data: Path, split: str, limit: int | None = None) -> list[dict]:
    """MedSeg slices of one Inf-Net split as network-ready tensors: image (1,S,S), label (1,S,S).

    The split is Inf-Net's own, as the manifest's split_hint column records it.
    """
    with open(data / "ct" / "masks.csv", newline="") as fh:
        masks = {row["path"]: row["lesion_mask"] for row in csv.DictReader(fh)}
    with open(data / "ct" / "manifest.csv", newline="") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)
                 if row["label"] == "lesion_seg" and row["split_hint"] == split]
    out = []
    for path in paths[:limit]:
        image, place = to_network_input(torch.from_numpy(read_grey(data / path))[None, None],
                                        INPUT_SIZE)
        mask = torch.from_numpy(read_label(data / masks[path]))[None, None].float()
        label, _ = to_network_input(mask, INPUT_SIZE, mode="nearest")
        valid = torch.zeros_like(label[0], dtype=torch.bool)  # the slice, not its padding
        valid[:, place.top : place.top + place.rows, place.left : place.left + place.cols] = True
        out.append({"image": image[0], "label": label[0], "valid": valid, "path": path})
    return out


def read_label(path: Path) -> np.ndarray:
    """A palette/index mask PNG as its label indices (0 none, 1 GGO, 2 consolidation)."""
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.uint8).copy()

