"""The teacher's cached masks as the student's targets: cleaned, judged, on the input grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import measure
from tqdm import tqdm

from covid_plugin.ml.cxr_lungs import input_transform, keep_lungs
from training.cxr_lungs.data import Item, read_grey
from training.cxr_lungs.model import INPUT, INTENSITY, THRESHOLDS
from training.cxr_lungs.teacher import mask_path

PLAUSIBLE_FRACTION = (0.15, 0.65)  # of the film, for a teacher mask to be taught


def read_teacher_mask(item: Item) -> np.ndarray:
    return np.asarray(Image.open(mask_path(item)), dtype=np.float32) / 255.0 >= THRESHOLDS.lung


def clean_teacher_mask(item: Item) -> np.ndarray:
    """The teacher's mask without its specks (markers, bowel gas), as the node cleans its own."""
    return keep_lungs(read_teacher_mask(item), THRESHOLDS.min_second_lung_fraction)


def plausible(mask: np.ndarray) -> bool:
    """Two lungs of a believable size; the teacher's failures (lungs merged over the mediastinum,
    a white-out film segmented as one lung, blown-out ICU films) are not taught to the student."""
    lo, hi = PLAUSIBLE_FRACTION
    return measure.label(mask, connectivity=1).max() == 2 and lo <= mask.mean() <= hi


def student_tensors(data: Path, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs (N, 1, S, S) and teacher masks on the same grid (N, 1, S, S)."""
    transform = input_transform(INPUT, INTENSITY)
    size = tuple(INPUT["size"])
    images, masks = [], []
    for item in tqdm(items, desc="loading", mininterval=10):
        image = torch.from_numpy(read_grey(data / item.path))[None]
        images.append(torch.as_tensor(transform(image)))
        mask = torch.from_numpy(clean_teacher_mask(item)).float()[None, None]
        masks.append(F.interpolate(mask, size=size, mode="area")[0] >= 0.5)
    return torch.stack(images).float(), torch.stack(masks).float()
