"""Findings -> a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Structure of the report (concepts coded, so a PACS or a registry can query them), shaped
for what OHIF 3.13 shows of an SR (it draws each measurement that has an image region with
"<concept name>: <value> <unit>" lines, and lists Cornerstone freehand outlines, named by
their finding type, in its measurement panel):
- the verdict: a TID 1410 group whose finding type is the called class, with that class's
  probability and the decision threshold, in percent, and no area or volume; its region a
  caption band across the key image's lower part (see `_verdict_group`);
- one TID 1501 group per class not called: finding type = the class, its probability;
  the probabilities and the threshold are named by class ("COVID-19 probability"), concepts
  of the report's declared private scheme, as no standard code names them;
- one outline per lung and per lesion type, by its largest region on the key image (CT: the
  slice with the largest lesion area; a segment absent there is outlined on its own largest
  slice): a TID 1501 group whose finding type names it ("Right lung", "Left lung" also on a
  radiograph, from PatientOrientation), whose first NUM is the "Area" INFERRED FROM the
  outline SCOORD (TID 300; pixels where the film has no pixel size), followed by the
  segment's volume and percent involved;
- CT: one TID 1411 group per SEG segment, referencing the segment;
- "Both lungs": a TID 1410 group on the key image's frame with the measurements about both
  lungs (percent involved); an empty segment's group shares its tracking UID (it has no
  outline of its own);
- a "Qualitative Evaluations" container with the intended-use caveat and the pipeline's notes
  as TEXT (TID 1500 rows 12-13).
Every group references an image (an IMAGE item with a ReferencedSOPSequence) and shares its
tracking UID with a group that has an image region; see `build_report` for why. There is no
TID 1600 image library: for a CT it would add an entry per slice and seconds of writing time.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    FindingSite,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes

from covid_plugin.findings import Classification, ClassProbability, Findings, Mask, ModelInfo
from covid_plugin.findings import Measurement as FindingsMeasurement
from covid_plugin.outputs.codes import (
    COMMENT,
    DEVICE,
    INTENDED_USE,
    LOCAL_SCHEME,
    LOCAL_SCHEME_NAME,
    PERCENT,
    PIXELS,
    QUALITATIVE_EVALUATIONS,
    coded,
    probability_of,
    procedure_reported,
    threshold_of,
)
from covid_plugin.outputs.headers import creation_times, models_of, stamp
from covid_plugin.outputs.regions import (
    Outline,
    key_image_of,
    mask_outlines,
    outlines,
)
from covid_plugin.outputs.seg import SegmentRef, segmentations_of
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.text import thresholded_class
from covid_plugin.volume import LoadedSeries, projection_spacing

MeasurementGroup = (
    MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
# The tracking identifier prefix by which Cornerstone's SR adapter (OHIF 3.x) recognises a
# closed outline it can load as a freehand ROI into the measurement panel; the rest of the
# identifier is our label. Other readers see an ordinary text identifier.
FREEHAND_OUTLINE = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def outline_identifier(label: str) -> str:
    return f"{FREEHAND_OUTLINE}:{label}"


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
    segments: dict[str, SegmentRef] | None = None,
    when: datetime.datetime | None = None,
    frame: int | None = None,
    drawn: dict[str, list[tuple[int, Outline]]] | None = None,
    carriers: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one pipeline run; `segments` say where each mask's SEG segment is, `drawn`
    its outlines (regions.mask_outlines, found once for the SR and the presentation state),
    `carriers` which result object carries what (text.carriers_line).

    Viewers that list SR measurements (OHIF) merge the groups that share a tracking UID and
    need an image region in each merged measurement: a group with none leaves OHIF 3.13 with
    a blank viewport. So every group without a region of its own shares the tracking UID of
    one with a region: a segment's volumetric group that of its outline, the other classes'
    probabilities that of the verdict, and the measurements about both lungs (percent
    involved, an empty segment's volume) that of a "Both lungs" region (the key image's
    frame), so that no volume is printed beside the verdict.
    OHIF prints a merged measurement as "<concept name>: <value> <unit>" lines, prints a
    group's finding site as its raw code, and skips a NUM beside an outline that has any
    child but the outline: so the measurements of a mask sit in its outline's group (its
    volume and extent beside the outline's area, the group's finding type naming the site),
    and no group carries a finding site of its own.
    """
    when = when or datetime.datetime.now()
    frame = key_image_of(findings, series) if frame is None else frame
    summary = hd.UID()  # the tracking UID of the verdict and the class probabilities
    both = hd.UID()  # the tracking UID of the measurements about both lungs
    groups: list[MeasurementGroup] = [_verdict_group(findings, series, frame, summary)]
    if findings.classification is not None:
        groups.extend(
            _class_groups(findings.classification, _key_image(series, frame), summary)
        )
    about_both: list[MeasurementGroup] = []  # drawn with the "Both lungs" region
    segments = segments or {}
    for mask in findings.masks:
        found = drawn[mask.key] if drawn is not None else mask_outlines(mask, series, frame)
        segment = segments.get(mask.key)
        segment_uid = (
            segment.segmentation.SegmentSequence[segment.number - 1].TrackingUID
            if segment is not None else None
        )
        mine = [m for m in findings.measurements if m.mask_key == mask.key]
        # beside an outline a NUM names no site of its own: the group's finding type is the
        # site, and OHIF skips a NUM with any child but its SCOORD
        about = [_measurement(m, site=not found) for m in mine]
        for index, (outline_frame, outline) in enumerate(found):
            numbered = len(found) > 1 and outline.side is None
            name = outline.side.meaning if outline.side is not None else mask.label
            groups.append(
                _outline_group(
                    series, outline_frame, outline,
                    tracking_uid=segment_uid if segment_uid and index == 0 else hd.UID(),
                    label=f"{name} {index + 1}" if numbered else name,
                    finding_type=coded(outline.side or mask.property_type),
                    algorithm_id=algorithm(mask.model),
                    measurements=about if index == 0 else [],
                )
            )
        if segment is not None:  # after its outline: OHIF names a merged group by the first
            tracking = TrackingIdentifier(
                uid=segment_uid if found else both, identifier=mask.label
            )
            segment_group = _segment_group(mask, segment, series, tracking,
                                           [] if found else about)
            (groups if found else about_both).append(segment_group)
        elif about and not found:  # measured but neither outlined nor segmented
            about_both.append(_loose_group(findings, about, series, frame, both))
    loose = [
        _measurement(m) for m in findings.measurements
        if m.mask_key is None or m.mask_key not in {mask.key for mask in findings.masks}
    ]
    if loose or about_both:  # the region first: OHIF names a merged group by the first
        groups.extend([_lungs_group(findings, series, frame, both, loose), *about_both])
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(settings),
        procedure_reported=procedure_reported(findings.kind),
        imaging_measurements=groups,
    )
    notes = [INTENDED_USE, *findings.notes, *([carriers] if carriers else [])]
    report[0].ContentSequence.append(comments(notes))
    evidence: list[Dataset] = list(series.datasets)
    evidence.extend(segmentations_of(segments))
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
        previous_versions=_previous_versions(findings),
        **creation_times(when),
    )
    sr.CodingSchemeIdentificationSequence = [local_scheme()]
    return stamp(sr, models_of(findings), settings, when)


def _first_model(findings: Findings) -> ModelInfo | None:
    """The model credited with what no single model made (the percent of both lungs
    involved, the verdict band of a film without a verdict): the findings' first, in every
    group of the report alike."""
    return findings.models[0] if findings.models else None


def _first_algorithm(findings: Findings) -> AlgorithmIdentification | None:
    model = _first_model(findings)
    return algorithm(model) if model else None


def _loose_group(
    findings: Findings,
    measurements: list[Measurement],
    series: LoadedSeries,
    frame: int,
    tracking_uid: str,
) -> MeasurementsAndQualitativeEvaluations:
    """Measurements about no outlined region (e.g. the percent of both lungs involved)."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier="measurements"),
        algorithm_id=_first_algorithm(findings),
        measurements=measurements,
        source_images=[_key_image(series, frame)],
    )


def local_scheme() -> Dataset:
    """The Coding Scheme Identification item that declares the report's private concepts."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "covid_plugin"
    return item


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


def _source(series: LoadedSeries, frame: int) -> tuple[Dataset, list[int] | None]:
    """The dataset holding a frame and, for a multi-frame source, the frame's number."""
    if series.frame_numbers is not None:
        return series.datasets[0], [series.frame_numbers[frame]]
    return series.datasets[frame], None


def _key_image(series: LoadedSeries, frame: int) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(*_source(series, frame))


def _region(series: LoadedSeries, frame: int, outline: Outline) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline.points,
        source_image=hd.sr.SourceImageForRegion.from_source_image(*_source(series, frame)),
    )


def _image_frame(series: LoadedSeries) -> Outline:
    return outlines(np.ones(series.array.shape[1:], dtype=bool), 1)[0]


CAPTION_ROWS = (0.84, 0.88)  # the verdict's band, as fractions of the image's height


def _caption_band(series: LoadedSeries) -> Outline:
    """A band across the lower part of the key image, from its left edge to its middle, high
    enough for the verdict's lines below it (OHIF writes them from the band's middle down)."""
    rows, columns = series.array.shape[1:]
    band = np.zeros((rows, columns), dtype=bool)
    top, bottom = (round(rows * f) for f in CAPTION_ROWS)
    band[top: max(bottom, top + 1), : max(1, columns // 2)] = True
    return outlines(band, 1)[0]


def _verdict_group(
    findings: Findings, series: LoadedSeries, frame: int, tracking_uid: str
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The call, with the called class's probability and the decision threshold, and no
    area. It is about the whole key image; its region is a caption band across the image's
    lower part, because a viewer writes a region's text at the region's right edge (OHIF,
    without keeping it in view or apart from other text): there it stays clear of the lungs'
    labels and inside the viewport, where on the lungs' hull it lay over the left lung's."""
    c = findings.classification
    model = c.model if c is not None else _first_model(findings)
    called, measurements = None, []
    if c is not None:
        called = next(p for p in c.probabilities if p.key == c.predicted)
        measurements.append(_probability(called))
        thresholded = thresholded_class(c)
        if c.threshold is not None and thresholded is not None:
            measurements.append(
                Measurement(
                    name=threshold_of(thresholded.code),
                    value=round(c.threshold * 100, 2),
                    unit=PERCENT,
                )
            )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier="AI result"),
        referenced_region=_region(series, frame, _caption_band(series)),
        finding_type=coded(called.code) if called is not None else None,
        algorithm_id=algorithm(model, c.threshold if c else None) if model else None,
        measurements=measurements or None,
    )


def _lungs_group(
    findings: Findings,
    series: LoadedSeries,
    frame: int,
    tracking_uid: str,
    measurements: list[Measurement],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The measurements about both lungs (the percent involved) on the key image's frame:
    a region of their own, apart from the verdict's and the lungs' outlines, whose text a
    viewer writes at the image's right edge."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier="Both lungs"),
        referenced_region=_region(series, frame, _image_frame(series)),
        finding_type=codes.SCT.Lung,
        algorithm_id=_first_algorithm(findings),
        measurements=measurements or None,
    )


def _probability(p: ClassProbability) -> Measurement:
    """'COVID-19 probability: 52 %'."""
    return Measurement(
        name=probability_of(p.code), value=round(p.probability * 100, 2), unit=PERCENT
    )


def _class_groups(
    classification: Classification,
    key_image: hd.sr.SourceImageForMeasurementGroup,
    tracking_uid: str,
) -> list[MeasurementsAndQualitativeEvaluations]:
    """TID 1501: one group per class not called, its finding type the class, with its
    probability; the called class's is in the verdict group."""
    algorithm_id = algorithm(classification.model, classification.threshold)
    return [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid, identifier=f"probability {p.key}"
            ),
            finding_type=coded(p.code),
            algorithm_id=algorithm_id,
            measurements=[_probability(p)],
            source_images=[key_image],
        )
        for p in classification.probabilities
        if p.key != classification.predicted
    ]


def _segment_group(
    mask: Mask,
    segment: SegmentRef,
    series: LoadedSeries,
    tracking: TrackingIdentifier,
    measurements: list[Measurement],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group about one SEG segment; its measurements are here only when the mask
    has no outline to carry them."""
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=segment.segmentation.SOPClassUID,
        sop_instance_uid=segment.segmentation.SOPInstanceUID,
        segment_number=segment.number,
        source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=referenced,
        finding_type=coded(mask.property_type),
        algorithm_id=algorithm(mask.model),
        measurements=measurements or None,
    )


def _outline_group(
    series: LoadedSeries,
    frame: int,
    outline: Outline,
    *,
    tracking_uid: str,
    label: str,
    finding_type: CodedConcept | None,
    algorithm_id: AlgorithmIdentification | None,
    measurements: list[Measurement],
) -> MeasurementsAndQualitativeEvaluations:
    """One outlined region as a group viewers can draw, and OHIF can also list: a TID 1501
    group whose first NUM is the region's area INFERRED FROM the outline (TID 300), the form
    Cornerstone's SR adapter (OHIF 3.x) loads into its measurement panel as a freehand ROI
    when the tracking identifier names that tool; then the region's other measurements.
    On a film without a pixel size the area is a count of pixels, not mm2.
    """
    x, y = outline.points[:, 0].astype(float), outline.points[:, 1].astype(float)
    pixels = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    region = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline.points,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    region.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.SourceImageForRegion.from_source_image(*_source(series, frame))]
    )
    physical = series.modality == "CT" or projection_spacing(series.datasets[0]) is not None
    area = hd.sr.NumContentItem(
        name=codes.SCT.Area,
        value=round(pixels * float(series.spacing[1]) * float(series.spacing[2]), 1)
        if physical else round(pixels, 1),
        unit=codes.UCUM.SquareMillimeter if physical else PIXELS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    area.ContentSequence = hd.sr.ContentSequence([region])
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid, identifier=outline_identifier(label)
        ),
        measurements=[Measurement.from_sequence([area]), *measurements],
        finding_type=finding_type,
        algorithm_id=algorithm_id,
    )


def _measurement(m: FindingsMeasurement, site: bool = True) -> Measurement:
    """One NUM item, with its finding site unless `site` is False; its algorithm is the one
    named by the group it sits in."""
    return Measurement(
        name=coded(m.name),
        value=m.value,
        unit=coded(m.unit),
        finding_sites=[FindingSite(coded(m.finding_site))] if site and m.finding_site else None,
    )
