"""CT findings masks -> DICOM Segmentations (BINARY), registered to the source slices.

Two SEG series: the lungs (anatomy) and the lesions. Within each, segments do not overlap
(right and left lung; ground glass and consolidation), so highdicom takes them as one label
map (frames, rows, cols) of segment numbers and checks it with a single maximum. Lesions do
lie inside the lungs: in one SEG the overlapping segments would have to be passed as a
(frames, rows, cols, segments) stack, whose overlap check in highdicom sums the stack into an
int64 array eight times the size of one segment (1.3 GB more at 600 slices, measured). Masks
that do overlap within a group are still encoded correctly, as such a stack.

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
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from covid_plugin.findings import Findings, Mask, ModelInfo
from covid_plugin.outputs.codes import AI_FAMILY, RULE_BASED_FAMILY, RULE_BASED_SHA256, coded
from covid_plugin.outputs.colours import RGB, segment_colours
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.regions import is_anatomy
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries

BLOCK_FRAMES = 32  # frames per step when building a label map, to bound temporary copies


@dataclass(frozen=True)
class SegmentRef:
    """Where a mask went: its SEG object and its segment number in it."""

    segmentation: hd.seg.Segmentation
    number: int


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """Model name, version and weights hash, as the SEG's Algorithm Identification Sequence."""
    family = RULE_BASED_FAMILY if model.sha256 == RULE_BASED_SHA256 else AI_FAMILY
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=family,
        version=model.version,
        parameters={"weights_sha256": model.sha256},
    )


def build_segmentations(
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    when: datetime.datetime | None = None,
) -> dict[str, SegmentRef]:
    """The lungs SEG and the lesions SEG (each only if it has masks), keyed by mask key.

    Empty for a radiograph or findings without masks.
    """
    if not findings.masks or series.modality != "CT":
        return {}
    when = when or datetime.datetime.now()
    for mask in findings.masks:
        if mask.array.shape != series.array.shape:
            raise ValueError(
                f"mask {mask.key} has shape {mask.array.shape}, series {series.series_instance_uid}"
                f" has {series.array.shape}"
            )
    colours = dict(zip([m.key for m in findings.masks], segment_colours(findings.masks),
                       strict=True))
    groups = (
        ([m for m in findings.masks if is_anatomy(m)], settings.seg_series_number,
         settings.seg_series_description),
        ([m for m in findings.masks if not is_anatomy(m)], settings.lesion_seg_series_number,
         settings.lesion_seg_series_description),
    )
    refs: dict[str, SegmentRef] = {}
    for masks, series_number, description in groups:
        if not masks:
            continue
        segmentation = _segmentation(
            findings, masks, [colours[m.key] for m in masks], series, settings, when,
            series_number, description,
        )
        refs |= {m.key: SegmentRef(segmentation, n) for n, m in enumerate(masks, start=1)}
    return refs


def segmentations_of(refs: dict[str, SegmentRef]) -> list[hd.seg.Segmentation]:
    """The distinct SEG objects behind `refs`, lungs before lesions."""
    return list({id(r.segmentation): r.segmentation for r in refs.values()}.values())


def _segmentation(
    findings: Findings,
    masks: list[Mask],
    colours: list[RGB],
    series: LoadedSeries,
    settings: OutputSettings,
    when: datetime.datetime,
    series_number: int,
    series_description: str,
) -> hd.seg.Segmentation:
    """One SEG holding `masks` as segments 1..n."""
    source_images, pixel_array = _frames_to_encode(masks, series, settings)
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
        for number, (mask, colour) in enumerate(zip(masks, colours, strict=True), start=1)
    ]
    segmentation = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.model_name,
        software_versions=settings.software_version,
        device_serial_number=settings.device_serial_number,
        omit_empty_frames=settings.omit_empty_frames,
        series_description=series_description,
        content_label="AI_SEG",
        content_description="Automatic segmentation; research use only, not for diagnosis",
        **creation_times(when),
    )
    return stamp(segmentation, models_of(findings), settings, when)


def _frames_to_encode(
    masks: list[Mask], series: LoadedSeries, settings: OutputSettings
) -> tuple[list[Dataset], np.ndarray]:
    """Source images and the masks' pixels for them, in the sources' own order.

    Single-frame sources that hold no segment are left out when empty frames are omitted
    anyway. A multi-frame source must be matched frame for frame, so its masks are put back
    into the source's frame order instead.
    """
    if series.frame_numbers is not None:
        order = np.argsort(series.frame_numbers)
        return list(series.datasets), _pixels(masks, order)
    keep = np.arange(series.array.shape[0])
    if settings.omit_empty_frames:
        occupied = np.zeros(series.array.shape[0], dtype=bool)
        for mask in masks:
            occupied |= mask.array.reshape(mask.array.shape[0], -1).any(axis=1)
        if occupied.any():
            keep = np.flatnonzero(occupied)
        else:
            keep = keep[:1]  # an all-empty result still needs one frame to carry its geometry
    return [series.datasets[i] for i in keep], _pixels(masks, keep)


def _pixels(masks: list[Mask], frames: np.ndarray) -> np.ndarray:
    """A (frames, rows, cols) uint8 label map of segment numbers when the masks do not
    overlap; else the (frames, rows, cols, segments) boolean stack highdicom needs then."""
    labels = np.zeros((len(frames), *masks[0].array.shape[1:]), dtype=np.uint8)
    for start in range(0, len(frames), BLOCK_FRAMES):
        block = frames[start : start + BLOCK_FRAMES]
        target = labels[start : start + len(block)]
        for number, mask in enumerate(masks, start=1):
            inside = mask.array[block].astype(bool, copy=False)
            if (target[inside] != 0).any():
                return np.stack([m.array[frames].astype(bool) for m in masks], axis=-1)
            target[inside] = number
    return labels
