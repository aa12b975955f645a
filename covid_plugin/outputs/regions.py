"""Masks -> what the SR, the GSPS and the SC draw: the key image and closed outlines on it.

The key image of a CT is the slice with the largest lesion area (else the largest lung area);
it is named the way viewers count, by the source image's InstanceNumber and its z position,
never by an index from the first slice. Outlines are closed polylines in DICOM 2D image
coordinates (column, row; the top left pixel's centre at 0.5, 0.5), simplified to about a
pixel, which both SR SCOORD and presentation state graphics take as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from covid_plugin.findings import LEFT_LUNG, RIGHT_LUNG, Code, Findings, Mask
from covid_plugin.outputs.codes import ANATOMY_CATEGORIES
from covid_plugin.volume import LoadedSeries

OUTLINE_TOLERANCE_PX = 0.5  # polygon simplification; keeps SR and GSPS objects small
MIN_OUTLINE_POINTS = 4  # a closed outline with three corners at least
LUNG_OUTLINES = 2  # a lung mask of a radiograph: the two largest regions, one per side
# How a frontal chest radiograph is conventionally displayed (the patient's left on the
# image's right), for headers without PatientOrientation.
DEFAULT_RADIOGRAPH_ORIENTATION = ("L", "F")


@dataclass(frozen=True)
class Outline:
    """The closed outline of one connected region of a mask on one frame; `side` names the
    lung it outlines when the mask holds both lungs (a radiograph's lung mask)."""

    points: np.ndarray  # (n, 2) float32, column then row, first point == last point
    side: Code | None = None


def is_anatomy(mask: Mask) -> bool:
    return mask.category.value in ANATOMY_CATEGORIES


def key_frame(masks: list[Mask], n_frames: int) -> int:
    """Frame with the largest lesion area; else the largest anatomy area; else the middle one."""
    for wanted_anatomy in (False, True):
        chosen = [m for m in masks if is_anatomy(m) == wanted_anatomy]
        if chosen:
            area = sum(m.array.reshape(n_frames, -1).sum(axis=1) for m in chosen)
            if area.max() > 0:
                return int(np.argmax(area))
    return n_frames // 2


def key_image_of(findings: Findings, series: LoadedSeries) -> int:
    """The frame the SR outlines and the SC show: `key_frame` for a CT, the film otherwise."""
    return key_frame(findings.masks, series.array.shape[0]) if series.modality == "CT" else 0


def key_image_label(series: LoadedSeries, frame: int) -> str:
    """'image 27, z = -331.7 mm': the key image as a viewer's overlay names it."""
    if series.frame_numbers is not None:
        label = f"frame {series.frame_numbers[frame]}"
    else:
        number = series.datasets[frame].get("InstanceNumber")
        label = f"image {number}" if number not in (None, "") else f"image {frame + 1}"
    if series.positions is not None:
        label += f", z = {series.positions[frame][2]:.1f} mm"
    return label


def outlines(mask2d: np.ndarray, largest: int | None = None) -> list[Outline]:
    """Outlines of the connected regions of a 2D mask, largest first (`largest` of them)."""
    labels, n = ndimage.label(mask2d)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:largest]
    found = []
    for index in order:
        region = np.pad(labels == index + 1, 1)
        contour = max(find_contours(region.astype(np.float32), 0.5), key=len)
        contour = approximate_polygon(contour, OUTLINE_TOLERANCE_PX)
        if len(contour) < MIN_OUTLINE_POINTS:
            continue
        points = contour[:, ::-1] - 1 + 0.5  # (row, col) of the padded mask -> (col, row)
        points[-1] = points[0]
        found.append(Outline(points.astype(np.float32)))
    return found


def mask_outlines(mask: Mask, series: LoadedSeries, key: int) -> list[tuple[int, Outline]]:
    """Where a mask is outlined: (frame, outline) pairs, empty for an empty mask. Found once
    per mask by write_all and drawn by both the SR and the presentation state.

    A radiograph's lung mask holds both lungs: its two largest regions. On a CT each mask is
    outlined once, by its largest region on the key slice, or on its own largest slice when
    it is absent from the key slice (a consolidation elsewhere, say).
    """
    if series.modality != "CT":
        if not is_anatomy(mask):
            return [(0, o) for o in outlines(mask.array[0], 1)]
        return [(0, o) for o in sided(outlines(mask.array[0], LUNG_OUTLINES), series)]
    frame = key
    if not mask.array[key].any():
        areas = mask.array.reshape(mask.array.shape[0], -1).sum(axis=1)
        if not areas.any():
            return []
        frame = int(np.argmax(areas))
    return [(frame, o) for o in outlines(mask.array[frame], 1)]


def radiograph_orientation(series: LoadedSeries) -> tuple[str, str]:
    """PatientOrientation of a radiograph (row direction, column direction), else the
    conventional frontal display."""
    value = series.datasets[0].get("PatientOrientation")
    if value and len(value) == 2:
        return str(value[0]), str(value[1])
    return DEFAULT_RADIOGRAPH_ORIENTATION


def sided(found: list[Outline], series: LoadedSeries) -> list[Outline]:
    """A radiograph's two lung outlines named right and left lung, by which side of the image
    each lies on and where the patient's left is (PatientOrientation); one outline alone, or
    a film whose rows do not run left-right, is left unnamed."""
    along_row = radiograph_orientation(series)[0]
    if len(found) != LUNG_OUTLINES or along_row[:1] not in ("L", "R"):
        return found
    by_column = sorted(found, key=lambda o: float(o.points[:, 0].mean()))
    # rows running to the patient's left: the image's left-hand lung is the right lung
    first, second = (
        (RIGHT_LUNG, LEFT_LUNG) if along_row.startswith("L") else (LEFT_LUNG, RIGHT_LUNG)
    )
    names = {id(by_column[0]): first, id(by_column[1]): second}
    return [Outline(o.points, names[id(o)]) for o in found]
