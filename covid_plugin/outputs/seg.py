"""CT findings masks -> one DICOM Segmentation (BINARY), registered to the source slices.

Viewers overlay a SEG on its source by the per-frame references and plane positions that
highdicom derives from the source images, so the source datasets are passed in the frame order
of the masks. Only frames that hold a segment are encoded by default, which keeps a 300-slice
CT with a few lesions small and fast to write.

Radiographs get no SEG: a projection image has no patient frame of reference, and a SEG
without Plane Orientation/Position breaks viewers that expect them (OHIF v3 fails on it).
Their outlines go into a presentation state (pr.py) and the SR's image regions instead.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset

from covid_plugin.findings import Findings, Mask, ModelInfo
from covid_plugin.outputs.codes import AI_FAMILY, RULE_BASED_FAMILY, RULE_BASED_SHA256, coded
from covid_plugin.outputs.colours import segment_colours
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries


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
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    when: datetime.datetime | None = None,
) -> hd.seg.Segmentation | None:
    """One segment per mask, or None when the findings hold no mask or the source is 2D."""
    if not findings.masks or series.modality != "CT":
        return None
    when = when or datetime.datetime.now()
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
    segmentation = hd.seg.Segmentation(
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
        series_description=settings.seg_series_description,
        content_label="AI_SEG",
        content_description="Automatic segmentation; research use only, not for diagnosis",
        **creation_times(when),
    )
    return stamp(segmentation, models_of(findings), settings, when)


def _frames_to_encode(
    masks: list[Mask], series: LoadedSeries, settings: OutputSettings
) -> tuple[list[Dataset], np.ndarray]:
    """Source images and a (frames, rows, cols, segments) array in the sources' own order.

    Single-frame sources that hold no segment are left out before stacking when empty frames
    are omitted anyway: the stack is then a few slices, not the whole series times segments.
    A multi-frame source must be matched frame for frame, so its masks are put back into the
    source's frame order instead.
    """
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
