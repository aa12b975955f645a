"""Findings masks -> one DICOM Segmentation (BINARY), registered to the source slices.

Viewers overlay a SEG on its source by the per-frame references and plane positions that
highdicom derives from the source images, so the source datasets are passed in the frame order
of the masks. Only frames that hold a segment are encoded by default, which keeps a 300-slice
CT with a few lesions small and fast to write.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom import Dataset

from covid_plugin.findings import Findings, Mask, ModelInfo
from covid_plugin.outputs.codes import (
    AI_FAMILY,
    ANATOMY_CATEGORIES,
    RULE_BASED_FAMILY,
    RULE_BASED_SHA256,
    coded,
)
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries

# sRGB display colours: anatomy in green, lesions in warm colours, in segment order.
ANATOMY_COLOUR = (0, 200, 0)
LESION_COLOURS = ((255, 40, 40), (255, 160, 0), (255, 0, 200), (0, 160, 255))
OVERLAP_CHECK_FRAMES = 16  # frames per block when checking segments for overlap


def segment_colours(masks: list[Mask]) -> list[tuple[int, int, int]]:
    """The colour of each mask, shared by the SEG (display colour) and the SC (contours)."""
    colours = []
    lesion_index = 0
    for mask in masks:
        if mask.category.value in ANATOMY_CATEGORIES:
            colours.append(ANATOMY_COLOUR)
        else:
            colours.append(LESION_COLOURS[lesion_index % len(LESION_COLOURS)])
            lesion_index += 1
    return colours


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """Model name, version and weights hash, as the SEG's Algorithm Identification Sequence."""
    family = RULE_BASED_FAMILY if model.sha256 == RULE_BASED_SHA256 else AI_FAMILY
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=family,
        version=model.version,
        parameters={"weights_sha256": model.sha256},
    )


def build_segmentation(
    findings: Findings, series: LoadedSeries, settings: OutputSettings
) -> hd.seg.Segmentation | None:
    """One segment per mask, or None when the findings hold no mask."""
    if not findings.masks:
        return None
    for mask in findings.masks:
        if mask.array.shape != series.array.shape:
            raise ValueError(
                f"mask {mask.key} has shape {mask.array.shape}, series {series.series_instance_uid}"
                f" has {series.array.shape}"
            )
    source_images, pixel_array = _frames_to_encode(findings.masks, series, settings)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=mask.label,
            segmented_property_category=coded(mask.category),
            segmented_property_type=coded(mask.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(mask.model),
            tracking_uid=hd.UID(),
            tracking_id=mask.key,
            anatomic_regions=[coded(mask.anatomic_region)] if mask.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*colour),
        )
        for number, (mask, colour) in enumerate(
            zip(findings.masks, segment_colours(findings.masks), strict=True), start=1
        )
    ]
    segmentation = _Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=settings.seg_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.model_name,
        software_versions=settings.software_version,
        device_serial_number=settings.device_serial_number,
        omit_empty_frames=settings.omit_empty_frames,
        series_description="AI segmentation (research use only)",
        content_label="AI_SEG",
        content_description="Automatic segmentation; research use only, not for diagnosis",
    )
    if "FrameOfReferenceUID" not in segmentation:
        # Without patient coordinates, General Image needs PatientOrientation (Type 2C).
        segmentation.PatientOrientation = source_images[0].get("PatientOrientation")
    return segmentation


def _frames_to_encode(
    masks: list[Mask], series: LoadedSeries, settings: OutputSettings
) -> tuple[list[Dataset], np.ndarray]:
    """Source images and a (frames, rows, cols, segments) array in the sources' own order.

    Single-frame sources that hold no segment are left out before stacking when empty frames
    are omitted anyway: the stack is then a few slices, not the whole series times segments.
    A multi-frame source must be matched frame for frame, so its masks are put back into the
    source's frame order instead.
    """
    if series.modality != "CT":
        return [_without_zero_spacing(ds) for ds in series.datasets], _segments_last(
            [mask.array for mask in masks]
        )
    if series.frame_numbers is not None:
        order = np.argsort(series.frame_numbers)
        return list(series.datasets), _segments_last([mask.array for mask in masks], frames=order)
    keep = np.arange(series.array.shape[0])
    if settings.omit_empty_frames:
        occupied = np.zeros(series.array.shape[0], dtype=bool)
        for mask in masks:
            occupied |= mask.array.reshape(mask.array.shape[0], -1).any(axis=1)
        if occupied.any():
            keep = np.flatnonzero(occupied)
        else:
            keep = keep[:1]  # an all-empty result still needs one frame to carry its geometry
    return [series.datasets[i] for i in keep], _segments_last(
        [mask.array for mask in masks], frames=keep
    )


def _segments_last(arrays: list[np.ndarray], frames: np.ndarray | None = None) -> np.ndarray:
    """(frames, rows, cols, segments) as highdicom wants it, stored segment by segment.

    highdicom sums over the segment axis to detect overlap; with each segment contiguous in
    memory that sum adds whole planes, which is about twice as fast as interleaved segments.
    Masks that already are the segments of one such buffer (the CT pipeline writes them so),
    with a contiguous run of `frames`, are passed as a view: no copy at all. Otherwise each
    mask (only `frames` of it, when given) is copied straight into its place in a new stack:
    selecting frames first and stacking then held every mask twice.
    """
    shared = _shared_stack(arrays)
    if shared is not None:
        if frames is None:
            return np.moveaxis(shared, 0, -1)
        if np.array_equal(frames, np.arange(frames[0], frames[0] + len(frames))):
            return np.moveaxis(shared[:, frames[0] : frames[0] + len(frames)], 0, -1)
    n_frames = arrays[0].shape[0] if frames is None else len(frames)
    stack = np.empty((len(arrays), n_frames, *arrays[0].shape[1:]), dtype=bool)
    for segment, array in zip(stack, arrays, strict=True):
        if frames is None:
            segment[...] = array
        else:
            np.take(array.astype(bool, copy=False), frames, axis=0, out=segment)
    return np.moveaxis(stack, 0, -1)


def _shared_stack(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The boolean (segments, frames, rows, cols) array whose segments `arrays` are, in order."""
    base = arrays[0].base
    if (
        not isinstance(base, np.ndarray)
        or base.dtype != np.bool_
        or base.shape != (len(arrays), *arrays[0].shape)
        or not base.flags.c_contiguous
    ):
        return None
    start = base.__array_interface__["data"][0]
    for segment, array in enumerate(arrays):
        if (
            array.base is not base
            or array.dtype != np.bool_
            or array.shape != base.shape[1:]
            or array.strides != base.strides[1:]
            or array.__array_interface__["data"][0] != start + segment * base.strides[0]
        ):
            return None
    return base


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with its overlap check run a few frames at a time.

    For a stack of binary segments highdicom decides SegmentsOverlap from the sum over the
    segment axis, an int64 array eight times the size of one segment (1.2 GB for a 600-slice
    CT). Checking blocks of frames and combining the answers gives the same value.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray | hd.Volume,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, hd.seg.SegmentsOverlapValues]:
        check = super()._check_and_cast_pixel_array
        if (
            not isinstance(pixel_array, np.ndarray)
            or pixel_array.ndim != 4
            or pixel_array.dtype != np.bool_
            or segmentation_type != hd.seg.SegmentationTypeValues.BINARY
        ):
            return check(pixel_array, segment_numbers, segmentation_type, dtype)
        overlap = hd.seg.SegmentsOverlapValues.NO
        for start in range(0, pixel_array.shape[0], OVERLAP_CHECK_FRAMES):
            _, block = check(
                pixel_array[start : start + OVERLAP_CHECK_FRAMES],
                segment_numbers,
                segmentation_type,
                dtype,
            )
            if block == hd.seg.SegmentsOverlapValues.YES:
                overlap = block
                break
        return pixel_array, overlap


def _without_zero_spacing(ds: Dataset) -> Dataset:
    """A radiograph header whose zero PixelSpacing (seen in real CR) is dropped, not copied.

    highdicom copies PixelSpacing into the SEG's pixel measures; a zero spacing there is an
    invalid object, whereas no pixel measures is valid for an image without patient geometry.
    """
    spacing = ds.get("PixelSpacing")
    if not spacing or all(float(v) > 0 for v in spacing):
        return ds
    header = copy.deepcopy(ds)
    del header.PixelSpacing
    return header
