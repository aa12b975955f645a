"""Rule-based lung segmentation from Hounsfield units (no lung masks exist to train a network on).

The steps, on a grid downsampled to about 256 px in-plane (float16 HU) so that a 600-slice CT
stays within the node's memory budget (3D labels of the full grid alone would take 600 MB;
component sizes are counted in chunks, and slice-wise steps run slice by slice):
body (HU > -500, largest component per slice, holes filled) -> air inside the body (HU < -320)
-> airway removal (central, round, air-filled 2D blobs grown in 3D through HU < -950) ->
the large 3D components -> left/right split (two components, or a watershed from eroded seeds
when the lungs touch at the anterior junction) -> per-slice closing and hole filling, so that
vessels and dense consolidation surrounded by lung stay lung.
Label 1 is the patient's right lung, which with standard axial orientation is on image left.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.segmentation import watershed

RIGHT_LUNG, LEFT_LUNG = 1, 2
BODY_HU = -500.0
PADDING_HU = -1100.0  # below any real tissue or air: pixels outside the reconstruction circle
PADDING_SHARE = 0.3  # air whose rim is more than this share padding is outside the patient
LUNG_HU = -320.0
AIRWAY_HU = -950.0
MIN_LUNG_ML = 20.0  # smaller components are bowel gas, table, noise or airway fragments
MAX_AIRWAY_ML = 100.0  # trachea + main bronchi are ~30-60 mL; more means a leak into the lung
CLOSING_MM = 6.0  # closes the notches that peripheral consolidation cuts into the threshold mask


def _downsample(hu: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean in-plane downsampling to float16 (1 HU precision is plenty for thresholds)."""
    s, r, c = hu.shape
    r2, c2 = r // factor, c // factor
    out = np.empty((s, r2, c2), np.float16)
    for i in range(s):
        sl = hu[i, : r2 * factor, : c2 * factor]
        out[i] = sl.reshape(r2, factor, c2, factor).mean(axis=(1, 3), dtype=np.float32)
    return out


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of labels 1..n, counted a few slices at a time (bincount copies to int64)."""
    counts = np.zeros(n + 1, np.int64)
    for start in range(0, labels.shape[0], 16):
        counts += np.bincount(labels[start : start + 16].ravel(), minlength=n + 1)
    return counts[1:]


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    return labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)


def _body(hu: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """The patient with the air spaces inside it, without the table or the air around it.

    A reconstruction circle smaller than the body cuts the chest wall, so a lung can touch the
    padding outside the circle; plain hole filling would then call that lung "outside". Instead
    the outside is the air that touches the image border or, in a slice with padding, the air
    whose rim lies largely on the padding (a cut lung's rim is mostly chest wall).
    """
    inside = np.empty(hu.shape, bool)
    for i in range(hu.shape[0]):
        tissue = (hu[i] > BODY_HU) & ~padding[i]  # opening cuts thin bridges to the table
        body = _largest(ndi.binary_opening(tissue, structure=np.ones((3, 3), bool)))
        air, n_air = ndi.label(~body & ~padding[i])
        if padding[i].any():  # the circle may touch the image border where a lung is cut
            index = np.arange(1, n_air + 1)
            by_padding = ndi.sum_labels(ndi.binary_dilation(padding[i]), air, index)
            by_body = ndi.sum_labels(ndi.binary_dilation(body), air, index)
            share = by_padding / np.maximum(by_padding + by_body, 1)
            outside = index[share > PADDING_SHARE].tolist()
        else:
            border = np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]])
            outside = np.unique(border[border > 0]).tolist()
        inside[i] = (~np.isin(air, outside) & (air > 0)) | body
    return inside


def _airways(hu: np.ndarray, air: np.ndarray, pixel_area: float, voxel_ml: float) -> np.ndarray:
    """Trachea and main bronchi: small, round, central, air-dense 2D blobs, grown in 3D."""
    seeds = np.zeros_like(air)
    cols = hu.shape[2]
    for i in range(hu.shape[0]):
        labels, _ = ndi.label(air[i])
        for region in regionprops(labels, intensity_image=hu[i]):
            area_cm2 = region.area * pixel_area / 100.0
            central = abs(region.centroid[1] - cols / 2) < 0.12 * cols
            if (
                0.5 <= area_cm2 <= 8.0
                and central
                and region.solidity > 0.85
                and region.intensity_mean < -900
            ):
                seeds[i][labels == region.label] = True
    if not seeds.any():
        return seeds
    grown, n = ndi.label((hu < AIRWAY_HU) & air)
    touched = np.zeros(n + 1, bool)
    touched[grown[seeds]] = True
    touched[0] = False
    airway = touched[grown] | seeds
    del grown
    if airway.sum() * voxel_ml > MAX_AIRWAY_ML:  # grew into emphysematous lung: keep the seeds
        airway = seeds
    return ndi.binary_dilation(airway, iterations=1)


def _two_seeds(lungs: np.ndarray, max_erosions: int = 12) -> np.ndarray | None:
    """uint8 markers 1 and 2: the two largest components, or erode in-plane until they part."""
    eroded = lungs
    for _ in range(max_erosions + 1):
        labels, n = ndi.label(eroded)
        if n >= 2:
            sizes = _component_sizes(labels, n)
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] > 0.15 * sizes[order[0]]:
                lut = np.zeros(n + 1, np.uint8)
                lut[order[0] + 1], lut[order[1] + 1] = 1, 2
                return lut[labels]
        del labels
        eroded = ndi.binary_erosion(eroded, structure=np.ones((1, 3, 3), bool))
    return None


def _split(lungs: np.ndarray) -> np.ndarray:
    """uint8: right lung (image left) 1, left lung 2; what no seed reaches goes to the nearer side.

    The seeds come from in-plane erosion, so flooding them back (watershed) runs slice by slice.
    """
    markers = _two_seeds(lungs)
    side = np.zeros(lungs.shape, np.uint8)
    if markers is None:
        # one lung (pneumonectomy, or a block through one side only): split on the image midline
        mid = lungs.shape[2] // 2
        side[:, :, :mid][lungs[:, :, :mid]] = RIGHT_LUNG
        side[:, :, mid:][lungs[:, :, mid:]] = LEFT_LUNG
        return side
    cols = [np.nonzero(markers == value)[2].mean() for value in (1, 2)]
    lut = np.array([0, RIGHT_LUNG, LEFT_LUNG] if cols[0] <= cols[1] else [0, LEFT_LUNG, RIGHT_LUNG],
                   np.uint8)
    for i in range(lungs.shape[0]):
        if markers[i].any():
            flat = np.zeros(lungs.shape[1:], np.uint8)
            side[i] = lut[watershed(flat, markers=markers[i], mask=lungs[i])]
    del markers
    pieces, n = ndi.label(lungs & (side == 0))
    if n:
        right_col = np.nonzero(side == RIGHT_LUNG)[2].mean()
        left_col = np.nonzero(side == LEFT_LUNG)[2].mean()
        centres = ndi.center_of_mass(lungs, pieces, index=np.arange(1, n + 1))
        lut = np.zeros(n + 1, np.uint8)
        for piece, centre in enumerate(centres, start=1):
            nearer_right = abs(centre[2] - right_col) <= abs(centre[2] - left_col)
            lut[piece] = RIGHT_LUNG if nearer_right else LEFT_LUNG
        side |= lut[pieces]
    return side


def _close_and_fill(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """2D closing then hole filling: consolidation inside or at the edge of a lung stays lung."""
    if not mask.any():
        return mask
    disk = np.hypot(*np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]) <= radius_px
    pad = radius_px + 1
    closed = ndi.binary_closing(np.pad(mask, pad), structure=disk)[pad:-pad, pad:-pad]
    return ndi.binary_fill_holes(closed | mask)


def segment_lungs(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """uint8 labels (slices, rows, cols): 0 background, 1 right lung, 2 left lung.

    `hu` (int16 or float32) is sorted along the slice normal; `spacing` is (slice, row, col) in mm.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {hu.shape}")
    factor = max(1, int(round(max(hu.shape[1:]) / 256)))
    small = _downsample(hu, factor)
    padding = small < PADDING_HU
    np.clip(small, -1024, 3071, out=small)  # padding now reads as air
    pixel_area = spacing[1] * spacing[2] * factor * factor
    voxel_ml = pixel_area * max(spacing[0], 0.5) / 1000.0

    body = _body(small, padding)
    del padding
    air = (small < LUNG_HU) & body
    air &= ~_airways(small, air, pixel_area, voxel_ml)
    del small
    labels, n = ndi.label(air)
    if n == 0:
        return np.zeros(hu.shape, np.uint8)
    sizes = _component_sizes(labels, n) * voxel_ml
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= min(MIN_LUNG_ML, 0.1 * sizes.max())
    lungs = keep[labels]
    del labels, air

    sides = _split(lungs)
    del lungs
    radius = max(1, int(round(CLOSING_MM / (spacing[1] * factor))))
    out = np.zeros(hu.shape, np.uint8)
    rows, cols = sides.shape[1] * factor, sides.shape[2] * factor
    for i in range(sides.shape[0]):
        labelled = np.zeros(sides.shape[1:], np.uint8)
        for value in (RIGHT_LUNG, LEFT_LUNG):
            filled = _close_and_fill(sides[i] == value, radius) & body[i] & (labelled == 0)
            labelled[filled] = value
        out[i, :rows, :cols] = labelled.repeat(factor, axis=0).repeat(factor, axis=1)
    return out


def lung_volumes_ml(labels: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Right, left and total lung volume in mL, for plausibility checks and measurements."""
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    right = float((labels == RIGHT_LUNG).sum() * voxel_ml)
    left = float((labels == LEFT_LUNG).sum() * voxel_ml)
    return {"right_ml": right, "left_ml": left, "total_ml": right + left}
