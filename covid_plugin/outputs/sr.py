"""Findings -> a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Structure of the report (all concepts coded, so a PACS or a registry can query them):
- one TID 1501 group per class: finding type = the class concept, one "Probability"
  measurement (unit "1"), with the classifier's TID 4019 algorithm identification;
- one TID 1501 group with the decided class as a qualitative "Finding" evaluation;
- one TID 1411 (CT) or TID 1410 (radiograph) group per SEG segment, referencing the segment and
  holding that segment's measurements (volumes, percent involvement);
- one TID 1501 group for measurements that concern no segment;
- the intended-use caveat and the pipeline's notes as TEXT "Comment" items.
Source images are referenced by the evidence sequence, by each segment's source series and,
for a radiograph, by each group. There is no TID 1600 image library: highdicom needs attributes
for it that real radiographs lack (ImagerPixelSpacing), and for a CT it would add an entry
per slice and seconds of writing time.
"""

from __future__ import annotations

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

from covid_plugin.findings import Classification, Findings, Mask, ModelInfo
from covid_plugin.findings import Measurement as FindingsMeasurement
from covid_plugin.outputs.codes import (
    COMMENT,
    DEVICE,
    FINDING,
    INTENDED_USE,
    NO_UNITS,
    PROBABILITY,
    coded,
    procedure_reported,
)
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.volume import LoadedSeries

MeasurementGroup = (
    MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


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
) -> hd.sr.Comprehensive3DSR:
    """The SR for one pipeline run; `segmentation` is the SEG its ROI groups refer to."""
    groups: list[MeasurementGroup] = []
    if findings.classification is not None:
        groups.extend(_classification_groups(findings.classification, series))
    segment_keys: set[str] = set()
    if segmentation is not None:
        for number, mask in enumerate(findings.masks, start=1):
            groups.append(_segment_group(findings, mask, number, segmentation, series))
            segment_keys.add(mask.key)
    loose = [m for m in findings.measurements if m.mask_key not in segment_keys]
    if loose:
        model = findings.models[0] if findings.models else None
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="measurements"),
                algorithm_id=algorithm(model) if model else None,
                measurements=[_measurement(m) for m in loose],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(settings),
        procedure_reported=procedure_reported(findings.kind),
        imaging_measurements=groups,
    )
    for text in [INTENDED_USE, *findings.notes]:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
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
        series_description="AI measurement report (research use only)",
        previous_versions=_previous_versions(findings),
    )
    return sr


def _previous_versions(findings: Findings) -> list[Dataset] | None:
    """Earlier reports this one replaces, as highdicom's PredecessorDocumentsSequence input."""
    versions = []
    for earlier in findings.predecessors:
        ds = Dataset()
        ds.StudyInstanceUID = earlier.study_uid
        ds.SeriesInstanceUID = earlier.series_uid
        ds.SOPClassUID = earlier.sop_class_uid
        ds.SOPInstanceUID = earlier.sop_instance_uid
        versions.append(ds)
    return versions or None


def _observation_context(settings: OutputSettings) -> hd.sr.ObservationContext:
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


def _source_images(series: LoadedSeries) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """A radiograph's groups point at the image itself; a CT's rely on the image library."""
    if series.modality == "CT":
        return None
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in series.datasets]


def _classification_groups(
    classification: Classification, series: LoadedSeries
) -> list[MeasurementsAndQualitativeEvaluations]:
    algorithm_id = algorithm(classification.model, classification.threshold)
    groups = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"probability {p.key}"),
            finding_type=coded(p.code),
            algorithm_id=algorithm_id,
            measurements=[Measurement(name=PROBABILITY, value=p.probability, unit=NO_UNITS)],
            source_images=_source_images(series),
        )
        for p in classification.probabilities
    ]
    predicted = next(p for p in classification.probabilities if p.key == classification.predicted)
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="classification"),
            algorithm_id=algorithm_id,
            qualitative_evaluations=[QualitativeEvaluation(FINDING, coded(predicted.code))],
            source_images=_source_images(series),
        )
    )
    return groups


def _segment_group(
    findings: Findings,
    mask: Mask,
    number: int,
    segmentation: hd.seg.Segmentation,
    series: LoadedSeries,
) -> MeasurementGroup:
    """TID 1411 (volume) or TID 1410 (radiograph) group about one SEG segment."""
    segment = segmentation.SegmentSequence[number - 1]
    tracking = TrackingIdentifier(uid=segment.TrackingUID, identifier=mask.label)
    measurements = [_measurement(m) for m in findings.measurements if m.mask_key == mask.key]
    sites = [FindingSite(coded(mask.anatomic_region))] if mask.anatomic_region else None
    common = {
        "tracking_identifier": tracking,
        "finding_type": coded(mask.property_type),
        "algorithm_id": algorithm(mask.model),
        "finding_sites": sites,
        "measurements": measurements or None,
    }
    if series.modality == "CT":
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=referenced, **common
        )
    frame_number = _frame_of(segmentation, number)
    if frame_number is None:  # an empty segment of a radiograph: nothing to point at
        return MeasurementsAndQualitativeEvaluations(**common)
    referenced_frame = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        frame_number=frame_number,
        segment_number=number,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(series.datasets[0]),
    )
    # PS3.3 C.17.3.2.3: a reference to SEG frames carries no segment number (the frame says
    # which segment); highdicom 0.28 writes both, which validators reject.
    del referenced_frame[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=referenced_frame, **common
    )


def _measurement(m: FindingsMeasurement) -> Measurement:
    """One NUM item; its algorithm is the one named by the group it sits in."""
    return Measurement(
        name=coded(m.name),
        value=m.value,
        unit=coded(m.unit),
        finding_sites=[FindingSite(coded(m.finding_site))] if m.finding_site else None,
    )


def _frame_of(segmentation: hd.seg.Segmentation, segment_number: int) -> int | None:
    """The SEG frame (1-based) that holds a radiograph's segment, None if it was omitted."""
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    for index, frame in enumerate(segmentation.PerFrameFunctionalGroupsSequence, start=1):
        identification = frame.get("SegmentIdentificationSequence") or (
            shared.SegmentIdentificationSequence
        )
        if identification[0].ReferencedSegmentNumber == segment_number:
            return index
    return None
