"""CT lesion segmentation (0 none, 1 ground-glass opacity, 2 consolidation) on axial slices.

The network answers one question per pixel: lesion or not. It was trained on HU thorax crops
of real chests (normal lungs included, training/ct_lesion/) and on the MedSeg 8-bit slices,
which the calibrated HU window maps into the same domain. Real CT reaches it through the same
steps, in this order, for training and for the node: crop to the thorax (lung bounding box plus
a margin), apply the HU window (ct_window), resize the longer side to `input.size` and pad the
shorter one (`to_network_input`). Its decoder upsamples by interpolation, not stride-2
transposed convolutions, so there is no checkerboard to filter out of its output.

Ground glass or consolidation is not the network's opinion but the attenuation bands of
quantitative COVID-19 CT (`attenuation_kind`): inside a lesion, lightly smoothed HU from -700
to -300 is poorly aerated lung (ground glass), from -300 up non-aerated (consolidation), and
below -700 normally aerated lung, which is no lesion at all. A partial-volume rim at -450 HU
can therefore never be "consolidation".

From the network's output to labels, one path for evaluation and the node
(`filter_lesions`): "lesion" where the lesion probability reaches `lesion_probability`, then
3D lesions smaller than `min_lesion_ml` (single vessels cut across, noise) dropped, and with a
`min_mean_probability` also those the network is on average unsure of. Two settings are
applied to the same probabilities: the spec's **measurement** setting (the mask written to the
SEG and measured in the SR) and the COVID call's **decision** setting from
ct-classifier/spec.json (chosen leave-one-patient-out for the call).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from scipy import ndimage as ndi

from covid_plugin.ml.ct_lung import segment_lungs
from covid_plugin.ml.ct_window import hu_to_unit, window_bounds
from covid_plugin.ml.device import resolve_device
from covid_plugin.ml.spec import GGO_BAND_HU, CtLesionSpec, load_spec

NONE, GGO, CONSOLIDATION = 0, 1, 2
LESION_CHANNEL = 1  # the network's classes: 0 background, 1 lesion
TYPICAL_SPACING = (2.0, 0.7, 0.7)
FEATURES = (16, 16, 32, 64, 128, 16)
KIND_SMOOTHING_PX = 1.0  # Gaussian sigma: one noisy pixel does not flip a lesion's kind
# dense structures thinner than this in-plane are vessels (or their cross-sections), not
# consolidation: a peripheral vessel is 1-3 mm across, a consolidation spans centimetres
VESSEL_MAX_MM = 4.0


def build_network(features: tuple[int, ...] = FEATURES) -> BasicUNet:
    """The 2D MONAI BasicUNet both training and the node instantiate: one input channel,
    background/lesion out, bilinear (non-trainable) upsampling in the decoder."""
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=features,
                     dropout=0.1, upsample="nontrainable")


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
    hu: np.ndarray, box: tuple[slice, slice], spec: CtLesionSpec
) -> tuple[torch.Tensor, Placement]:
    """The node's path from HU slices (B, rows, cols) to the tensor the network sees."""
    lower, upper = window_bounds(spec.intensity)
    unit = hu_to_unit(hu[:, box[0], box[1]], lower, upper)
    return to_network_input(torch.from_numpy(unit)[:, None], spec.input.size)


def lesion_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, S) logits -> (B, S, S) probability of lesion."""
    return logits.softmax(dim=1)[:, LESION_CHANNEL]


def attenuation_kind(hu: np.ndarray, pixel_mm: float,
                     band: tuple[float, float] = GGO_BAND_HU) -> np.ndarray:
    """uint8 of `hu` (B, H, W) with `pixel_mm` pixels: NONE where aerated (below the band) or a
    vessel, GGO inside the band, CONSOLIDATION from its upper edge.

    Read on HU smoothed in-plane by `KIND_SMOOTHING_PX`. Vessels are the dense pixels that a
    disk `VESSEL_MAX_MM` across does not fit in (a 2D opening), widened by one pixel for their
    partial-volume rim: without this, every vessel crossing a lesion would be "consolidation"
    and its rim "ground glass".
    """
    smooth = ndi.gaussian_filter(np.asarray(hu, np.float32),
                                 sigma=(0.0, KIND_SMOOTHING_PX, KIND_SMOOTHING_PX))
    kind = np.full(smooth.shape, GGO, np.uint8)
    kind[smooth < band[0]] = NONE
    dense = smooth >= band[1]
    kind[dense] = CONSOLIDATION
    radius = max(1, int(round(VESSEL_MAX_MM / 2.0 / pixel_mm)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2 <= radius**2)[None]
    thin = dense & ~ndi.binary_opening(dense, structure=disk)
    kind[ndi.binary_dilation(thin, structure=ndi.generate_binary_structure(2, 1)[None])] = NONE
    return kind


def drop_small_lesions(lesion: np.ndarray, spacing: tuple[float, float, float],
                       min_ml: float, probability: np.ndarray | None = None,
                       min_mean_probability: float = 0.0) -> None:
    """In place: remove 3D lesion components (26-connected) smaller than `min_ml`, and, with
    `probability`, those whose mean lesion probability is below `min_mean_probability` (faint
    halos around vessels and the hila that only just cross the voxel threshold).

    Labelled as uint16 inside the lesions' bounding box, so a 600-slice CT does not need a
    full int32 label volume (600 MB).
    """
    by_mean = probability is not None and min_mean_probability > 0
    if min_ml <= 0 and not by_mean:
        return
    found = np.nonzero(lesion.any(axis=(1, 2)))[0]
    if found.size == 0:
        return
    rows = np.nonzero(lesion.any(axis=(0, 2)))[0]
    cols = np.nonzero(lesion.any(axis=(0, 1)))[0]
    box = (slice(found[0], found[-1] + 1), slice(rows[0], rows[-1] + 1),
           slice(cols[0], cols[-1] + 1))
    view = lesion[box]
    try:
        components = np.empty(view.shape, np.uint16)
        n = ndi.label(view > 0, structure=np.ones((3, 3, 3), bool), output=components)
    except RuntimeError:  # more than 65535 lesions: fall back to int32 labels
        components, n = ndi.label(view > 0, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    drop = sizes * voxel_ml < min_ml
    if by_mean:  # lesion voxels only: a float64 copy of the whole box would be 8 B a voxel
        inside = components > 0
        sums = np.bincount(components[inside], weights=probability[box][inside], minlength=n + 1)
        drop |= sums / np.maximum(sizes, 1) < min_mean_probability
    drop[0] = False
    view[drop[components]] = NONE


def filter_lesions(probability: np.ndarray, kind: np.ndarray,
                   spacing: tuple[float, float, float], lesion_probability: float,
                   min_ml: float = 0.0, min_mean_probability: float = 0.0,
                   in_place: bool = False) -> np.ndarray:
    """Labels from a lesion-probability volume and its GGO/consolidation kind at one setting:
    voxels at or above `lesion_probability`, then `drop_small_lesions`. `in_place` writes them
    into `kind` (the node's last use of it: one label volume less in memory)."""
    lesion = kind if in_place else np.zeros(kind.shape, np.uint8)
    for i in range(kind.shape[0]):  # slice by slice: no full-volume boolean temporary
        if in_place:
            lesion[i][probability[i] < lesion_probability] = NONE
        else:
            np.copyto(lesion[i], kind[i], where=probability[i] >= lesion_probability)
    drop_small_lesions(lesion, spacing, min_ml, probability, min_mean_probability)
    return lesion


@dataclass(frozen=True)
class LesionProbabilities:
    """The network's output over the thorax `box` of a volume of `shape`, in one float16
    volume: its magnitude is the lesion probability (0 outside the lungs), its sign bit says
    consolidation is likelier than GGO (exact for float16, -0.0 included). `lung` is the lung
    labels over the same box. A separate kind volume would be 133 MB more at 600 slices while
    the HU volume is still in memory; `split` makes it once the HU volume is gone.
    """

    signed: np.ndarray
    lung: np.ndarray
    box: tuple[slice, slice]
    shape: tuple[int, ...]

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(lesion probability, kind uint8 1 GGO / 2 consolidation, 0 outside the lungs) over
        the box; the probability is `signed` made non-negative in place (consumed)."""
        kind = np.empty(self.signed.shape, np.uint8)
        for i in range(kind.shape[0]):  # slice by slice: no full-volume temporaries
            np.add(np.signbit(self.signed[i]), GGO, out=kind[i], dtype=np.uint8)
            kind[i] *= self.lung[i] > 0
        return np.abs(self.signed, out=self.signed), kind

    def full(self, boxed: np.ndarray) -> np.ndarray:
        """`boxed` (slices, box rows, box cols) placed into a zero volume of `shape`.

        Only slices that hold a nonzero voxel are written: the pages of np.zeros that are
        never written take no memory, so a lesion mask costs what its lesion slices need.
        """
        volume = np.zeros(self.shape, boxed.dtype)
        for i in np.flatnonzero(boxed.any(axis=(1, 2))):
            volume[i, self.box[0], self.box[1]] = boxed[i]
        return volume


class LesionSegmenter:
    """Loads the lesion UNet from its model folder and labels every slice of a HU volume."""

    def __init__(self, spec: CtLesionSpec, network: torch.nn.Module, batch_size: int = 4,
                 device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = resolve_device(device)  # the one rule, as the CXR models
        self.network = network.eval().to(self.device)
        self.batch_size = batch_size
        # the measurement setting: the mask the node writes and measures (SEG, SR volumes)
        self.threshold = spec.thresholds.lesion_probability
        self.min_lesion_ml = spec.thresholds.min_lesion_ml
        self.min_mean_probability = spec.thresholds.min_mean_probability
        # the attenuation bands that type a lesion voxel (spec output.ggo_band_hu)
        self.band = spec.output.ggo_band_hu

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu", batch_size: int = 4) -> LesionSegmenter:
        spec = load_spec(model_dir, CtLesionSpec)  # refuses weights whose sha256 differs
        network = build_network(spec.input.features)
        state = torch.load(model_dir / spec.weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return cls(spec, network, batch_size, device)

    @torch.inference_mode()
    def infer(self, hu: np.ndarray, lung: np.ndarray,
              spacing: tuple[float, float, float] = TYPICAL_SPACING) -> LesionProbabilities:
        """One network pass over every slice that holds lung, kept over the thorax box only.

        Outside that box the output is 0 (a full 600-slice float16 volume would be 315 MB);
        the node frees the HU volume after this, before `masks` builds the label volumes.
        """
        box = thorax_box(lung, self.spec.input.crop_margin)
        shape = (hu.shape[0], box[0].stop - box[0].start, box[1].stop - box[1].start)
        signed = np.zeros(shape, np.float16)
        for index, lesion, inside in self._batches(hu, lung, box):
            kind = attenuation_kind(hu[index, box[0], box[1]], min(spacing[1:]), self.band)
            probability = lesion.half().numpy() * (inside & (kind != NONE))
            signed[index] = np.negative(probability, out=probability,
                                        where=kind == CONSOLIDATION)
        return LesionProbabilities(signed, lung[:, box[0], box[1]], box, hu.shape)

    def predict_probabilities(self, hu: np.ndarray, lung: np.ndarray,
                              spacing: tuple[float, float, float] = TYPICAL_SPACING
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(lesion probability float16, kind uint8 1 GGO / 2 consolidation) over the whole
        volume, 0 outside the lungs: what evaluation filters with `filter_lesions`, as the
        node's `masks` does over the thorax box."""
        found = self.infer(hu, lung, spacing)
        probability, kind = found.split()
        return found.full(probability), found.full(kind)

    def masks(self, found: LesionProbabilities, spacing: tuple[float, float, float],
              decision: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """(measurement labels, decision labels or None) over the whole volume, filtered from
        `found` by `filter_lesions` inside the thorax box (`found` is consumed).

        Lesions are 3D components of voxels inside the box and nothing is found outside it,
        so the labels are those that filtering the whole volume gives.
        """
        probability, kind = found.split()
        decided = None if decision is None else found.full(filter_lesions(
            probability, kind, spacing, float(decision[0]), float(decision[1])))
        measured = found.full(filter_lesions(
            probability, kind, spacing, self.threshold, self.min_lesion_ml,
            self.min_mean_probability, in_place=True))
        return measured, decided

    @torch.inference_mode()
    def predict(self, hu: np.ndarray, lung: np.ndarray | None = None,
                spacing: tuple[float, float, float] | None = None) -> np.ndarray:
        """uint8 (slices, rows, cols): 0 none, 1 GGO, 2 consolidation, inside the lungs only,
        at the spec's measurement setting.

        Without `lung`, the lungs are segmented from HU first (they also set the crop);
        without `spacing` a typical chest CT spacing sizes the smallest lesion kept.
        """
        return self.predict_with_decision(hu, lung, spacing)[0]

    @torch.inference_mode()
    def predict_with_decision(
        self, hu: np.ndarray, lung: np.ndarray | None = None,
        spacing: tuple[float, float, float] | None = None,
        decision: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(measurement labels, decision labels or None) from one pass of the network.

        The measurement mask (spec thresholds of ct-lesion) is what a radiologist reads and
        what the volumes are measured on; `decision` = (lesion probability, smallest lesion mL)
        of ct-classifier builds the mask its burden features are computed on. Both come from
        the same probabilities through `filter_lesions`, the path evaluation uses.
        """
        spacing = spacing or TYPICAL_SPACING
        if lung is None:  # spacing only sets the smallest lung piece kept: assume a typical one
            lung = segment_lungs(hu, spacing)
        return self.masks(self.infer(hu, lung, spacing), spacing, decision)

    def _batches(self, hu: np.ndarray, lung: np.ndarray, box: tuple[slice, slice]):
        """(slices of the thorax-box volumes, CPU lesion probability (B, box rows, box cols),
        lung mask) for each batch of slices that holds lung."""
        crop_rows, crop_cols = box[0].stop - box[0].start, box[1].stop - box[1].start
        for start in range(0, hu.shape[0], self.batch_size):
            stop = min(start + self.batch_size, hu.shape[0])
            if not lung[start:stop].any():
                continue
            x, place = hu_to_network_input(hu[start:stop], box, self.spec)
            lesion = lesion_probability(self.network(x.to(self.device)))[
                :, None, place.top : place.top + place.rows, place.left : place.left + place.cols
            ]
            lesion = F.interpolate(lesion, size=(crop_rows, crop_cols), mode="bilinear")
            yield slice(start, stop), lesion[:, 0].cpu(), lung[start:stop, box[0], box[1]] > 0
