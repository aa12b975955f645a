"""Findings -> a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Structure of the report (all concepts coded, so a PACS or a registry can query them):
- one TID 1501 group per class: finding type = the class concept, one "Probability"
  measurement (unit "1"), with the classifier's TID 4019 algorithm identification;
- one TID 1501 group with the decided class as a qualitative "Finding" evaluation;
- CT: one TID 1411 group per SEG segment, referencing the segment and holding that segment's
  measurements (volumes, percent involvement);
- TID 1410 planar groups with an image-region outline (SCOORD) on the key image: each lung,
  and the largest lesion with its area (CT) or the region that drove the call (radiograph).
  These are what viewers such as OHIF draw and list as measurements;
- one TID 1501 group for measurements that concern no segment;
- a "Qualitative Evaluations" container with the intended-use caveat and the pipeline's notes
  as TEXT (TID 1500 rows 12-13).
Every TID 1501 group references the key image (an IMAGE item with a ReferencedSOPSequence),
which viewers need to place a group. There is no TID 1600 image library: for a CT it would
add an entry per slice and seconds of writing time.
"""

from __future__ import annotations

import datetime

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    FindingSite,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes

from covid_plugin.findings import Classification, Findings, Mask, ModelInfo
from covid_plugin.findings import Measurement as FindingsMeasurement
from covid_plugin.outputs.codes import (
    COMMENT,
    DEVICE,
    FINDING,
    INTENDED_USE,
    NO_UNITS,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    coded,
    procedure_reported,
)
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.regions import Outline, is_anatomy, key_frame, outlines
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries

MeasurementGroup = (
    MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
LUNG_OUTLINES = 2  # a lung mask of a radiograph: the two largest regions, one per side


def algorithm(model: ModelInfo, threshold: float | None = None) -> AlgorithmIdentification:
    """TID 4019: name, version, and the parameters that make a result reproducible."""
    parameters = [f"weights_sha256={model.sha256}"]
    if threshold is not None:
        parameters.append(f"threshold={threshold:g}")
    return AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


def build_report(
    findings: Findings,
    series: LoadedSeries,
    settings: OutputSettings,
    segmentation: hd.seg.Segmentation | None = None,
    when: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one pipeline run; `segmentation` is the SEG its volumetric groups refer to."""
    when = when or datetime.datetime.now()
    frame = key_frame(findings.masks, series.array.shape[0]) if series.modality == "CT" else 0
    key_image = _key_image(series, frame)
    groups: list[MeasurementGroup] = []
    if findings.classification is not None:
        groups.extend(_classification_groups(findings.classification, key_image))
    segment_keys: set[str] = set()
    if segmentation is not None:
        for number, mask in enumerate(findings.masks, start=1):
            groups.append(_segment_group(findings, mask, number, segmentation, series))
            segment_keys.add(mask.key)
    groups.extend(_outline_groups(findings, series, frame))
    loose = [m for m in findings.measurements if m.mask_key not in segment_keys]
    if loose:
        model = findings.models[0] if findings.models else None
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="measurements"),
                algorithm_id=algorithm(model) if model else None,
                measurements=[_measurement(m) for m in loose],
                source_images=[key_image],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(settings),
        procedure_reported=procedure_reported(findings.kind),
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(comments([INTENDED_USE, *findings.notes]))
    evidence: list[Dataset] = list(series.datasets)
    if segmentation is not None:
        evidence.append(segmentation)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=settings.sr_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,  # PRELIMINARY: an automatic result nobody has verified
        series_description=settings.sr_series_description,
        **creation_times(when),
    )
    return stamp(sr, models_of(findings), settings, when)


def observation_context(settings: OutputSettings) -> hd.sr.ObservationContext:
    """The device observer: the node itself, identified the same way on every report."""
    device = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=settings.device_uid,
            name=settings.model_name,
            manufacturer_name=settings.manufacturer,
            model_name=settings.model_name,
            serial_number=settings.device_serial_number,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


def comments(texts: list[str]) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container holding free-text comments.

    highdicom's MeasurementReport does not build this optional container, so it is made
    from highdicom's public content items and added as the report's last child.
    """
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in texts
        ]
    )
    return container


def _key_image(series: LoadedSeries, frame: int) -> hd.sr.SourceImageForMeasurementGroup:
    source = series.datasets[0 if series.frame_numbers is not None else frame]
    frames = [series.frame_numbers[frame]] if series.frame_numbers is not None else None
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(source, frames)


def _classification_groups(
    classification: Classification, key_image: hd.sr.SourceImageForMeasurementGroup
) -> list[MeasurementsAndQualitativeEvaluations]:
    algorithm_id = algorithm(classification.model, classification.threshold)
    groups = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"probability {p.key}"),
            finding_type=coded(p.code),
            algorithm_id=algorithm_id,
            measurements=[Measurement(name=PROBABILITY, value=p.probability, unit=NO_UNITS)],
            source_images=[key_image],
        )
        for p in classification.probabilities
    ]
    predicted = next(p for p in classification.probabilities if p.key == classification.predicted)
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="classification"),
            algorithm_id=algorithm_id,
            qualitative_evaluations=[QualitativeEvaluation(FINDING, coded(predicted.code))],
            source_images=[key_image],
        )
    )
    return groups


def _segment_group(
    findings: Findings,
    mask: Mask,
    number: int,
    segmentation: hd.seg.Segmentation,
    series: LoadedSeries,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group about one SEG segment, with that segment's measurements."""
    segment = segmentation.SegmentSequence[number - 1]
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
    )
    measurements = [_measurement(m) for m in findings.measurements if m.mask_key == mask.key]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=segment.TrackingUID, identifier=mask.label),
        referenced_segment=referenced,
        finding_type=coded(mask.property_type),
        algorithm_id=algorithm(mask.model),
        finding_sites=_sites(mask),
        measurements=measurements or None,
    )


def _outline_groups(
    findings: Findings, series: LoadedSeries, frame: int
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups: each lung and the largest lesion (or region) outlined on the key image.

    On a CT only the single largest lesion region of the key slice is outlined, with its area;
    anatomy gets one outline per mask (one per lung). A radiograph's lung mask holds both
    lungs, so its two largest regions are outlined.
    """
    source = series.datasets[0 if series.frame_numbers is not None else frame]
    frames = [series.frame_numbers[frame]] if series.frame_numbers is not None else None
    lesions = [m for m in findings.masks if not is_anatomy(m)]
    largest_lesion = _largest_lesion(lesions, frame)
    groups = []
    for mask in findings.masks:
        if is_anatomy(mask):
            found = outlines(mask.array[frame], LUNG_OUTLINES if series.modality != "CT" else 1)
        elif largest_lesion is not None and largest_lesion[0] is mask:
            found = [largest_lesion[1]]
        elif series.modality != "CT":
            found = outlines(mask.array[frame], 1)
        else:
            found = []
        for index, outline in enumerate(found, start=1):
            suffix = f" {index}" if len(found) > 1 else ""
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=outline.points,
                source_image=hd.sr.SourceImageForRegion.from_source_image(source, frames),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(
                        uid=hd.UID(), identifier=f"{mask.label} outline{suffix}"
                    ),
                    referenced_region=region,
                    finding_type=coded(mask.property_type),
                    algorithm_id=algorithm(mask.model),
                    finding_sites=_sites(mask),
                    measurements=_area(outline, series) if not is_anatomy(mask) else None,
                )
            )
    return groups


def _largest_lesion(lesions: list[Mask], frame: int) -> tuple[Mask, Outline] | None:
    best: tuple[Mask, Outline] | None = None
    for mask in lesions:
        for outline in outlines(mask.array[frame], 1):
            if best is None or outline.pixels > best[1].pixels:
                best = (mask, outline)
    return best


def _area(outline: Outline, series: LoadedSeries) -> list[Measurement] | None:
    """The region's area in mm², where the source gives a physical pixel spacing."""
    if series.modality != "CT" and not _has_physical_spacing(series.datasets[0]):
        return None
    area = outline.pixels * float(series.spacing[1]) * float(series.spacing[2])
    square_mm = codes.UCUM.SquareMillimeter
    return [Measurement(name=codes.SCT.Area, value=round(area, 1), unit=square_mm)]


def _has_physical_spacing(ds: Dataset) -> bool:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return bool(spacing) and all(float(v) > 0 for v in spacing)


def _sites(mask: Mask) -> list[FindingSite] | None:
    return [FindingSite(coded(mask.anatomic_region))] if mask.anatomic_region else None


def _measurement(m: FindingsMeasurement) -> Measurement:
    """One NUM item; its algorithm is the one named by the group it sits in."""
    return Measurement(
        name=coded(m.name),
        value=m.value,
        unit=coded(m.unit),
        finding_sites=[FindingSite(coded(m.finding_site))] if m.finding_site else None,
    )
