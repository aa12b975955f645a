"""CT lesion segmentation (0 none, 1 ground-glass opacity, 2 consolidation) on axial slices.

The network was trained on 8-bit slices cropped to the thorax, longer side 256 px. Real CT
reaches that domain through the same steps, in this order, for training and for the node:
crop to the thorax (lung bounding box plus a margin), apply the HU window (ct_window), resize
the longer side to `input.size` and pad the shorter one (`to_network_input`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, window_bounds
from covid_plugin.ml.spec import ModelSpec, load_spec

NONE, GGO, CONSOLIDATION = 0, 1, 2
TYPICAL_SPACING = (2.0, 0.7, 0.7)


def build_network(channels: tuple[int, ...] = (16, 32, 64, 128, 256)) -> UNet:
    """The 2D MONAI UNet both training and the node instantiate (3 classes, one input channel)."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        dropout=0.1,
    )


@dataclass(frozen=True)
class Placement:
    """Where a resized slice sits inside the padded square: (rows, cols) and the top-left pad."""

    rows: int
    cols: int
    top: int
    left: int


def to_network_input(
    unit: torch.Tensor, size: int, mode: str = "bilinear"
) -> tuple[torch.Tensor, Placement]:
    """(B, 1, H, W) in [0, 1] -> (B, 1, size, size): longer side resized to `size`, then padded.

    Padding is 0 (air), which is what surrounds the thorax in a real CT. A slice whose longer
    side already is `size` (95 of the 98 training slices) is not resampled at all. Label maps
    go through the same geometry with mode="nearest".
    """
    height, width = unit.shape[-2:]
    scale = size / max(height, width)
    rows, cols = min(size, round(height * scale)), min(size, round(width * scale))
    if (rows, cols) != (height, width):
        unit = F.interpolate(unit, size=(rows, cols), mode=mode,
                             antialias=mode == "bilinear" and scale < 1)
    top, left = (size - rows) // 2, (size - cols) // 2
    padded = F.pad(unit, (left, size - cols - left, top, size - rows - top), value=0.0)
    if mode == "bilinear":  # antialiasing can overshoot [0, 1] by a hair; labels must not clamp
        padded = padded.clamp_(0.0, 1.0)
    return padded, Placement(rows, cols, top, left)


def thorax_box(lung: np.ndarray, margin: float) -> tuple[slice, slice]:
    """The in-plane box around every lung voxel (`lung` nonzero), widened by `margin` of its size
    on each side."""
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    if rows.size == 0:
        return slice(0, lung.shape[1]), slice(0, lung.shape[2])
    pad_r = int(round(margin * (rows[-1] - rows[0] + 1)))
    pad_c = int(round(margin * (cols[-1] - cols[0] + 1)))
    return (
        slice(max(0, rows[0] - pad_r), min(lung.shape[1], rows[-1] + 1 + pad_r)),
        slice(max(0, cols[0] - pad_c), min(lung.shape[2], cols[-1] + 1 + pad_c)),
    )


def hu_to_network_input(
    hu: np.ndarray, box: tuple[slice, slice], spec: ModelSpec
) -> tuple[torch.Tensor, Placement]:
    """The node's path from HU slices (B, rows, cols) to the tensor the network sees."""
    lower, upper = window_bounds(spec.intensity)
    unit = hu_to_unit(hu[:, box[0], box[1]], lower, upper)
    return to_network_input(torch.from_numpy(unit)[:, None], int(spec.input["size"]))


class LesionSegmenter:
    """Loads the lesion UNet from its model folder and labels every slice of a HU volume."""

    def __init__(self, spec: ModelSpec, network: torch.nn.Module, batch_size: int = 4):
        self.spec = spec
        self.network = network.eval()
        self.batch_size = batch_size

    @classmethod
    def load(cls, model_dir: Path) -> LesionSegmenter:
        spec = load_spec(model_dir)  # refuses weights whose sha256 differs from spec.json
        network = build_network(tuple(spec.input["channels"]))
        state = torch.load(model_dir / spec.weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return cls(spec, network)

    @torch.inference_mode()
    def predict(self, hu: np.ndarray, lung: np.ndarray | None = None) -> np.ndarray:
        """uint8 (slices, rows, cols): 0 none, 1 GGO, 2 consolidation, inside the lungs only.

        Without `lung`, the lungs are segmented from HU first (they also set the crop).
        """
        if lung is None:  # spacing only sets the smallest lung piece kept: assume a typical one
            lung = segment_lungs(hu, TYPICAL_SPACING)
        # any() reads labels as lung/not lung: no full-volume boolean copy is needed
        box = thorax_box(lung, float(self.spec.input.get("crop_margin", 0.08)))
        out = np.zeros(hu.shape, np.uint8)
        crop_rows, crop_cols = box[0].stop - box[0].start, box[1].stop - box[1].start
        for start in range(0, hu.shape[0], self.batch_size):
            stop = min(start + self.batch_size, hu.shape[0])
            if not lung[start:stop].any():
                continue
            x, place = hu_to_network_input(hu[start:stop], box, self.spec)
            logits = self.network(x)[
                :, :, place.top : place.top + place.rows, place.left : place.left + place.cols
            ]
            logits = F.interpolate(logits, size=(crop_rows, crop_cols), mode="bilinear")
            labels = logits.argmax(dim=1).to(torch.uint8).numpy()
            out[start:stop, box[0], box[1]] = labels * (lung[start:stop, box[0], box[1]] > 0)
        return out

