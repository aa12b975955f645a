"""A received series -> one array with geometry, ready for a pipeline.

The loader is the one place where DICOM pixel semantics are resolved (rescale to Hounsfield
units, slice order along the normal, VOI and MONOCHROME1 for radiographs), so that pipelines
only ever see arrays in known units. Bad series raise `SeriesError` with a reason the worker
records; nothing here crashes on a malformed header.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

logger = logging.getLogger(__name__)

PROJECTION_MODALITIES = ("CR", "DX")
GAP_FACTOR = 1.5  # a step this much larger than the median step is a missing slice
# steps that differ from each other by more than this part of the median step are uneven
UNEVEN_STEP_FRACTION = 0.1
# slices stacked further than this from their normal are sheared (a gantry tilt)
MAX_SHEAR_DEGREES = 1.0
ORIENTATION_TOLERANCE = 1e-3
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DEFER_PIXELS_BYTES = 64 * 1024  # elements larger than this (the pixel data) stay on disk
HU_RANGE = (-32768, 32767)  # int16; real HU span about -3024 to +3071 (+ metal)


@dataclass
class LoadedSeries:
    """One series as the pipelines see it.

    `array` has shape (frames, rows, cols). For CT it holds Hounsfield units, frames sorted
    along the slice normal from the first position to the last: int16 when the rescale is
    integral (every CT seen here; half the memory of float32 for a 600-slice series), else
    float32. For CR/DX it is float32, the displayed image (MONOCHROME1 inverted, VOI applied)
    scaled to [0, 1], one frame.
    `datasets` are the source datasets in the same frame order (pixel data may be dropped to
    save memory); a multi-frame source appears once and `frame_numbers` says which frame each
    array frame came from (1-based), else it is None.
    `spacing` is (slice spacing, row spacing, column spacing) in mm, slice spacing 0 for 2D.
    """

    modality: str
    series_instance_uid: str
    study_instance_uid: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]
    frame_numbers: list[int] | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 values) for CT
    positions: list[tuple[float, float, float]] | None = None  # ImagePositionPatient per frame


class SeriesError(ValueError):
    """A series that cannot become a volume; `reason` is what the worker records."""

    def __init__(self, reason: str, series_uid: str | None) -> None:
        super().__init__(f"series {series_uid}: {reason}")
        self.reason = reason
        self.series_uid = series_uid


@dataclass
class _Frame:
    """Where one 2D frame lives: its dataset, its frame index and its geometry."""

    dataset: Dataset
    index: int | None  # 0-based frame index for multi-frame objects, None for single frames
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rescale: Dataset  # the item holding RescaleSlope/Intercept for this frame


def load_series_files(
    paths: Iterable[str | PathLike[str]], expected_modality: str | None = None
) -> LoadedSeries:
    """Read files and load them as one series (see `load_series`).

    Pixel data are deferred (read from the file when the slice is decoded): reading every
    file up front held the whole encoded series (half the size of the float32 volume) in
    memory beside the volume being built.
    """
    return load_series(
        [pydicom.dcmread(p, defer_size=DEFER_PIXELS_BYTES) for p in paths], expected_modality
    )


def load_series(datasets: Sequence[Dataset], expected_modality: str | None = None) -> LoadedSeries:
    """Turn the instances of one series into a LoadedSeries.

    Pixel data are removed from the datasets once decoded, so that a long CT is held once
    (as float32) rather than three times (encoded, decoded, converted); the headers stay for
    the writers' references.
    """
    if not datasets:
        raise SeriesError("no instances", None)
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise SeriesError("instances from more than one series", series_uid)
    modality = str(datasets[0].get("Modality", ""))
    if expected_modality is not None and modality != expected_modality:
        raise SeriesError(f"modality {modality!r}, expected {expected_modality!r}", series_uid)
    datasets = _unique_instances(datasets)
    for ds in datasets:
        if not any(k in ds for k in PIXEL_DATA_KEYWORDS):
            raise SeriesError(f"instance {ds.get('SOPInstanceUID')} has no pixel data", series_uid)
    if len({(ds.get("Rows"), ds.get("Columns")) for ds in datasets}) > 1:
        raise SeriesError("instances differ in rows/columns", series_uid)
    if modality == "CT":
        return _load_ct(datasets, series_uid)
    if modality in PROJECTION_MODALITIES:
        return _load_projection(datasets, series_uid)
    raise SeriesError(f"unsupported modality {modality!r}", series_uid)


def _unique_instances(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Drop repeated SOP Instance UIDs: a re-sent instance is one instance, not two slices."""
    seen: set[str] = set()
    unique = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            logger.info("dropping repeated instance %s", uid)
            continue
        seen.add(uid)
        unique.append(ds)
    return unique


def _load_ct(datasets: list[Dataset], series_uid: str) -> LoadedSeries:
    frames = [frame for ds in datasets for frame in _ct_frames(ds, series_uid)]
    if len(frames) < 2:
        raise SeriesError("CT series with a single slice", series_uid)
    orientation = frames[0].orientation
    if any(not np.allclose(f.orientation, orientation, atol=ORIENTATION_TOLERANCE) for f in frames):
        raise SeriesError("slices with different orientations", series_uid)
    normal = np.cross(orientation[:3], orientation[3:])
    distances = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(distances, kind="stable")
    steps = np.diff(distances[order])
    if np.any(steps < ORIENTATION_TOLERANCE):
        raise SeriesError("two or more slices at the same position", series_uid)
    median_step = float(np.median(steps))
    if np.any(steps > GAP_FACTOR * median_step):
        raise SeriesError(
            f"gap in slice positions: step {steps.max():.2f} mm, median {median_step:.2f} mm",
            series_uid,
        )
    frames = [frames[i] for i in order]
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    dtype = np.int16 if all(_integral_rescale(f.rescale) for f in frames) else np.float32
    array = np.empty((len(frames), rows, cols), dtype=dtype)
    frames_left = Counter(id(f.dataset) for f in frames)
    for i, frame in enumerate(frames):
        stored = pixel_array(frame.dataset, index=frame.index)
        hu = apply_modality_lut(stored, frame.rescale)
        array[i] = np.clip(hu, *HU_RANGE) if dtype == np.int16 else hu
        frames_left[id(frame.dataset)] -= 1
        if not frames_left[id(frame.dataset)]:  # decoded: free the encoded copy right away
            _drop_pixel_data([frame.dataset])
    multi_frame = any(f.index is not None for f in frames)
    ordered_datasets = (
        _distinct([f.dataset for f in frames]) if multi_frame else [f.dataset for f in frames]
    )
    row_spacing, col_spacing = frames[0].pixel_spacing
    return LoadedSeries(
        modality="CT",
        series_instance_uid=series_uid,
        study_instance_uid=str(datasets[0].get("StudyInstanceUID", "")),
        array=array,
        spacing=(median_step, row_spacing, col_spacing),
        datasets=ordered_datasets,
        frame_numbers=[(f.index or 0) + 1 for f in frames] if multi_frame else None,
        orientation=tuple(float(v) for v in orientation),
        positions=[tuple(float(v) for v in f.position) for f in frames],
    )


def irregular_grid(series: LoadedSeries) -> str | None:
    """Why a CT series' voxels do not lie on one regular grid, or None.

    The lung and lesion measurements (mL, % involved) and the 3D models take one slice step
    (`spacing[0]`, the median) and slices stacked along their normal. A series acquired with
    a gantry tilt is sheared, and one whose steps alternate (2.0 / 2.9 mm) is not evenly
    spaced: either would be measured wrong without a word, so the pipeline declines them.
    """
    if series.positions is None or series.orientation is None or len(series.positions) < 2:
        return None
    orientation = np.asarray(series.orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    moves = np.diff(np.asarray(series.positions, dtype=float), axis=0)
    steps = moves @ normal
    along = np.abs(steps) / np.linalg.norm(moves, axis=1)
    shear = float(np.degrees(np.arccos(np.clip(along.min(), -1.0, 1.0))))
    if shear > MAX_SHEAR_DEGREES:
        return (f"slices are stacked {shear:.0f} degrees off their normal (gantry tilt): "
                "the volume would be sheared")
    low, high = float(np.abs(steps).min()), float(np.abs(steps).max())
    if high - low > UNEVEN_STEP_FRACTION * float(np.median(np.abs(steps))):
        return (f"uneven slice spacing ({low:.1f} to {high:.1f} mm): volumes would be "
                "measured wrong")
    return None


def spill_to_disk(series: LoadedSeries) -> None:
    """Replace `series.array` by a read-only memory map of the same values in an unlinked file.

    Once a pipeline has read the volume, only the overlay picture needs a frame of it again,
    while the masks are being built and the SEG is encoded: for a 600-slice CT that is 315 MB
    the node does not have to hold. Pages of the mapping are read from disk when touched and
    count as memory only then. The caller must drop its own references to the old array.
    """
    array = np.ascontiguousarray(series.array)
    with tempfile.TemporaryFile(prefix="covid_plugin-volume-") as fh:
        array.tofile(fh)
        fh.flush()
        # mmap keeps its own handle: the file lives until the mapping is gone
        series.array = np.memmap(fh, dtype=array.dtype, mode="r", shape=array.shape)


def _ct_frames(ds: Dataset, series_uid: str) -> list[_Frame]:
    """The frames of one CT object, from classic attributes or from functional groups."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        _require(
            ds, ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"), series_uid
        )
        return [
            _Frame(
                dataset=ds,
                index=None,
                position=np.asarray(ds.ImagePositionPatient, dtype=float),
                orientation=np.asarray(ds.ImageOrientationPatient, dtype=float),
                pixel_spacing=_positive_spacing(ds.PixelSpacing, series_uid),
                rescale=ds,
            )
        ]
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    )
    frames = []
    for index, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        groups = (per_frame, shared)
        frames.append(
            _Frame(
                dataset=ds,
                index=index,
                position=np.asarray(
                    _group(groups, "PlanePositionSequence", series_uid).ImagePositionPatient,
                    dtype=float,
                ),
                orientation=np.asarray(
                    _group(groups, "PlaneOrientationSequence", series_uid).ImageOrientationPatient,
                    dtype=float,
                ),
                pixel_spacing=_positive_spacing(
                    _group(groups, "PixelMeasuresSequence", series_uid).PixelSpacing, series_uid
                ),
                rescale=_group(groups, "PixelValueTransformationSequence", series_uid),
            )
        )
    return frames


def _integral_rescale(item: Dataset) -> bool:
    """Integer slope and intercept (every CT seen here): HU are integers and fit int16."""
    slope = float(item.get("RescaleSlope", 1) or 1)
    intercept = float(item.get("RescaleIntercept", 0) or 0)
    return slope.is_integer() and intercept.is_integer()


def _group(groups: Sequence[Dataset | None], keyword: str, series_uid: str) -> Dataset:
    """A functional group macro of one frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for source in groups:
        if source is not None and keyword in source:
            return source[keyword].value[0]
    raise SeriesError(f"a frame has no {keyword}", series_uid)


def _load_projection(datasets: list[Dataset], series_uid: str) -> LoadedSeries:
    """A radiograph as displayed: modality LUT, VOI (LUT or window), MONOCHROME1 inverted."""
    if len(datasets) != 1:
        raise SeriesError(
            f"{len(datasets)} radiographs in one series; load them one at a time", series_uid
        )
    ds = datasets[0]
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SeriesError("multi-frame radiograph", series_uid)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError("colour radiograph", series_uid)
    image = apply_modality_lut(pixel_array(ds), ds).astype(np.float64)
    low, high = _display_range(ds)
    if _has_voi(ds):
        image = apply_voi_lut(image, ds)
        low, high = (float(v) for v in apply_voi_lut(np.array([low, high]), ds))
        low, high = min(low, high), max(low, high)
    if high <= low:
        low, high = float(image.min()), float(image.max())
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    spacing = projection_spacing(ds)
    if spacing is None:
        logger.warning("series %s: no usable pixel spacing; using 1 mm", series_uid)
        spacing = (1.0, 1.0)
    _drop_pixel_data(datasets)
    return LoadedSeries(
        modality=str(ds.Modality),
        series_instance_uid=series_uid,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        array=scaled[np.newaxis],
        spacing=(0.0, *spacing),
        datasets=[ds],
    )


def projection_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing; zeros (seen in real CR headers) count as absent."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = ds.get(keyword)
        if values and len(values) == 2 and all(float(v) > 0 for v in values):
            return _pair(values)
    return None


def _display_range(ds: Dataset) -> tuple[float, float]:
    """Range of values after the modality LUT, from the stored bit depth (not the image)."""
    bits = int(ds.get("BitsStored", 16))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    else:
        stored = np.array([0, 2**bits - 1])
    low, high = (float(v) for v in apply_modality_lut(stored, ds))
    return min(low, high), max(low, high)


def _has_voi(ds: Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _require(ds: Dataset, keywords: Sequence[str], series_uid: str) -> None:
    missing = [k for k in keywords if k not in ds or ds[k].value in (None, "")]
    if missing:
        raise SeriesError(
            f"instance {ds.get('SOPInstanceUID')} lacks {', '.join(missing)}", series_uid
        )


def _pair(values: Sequence[float]) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _positive_spacing(values: Sequence[float], series_uid: str) -> tuple[float, float]:
    """CT spacing feeds every volume in mL: zero or negative is a broken header, said so here
    rather than as a division by zero deep in a pipeline. The value itself is not quoted."""
    pair = _pair(values)
    if not all(np.isfinite(v) and v > 0 for v in pair):
        raise SeriesError("PixelSpacing must be two positive numbers", series_uid)
    return pair


def _distinct(datasets: Iterable[Dataset]) -> list[Dataset]:
    """Datasets in first-seen order, each once (a multi-frame object contributes many frames)."""
    unique: dict[int, Dataset] = {}
    for ds in datasets:
        unique.setdefault(id(ds), ds)
    return list(unique.values())


def _drop_pixel_data(datasets: Iterable[Dataset]) -> None:
    for ds in datasets:
        for keyword in PIXEL_DATA_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
