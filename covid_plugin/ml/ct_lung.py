"""Rule-based lung segmentation from Hounsfield units (no lung masks exist to train a network on).

Right and left are the patient's: the volume is first turned (SimpleITK DICOMOrient, axes only
permuted and flipped, no resampling) from its stored orientation (ImageOrientationPatient and
the slice normal) into LPS, where columns run from the patient's right to left, rows from
anterior to posterior and slices from inferior to superior. Every step below works in that
frame, and the labels are turned back into the source slice grid at the end, so mirrored
storage, prone or feet-first series get the same lungs as a standard supine series.

The steps, on a grid downsampled to about 256 px in-plane (int16 HU) so that a 600-slice CT
stays within the node's memory budget (3D labels of the full grid alone would take 600 MB;
component sizes are counted in chunks, and slice-wise steps run slice by slice):
body (HU > -500, largest component per slice, holes filled) -> air inside the body (HU < -320)
-> airway removal (the 3D components of air-dense lumen, HU < -950, that lie on the midline
between the lungs: trachea and main bronchi, widened over their walls) -> the large 3D
components -> left/right split (two components, or a watershed from eroded seeds when the
lungs touch at the anterior junction) -> per-slice closing and hole filling, so that vessels
and dense consolidation surrounded by lung stay lung; a hole that only the closing created
(the heart or hilum in the bay of a lung) is filled only when it is small.
Label 1 is the patient's right lung.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.segmentation import watershed

RIGHT_LUNG, LEFT_LUNG = 1, 2
BODY_HU = -500.0
PADDING_HU = -1100.0  # below any real tissue or air: pixels outside the reconstruction circle
PADDING_SHARE = 0.3  # air whose rim is more than this share padding is outside the patient
LUNG_HU = -320.0
AIRWAY_HU = -950.0
MIN_LUNG_ML = 20.0  # smaller components are bowel gas, table, noise or airway fragments
MIN_AIRWAY_ML = 0.2  # a lumen piece smaller than this is noise in the parenchyma
MAX_AIRWAY_ML = 100.0  # trachea + main bronchi are ~30-60 mL; more means a leak into the lung
AIRWAY_BAND = 0.15  # airway lumen lies within this share of the air's width from its midline
AIRWAY_WALL_MM = 3.0  # the bronchial wall and its partial-volume rim, removed with the lumen
CLOSING_MM = 6.0  # closes the notches that peripheral consolidation cuts into the threshold mask
MAX_BRIDGED_HOLE_CM2 = 2.0  # larger holes made only by the closing are heart/hilum, not lung
CANONICAL = "LPS"  # columns to the patient's left, rows to posterior, slices to superior


def _downsample(hu: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean in-plane downsampling to int16 HU (1 HU precision is plenty for thresholds)."""
    s, r, c = hu.shape
    r2, c2 = r // factor, c // factor
    out = np.empty((s, r2, c2), np.int16)
    for i in range(s):
        sl = hu[i, : r2 * factor, : c2 * factor]
        mean = sl.reshape(r2, factor, c2, factor).mean(axis=(1, 3), dtype=np.float32)
        out[i] = np.clip(np.rint(mean), -32768, 32767)
    return out


def _direction(orientation: Sequence[float] | None) -> tuple[float, ...]:
    """SimpleITK direction (column, row, slice axes as columns) of a volume sorted along the normal.

    Without an orientation the series is taken as standard axial (columns to the patient's
    left, rows to posterior, slices to superior).
    """
    iop = np.asarray(orientation if orientation is not None else (1, 0, 0, 0, 1, 0), float)
    row_dir, col_dir = iop[:3], iop[3:]
    matrix = np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)])
    return tuple(float(v) for v in matrix.ravel())


def _to_canonical(volume: np.ndarray, spacing: Sequence[float],
                  direction: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array in LPS, its (slice, row, col) spacing): permuted and flipped, never resampled."""
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetDirection(direction)
    image = sitk.DICOMOrient(image, CANONICAL)
    sx, sy, sz = image.GetSpacing()
    return sitk.GetArrayFromImage(image), (sz, sy, sx)


def _from_canonical(labels: np.ndarray, shape: tuple[int, ...],
                    direction: tuple[float, ...]) -> np.ndarray:
    """LPS labels back into the source grid (the inverse permutation and flips)."""
    image = sitk.GetImageFromArray(labels)
    source = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(image, source))
    if back.shape != shape:  # DICOMOrient is a pure permutation: this would be a bug here
        raise AssertionError(f"reoriented labels {back.shape} != source grid {shape}")
    return back


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of labels 1..n, counted a few slices at a time (bincount copies to int64)."""
    counts = np.zeros(n + 1, np.int64)
    for start in range(0, labels.shape[0], 16):
        counts += np.bincount(labels[start : start + 16].ravel(), minlength=n + 1)
    return counts[1:]


def _mean_columns(labels: np.ndarray, n: int) -> np.ndarray:
    """Mean column index of labels 1..n (nan where absent), summed a few slices at a time.

    scipy's center_of_mass and np.nonzero build full-volume float64/int64 arrays (315 MB each
    for a 600-slice CT); this needs a few MB.
    """
    counts = np.zeros(n + 1)
    sums = np.zeros(n + 1)
    columns = np.arange(labels.shape[2], dtype=np.float64)
    for start in range(0, labels.shape[0], 16):
        chunk = labels[start : start + 16].ravel()
        counts += np.bincount(chunk, minlength=n + 1)
        weights = np.broadcast_to(columns, labels[start : start + 16].shape).ravel()
        sums += np.bincount(chunk, weights=weights, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts)[1:]


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


def _airways(hu: np.ndarray, air: np.ndarray, spacing: Sequence[float],
             voxel_ml: float) -> np.ndarray:
    """Trachea and main bronchi in the LPS volume: midline 3D components of air-dense lumen.

    Lumen air (HU < -950) is darker than aerated lung (about -850), so the trachea and main
    bronchi are 3D components of their own that sit between the lungs, where no lung
    parenchyma is. They are widened by the wall thickness so that the partial-volume rim of
    the wall (between -950 and -320 HU) goes with them instead of joining a lung.
    """
    lumen = (hu < AIRWAY_HU) & air
    labels, n = ndi.label(lumen)
    if n == 0:
        return lumen
    cols = np.flatnonzero(air.any(axis=(0, 1)))
    midline, band = (cols[0] + cols[-1]) / 2.0, AIRWAY_BAND * (cols[-1] - cols[0] + 1)
    sizes = _component_sizes(labels, n) * voxel_ml
    centre_cols = _mean_columns(labels, n)
    keep = np.zeros(n + 1, bool)
    keep[1:] = (sizes >= MIN_AIRWAY_ML) & (np.abs(centre_cols - midline) < band)
    airway = keep[labels]
    del labels
    if airway.sum() * voxel_ml > MAX_AIRWAY_ML:  # grew into emphysematous lung: keep the midline
        outside = np.abs(np.arange(hu.shape[2]) - midline) >= band
        airway[:, :, outside] = False
    wall = [max(1, int(round(AIRWAY_WALL_MM / s))) for s in spacing]
    structure = np.ones([2 * w + 1 for w in wall], bool)
    return ndi.binary_dilation(airway, structure=structure) & air


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
    """uint8 (LPS): right lung (lower column index) 1, left lung 2; what no seed reaches goes to
    the nearer side.

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
    cols = _mean_columns(markers, 2)
    lut = np.array([0, RIGHT_LUNG, LEFT_LUNG] if cols[0] <= cols[1] else [0, LEFT_LUNG, RIGHT_LUNG],
                   np.uint8)
    for i in range(lungs.shape[0]):
        if markers[i].any():
            flat = np.zeros(lungs.shape[1:], np.uint8)
            side[i] = lut[watershed(flat, markers=markers[i], mask=lungs[i])]
    del markers
    pieces, n = ndi.label(lungs & (side == 0))
    if n:
        right_col, left_col = _mean_columns(side, 2)[[RIGHT_LUNG - 1, LEFT_LUNG - 1]]
        centres = _mean_columns(pieces, n)
        lut = np.zeros(n + 1, np.uint8)
        for piece, centre in enumerate(centres, start=1):
            nearer_right = abs(centre - right_col) <= abs(centre - left_col)
            lut[piece] = RIGHT_LUNG if nearer_right else LEFT_LUNG
        side |= lut[pieces]
    return side


def _close_and_fill(mask: np.ndarray, radius_px: int,
                    max_bridged_px: int) -> tuple[np.ndarray, np.ndarray]:
    """2D closing, then the holes to fill: (closed mask, holes), so that consolidation inside
    or at the edge of a lung stays lung.

    A hole the lung itself encloses (vessel, consolidation) is a hole. One that only exists
    because the closing bridged the mouth of a bay counts only when it is smaller than
    `max_bridged_px`: a big one is the heart or hilum that the lung wraps around.
    """
    if not mask.any():
        return mask, mask
    disk = np.hypot(*np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]) <= radius_px
    pad = radius_px + 1
    closed = ndi.binary_closing(np.pad(mask, pad), structure=disk)[pad:-pad, pad:-pad] | mask
    holes = ndi.binary_fill_holes(mask) & ~closed
    bridged, n = ndi.label(ndi.binary_fill_holes(closed) & ~closed & ~holes)
    if n:
        small = np.bincount(bridged.ravel(), minlength=n + 1) <= max_bridged_px
        small[0] = False
        holes |= small[bridged]
    return closed, holes


def _holes_open_to_outside(holes: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """The 2D holes that reach the tissue outside the lungs through the slices above or below.

    A hole enclosed by lung in one slice but continuous with the mediastinum in the next is a
    structure the lung wraps around (the cardiac apex and its fat pad, the hilum), not lung.
    The first and last slices count as outside too: what continues past the end of a partial
    series cannot be told from lung.
    """
    components, n = ndi.label(holes | tissue)
    # a lookup table, filled slice by slice: np.isin on the whole volume sorts it with int64
    # indices (about 400 MB at 600 slices)
    touching = np.zeros(n + 1, bool)
    for i in range(components.shape[0]):
        touching[components[i][tissue[i]]] = True
    touching[components[0]] = touching[components[-1]] = True
    touching[0] = False
    return holes & touching[components]


def segment_lungs(hu: np.ndarray, spacing: Sequence[float],
                  orientation: Sequence[float] | None = None) -> np.ndarray:
    """uint8 labels (slices, rows, cols) in the grid of `hu`: 0 background, 1 patient's right
    lung, 2 patient's left lung.

    `hu` (int16 or float32) is sorted along the slice normal (first position first);
    `spacing` is (slice, row, col) in mm; `orientation` is the series' ImageOrientationPatient
    (6 values; None means standard axial, columns running to the patient's left).
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {hu.shape}")
    factor = max(1, int(round(max(hu.shape[1:]) / 256)))
    direction = _direction(orientation)
    source_small = _downsample(hu, factor)
    small_shape = source_small.shape
    small, grid = _to_canonical(source_small, (spacing[0], spacing[1] * factor,
                                               spacing[2] * factor), direction)
    del source_small
    padding = small < PADDING_HU
    np.clip(small, -1024, 3071, out=small)  # padding now reads as air
    pixel_area = grid[1] * grid[2]
    voxel_ml = pixel_area * max(grid[0], 0.5) / 1000.0

    body = _body(small, padding)
    del padding
    air = (small < LUNG_HU) & body
    air &= ~_airways(small, air, grid, voxel_ml)
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
    radius = max(1, int(round(CLOSING_MM / grid[1])))
    max_bridged = int(MAX_BRIDGED_HOLE_CM2 * 100.0 / pixel_area)
    holes = np.zeros(sides.shape, bool)
    for i in range(sides.shape[0]):
        labelled = np.zeros(sides.shape[1:], np.uint8)
        for value in (RIGHT_LUNG, LEFT_LUNG):
            closed, side_holes = _close_and_fill(sides[i] == value, radius, max_bridged)
            free = body[i] & (labelled == 0)
            labelled[(closed | side_holes) & free] = value
            holes[i] |= side_holes & free
        sides[i] = labelled
    sides[_holes_open_to_outside(holes, body & (sides == 0))] = 0
    del body, holes
    small_labels = _from_canonical(sides, small_shape, direction)
    del sides
    out = np.zeros(hu.shape, np.uint8)
    rows, cols = small_shape[1] * factor, small_shape[2] * factor
    for i in range(small_shape[0]):
        out[i, :rows, :cols] = small_labels[i].repeat(factor, axis=0).repeat(factor, axis=1)
    return out


def lung_volumes_ml(labels: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Right, left and total lung volume in mL, for plausibility checks and measurements."""
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    right = float((labels == RIGHT_LUNG).sum() * voxel_ml)
    left = float((labels == LEFT_LUNG).sum() * voxel_ml)
    return {"right_ml": right, "left_ml": left, "total_ml": right + left}
