"""Lung masks on frontal chest X-rays: the `cxr-lung` model (a small MONAI UNet).

Used by the CXR classifier to crop to the lungs, and by the CXR pipeline to confine heatmaps to
them. Training (training/cxr_lungs.py) calls the same `build_network` and `input_transform`, so
the node and the trainer cannot drift apart on architecture or intensity handling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles
from scipy import ndimage
from skimage import measure

from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import (
    CxrLungInput,
    CxrLungIntensity,
    CxrLungSpec,
    UNetSpec,
    load_spec,
)

# The grid the small components are sought on: big enough to keep edges of a 320 px film exact,
# small enough that a 3000 px CR stays well under 0.1 s; the mask is then scaled up nearest.
_POSTPROCESS_MAX_SIDE = 512


def build_network(network: UNetSpec) -> UNet:
    """The student UNet from the spec's `network` block (channels, strides, num_res_units)."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=network.channels,
        strides=network.strides,
        num_res_units=network.num_res_units,
    )


def input_transform(spec_input: CxrLungInput, spec_intensity: CxrLungIntensity) -> Compose:
    """(1, rows, cols) float image in [0, 1] -> (1, size, size) network input.

    The film is squashed to a square (as the teacher saw it) and rescaled between two
    percentiles, because sources window their films very differently (ICU films are grey).
    """
    return Compose(
        [
            Resize(spatial_size=spec_input.size, mode="area"),
            ScaleIntensityRangePercentiles(
                lower=spec_intensity.lower_percentile,
                upper=spec_intensity.upper_percentile,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            ),
        ]
    )


def keep_lungs(mask: np.ndarray, min_second_fraction: float) -> np.ndarray:
    """Largest two components with holes filled; the second only if it is lung-sized.

    A second blob smaller than `min_second_fraction` of the largest is noise (a marker, a
    shoulder), not a lung; with merged lungs the one component covers both.
    """
    labels = measure.label(mask, connectivity=1)
    if labels.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    keep = [order[0] + 1]
    if len(order) == 2 and sizes[order[1]] >= min_second_fraction * sizes[order[0]]:
        keep.append(order[1] + 1)
    return ndimage.binary_fill_holes(np.isin(labels, keep))


def lung_bbox(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1), end-exclusive, of the mask grown by `margin` of the image size.

    An empty mask gives the whole image, so a crop never throws a film away.
    """
    rows, cols = mask.shape
    if not mask.any():
        return 0, rows, 0, cols
    r_idx = np.flatnonzero(mask.any(axis=1))
    c_idx = np.flatnonzero(mask.any(axis=0))
    dr, dc = round(margin * rows), round(margin * cols)
    return (
        max(0, int(r_idx[0]) - dr),
        min(rows, int(r_idx[-1]) + 1 + dr),
        max(0, int(c_idx[0]) - dc),
        min(cols, int(c_idx[-1]) + 1 + dc),
    )


class CxrLungSegmenter:
    """Loaded `cxr-lung` model: image in [0, 1] (bones white) -> boolean lung mask."""

    def __init__(self, spec: CxrLungSpec, network: UNet, device: str | torch.device = "cpu"
                 ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.network = network.eval().to(self.device)
        self.transform = input_transform(spec.input, spec.intensity)

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device = "cpu") -> CxrLungSegmenter:
        """The model folder's network on `device` ("auto": CUDA when available)."""
        spec = load_spec(Path(model_dir), CxrLungSpec)  # refuses weights whose sha256 differs
        network = build_network(spec.network)
        state = torch.load(Path(model_dir) / spec.weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return cls(spec, network, device)

    def probability(self, image: np.ndarray) -> np.ndarray:
        """Lung probability on the network's grid, (size, size)."""
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
        x = self.transform(torch.as_tensor(image, dtype=torch.float32)[None])
        with torch.no_grad():
            out = self.network(torch.as_tensor(x)[None].to(self.device))
        return torch.sigmoid(out.float()).cpu()[0, 0].numpy()

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Boolean mask of the image's shape: largest two components, holes filled."""
        prob = torch.from_numpy(self.probability(image))[None, None]
        scale = min(1.0, _POSTPROCESS_MAX_SIDE / max(image.shape))
        grid = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        prob = F.interpolate(prob, size=grid, mode="bilinear")[0, 0].numpy()
        thresholds = self.spec.thresholds
        mask = keep_lungs(prob >= thresholds.lung, thresholds.min_second_lung_fraction)
        if grid == image.shape:
            return mask
        up = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=image.shape)
        return up[0, 0].numpy() > 0.5
