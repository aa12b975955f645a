"""The SEG, GSPS, SR and SC writers on real source DICOM, checked by dciodvfy, dsrdump and
highdicom.

The findings are built by hand (synthetic masks and probabilities): these tests are about the
encoding, not about any model. What viewers need of the objects (OHIF's SR, a radiograph
overlay without patient geometry, readable colours and text) is checked here in pydicom; the
browser test checks what OHIF then draws.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from covid_plugin.findings import (
    Classification,
    ClassProbability,
    Code,
    Findings,
    Mask,
    Measurement,
    ModelInfo,
)
from covid_plugin.outputs import OutputError, OutputSettings, write_all
from covid_plugin.outputs.regions import key_frame
from covid_plugin.volume import LoadedSeries, load_series, load_series_files
from tests.conftest import CHEST_CR, DATA, rider_files
from tests.dicom_validators import (
    dciodvfy_errors,
    dcmpschk_passes,
    dsrdump,
    requires_dciodvfy,
    requires_dcmpschk,
    requires_dsrdump,
)

ENHANCED_CT = DATA / "dicom" / "nema-mfct_CT0012_enhanced-ct-multiframe"
CLASSIFIER = ModelInfo("cxr-covid", "1.2.0", "0f" * 32)
LESION_MODEL = ModelInfo("ct-lesion", "0.3.0", "a1" * 32)
LUNG_MODEL = ModelInfo("ct-lung-hu", "1.0.0", "rule-based")
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
LUNG = Code("39607008", "SCT", "Lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
GGO = Code("112120", "DCM", "Ground glass opacity")
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
COVID = Code("840539006", "SCT", "COVID-19")
NORMAL = Code("17621005", "SCT", "Normal")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
LESION = Code("52988006", "SCT", "Lesion")
VOLUME = Code("118565006", "SCT", "Volume")
EXTENT = Code("260858005", "SCT", "Extent")
ML = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")


def classification() -> Classification:
    return Classification(
        model=CLASSIFIER,
        probabilities=[
            ClassProbability("covid", COVID, 0.81),
            ClassProbability("pneumonia_other", PNEUMONIA, 0.12),
            ClassProbability("normal", NORMAL, 0.07),
        ],
        predicted="covid",
        threshold=0.5,
    )


def ct_findings(series: LoadedSeries) -> Findings:
    """Lungs in every slice, GGO in a block of slices, consolidation in a few, all in a lung."""
    shape = series.array.shape
    right = np.zeros(shape, bool)
    right[:, 150:380, 60:260] = True
    left = np.zeros(shape, bool)
    left[:, 150:380, 260:460] = True
    ggo = np.zeros(shape, bool)
    ggo[10:20, 200:260, 100:180] = True
    ggo[30, 200:300, 100:300] = True  # the single largest lesion slice: the key slice
    consolidation = np.zeros(shape, bool)
    consolidation[12:15, 300:320, 300:340] = True
    masks = [
        Mask("lung_right", "Right lung", ANATOMY, RIGHT_LUNG, right, LUNG_MODEL, RIGHT_LUNG),
        Mask("lung_left", "Left lung", ANATOMY, LEFT_LUNG, left, LUNG_MODEL, LEFT_LUNG),
        Mask("ggo", "Ground glass opacity", ALTERED, GGO, ggo, LESION_MODEL, LUNG),
        Mask("consolidation", "Consolidation", ALTERED, CONSOLIDATION, consolidation, LESION_MODEL),
    ]
    return Findings(
        kind="ct",
        series_instance_uid=series.series_instance_uid,
        classification=classification(),
        masks=masks,
        measurements=[
            Measurement(VOLUME, 780.2, ML, "lung_right"),
            Measurement(VOLUME, 750.0, ML, "lung_left"),
            Measurement(VOLUME, 41.7, ML, "ggo"),
            Measurement(VOLUME, 1.9, ML, "consolidation"),
            Measurement(EXTENT, 2.85, PERCENT, None, LUNG),
        ],
        models=[CLASSIFIER, LESION_MODEL, LUNG_MODEL],
        notes=["Only 60 slices: the lung apices are not covered."],
    )


def cxr_findings(series: LoadedSeries, predicted: str = "covid") -> Findings:
    """Two lungs, a heat blob in the right one, and (for an abnormal call) its region."""
    heatmap = np.zeros(series.array.shape, np.float32)
    heatmap[0, 600:1200, 300:800] = 0.9
    lungs = np.zeros(series.array.shape, bool)
    lungs[0, 300:1500, 200:850] = True
    lungs[0, 300:1500, 1000:1600] = True
    masks = [Mask("lungs", "Lungs", ANATOMY, LUNG, lungs, LUNG_MODEL)]
    if predicted != "normal":
        masks.append(Mask("suspicious_region", "Region driving the classification", ALTERED,
                          LESION, heatmap >= 0.5, CLASSIFIER, LUNG))
    c = classification()
    c.predicted = predicted
    return Findings(
        kind="cxr",
        series_instance_uid=series.series_instance_uid,
        classification=c,
        masks=masks,
        heatmap=heatmap,
        models=[CLASSIFIER, LUNG_MODEL],
    )


@pytest.fixture(scope="module")
def ct_series() -> LoadedSeries:
    return load_series_files(rider_files())


@pytest.fixture(scope="module")
def cr_series() -> LoadedSeries:
    return load_series_files([CHEST_CR])


@pytest.fixture(scope="module")
def ct_objects(ct_series: LoadedSeries, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save(write_all(ct_findings(ct_series), ct_series), tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def cr_objects(cr_series: LoadedSeries, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save(write_all(cxr_findings(cr_series), cr_series), tmp_path_factory.mktemp("cr"))


def save(objects: list[pydicom.Dataset], folder: Path) -> list[Path]:
    paths = []
    for obj in objects:
        path = folder / f"{obj.SeriesNumber}_{obj.Modality}.dcm"
        obj.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def one(paths: list[Path], modality: str) -> Path:
    """The one object of a modality among `paths` (saved as <series number>_<modality>.dcm)."""
    (path,) = [p for p in paths if p.stem.endswith(f"_{modality}")]
    return path


def segs(paths: list[Path]) -> list[pydicom.Dataset]:
    """The SEG objects among `paths`: lungs first, then lesions."""
    return [pydicom.dcmread(p) for p in paths if p.stem.endswith("_SEG")]


@pytest.mark.data
def test_write_all_makes_seg_sr_sc_in_new_series_of_the_source_study(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    objects = [pydicom.dcmread(p) for p in ct_objects]
    assert [o.Modality for o in objects] == ["SEG", "SEG", "SR", "OT"]
    assert [o.SeriesDescription[:-17] for o in objects[:2]] == ["AI lungs (RUO)",
                                                                "AI lesions (RUO)"]
    source = ct_series.datasets[0]
    series_uids = {o.SeriesInstanceUID for o in objects}
    assert len(series_uids) == 4 and source.SeriesInstanceUID not in series_uids
    for obj in objects:
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.PatientID == source.PatientID
        assert obj.Manufacturer == "covid_plugin"


@pytest.mark.data
@requires_dciodvfy
@pytest.mark.parametrize("objects", ["ct_objects", "cr_objects"])
def test_every_object_passes_dciodvfy(objects: str, request: pytest.FixtureRequest) -> None:
    for path in request.getfixturevalue(objects):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.data
@pytest.mark.dcmtk
@requires_dcmpschk
def test_presentation_state_passes_dcmpschk(cr_objects: list[Path]) -> None:
    assert dcmpschk_passes(one(cr_objects, "PR"))


@pytest.mark.data
@pytest.mark.dcmtk
@requires_dsrdump
def test_sr_parses_and_carries_the_coded_report(ct_objects: list[Path]) -> None:
    text = dsrdump(one(ct_objects, "SR"))
    for expected in (
        "Imaging Measurement Report",
        '(169069000,SCT,"Computed tomography of chest")',
        '(121007,DCM,"Device")',
        "Device Observer UID",
        '(840539006,SCT,"COVID-19")',
        'NUM:(,,"COVID-19 probability")="81',
        'NUM:(,,"COVID-19 decision threshold")="50',
        '(%,UCUM,"percent")',
        'SCOORD:(,,"Image Region")=(POLYLINE,',
        'CONTAINER:(,,"Qualitative Evaluations")',
        'NUM:(,,"Volume")="41.7" (mL,UCUM,"milliliter")',
        'NUM:(,,"Extent")="2.85" (%,UCUM,"percent")',
        '"Algorithm Name")="ct-lesion"',
        f'"Algorithm Parameters")="weights_sha256={"a1" * 32}"',
        '"Algorithm Parameters")="threshold=0.5"',
        '"Referenced Segment")=(SG image,,1)',
        "Source Series for Segmentation",
        "Research use only; not for diagnosis",
        "lung apices are not covered",
    ):
        assert expected in text, expected


@pytest.mark.data
def test_sr_references_the_segs_and_the_source_images(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    lungs, lesions = segs(ct_objects)
    sr = hd.sr.srread(one(ct_objects, "SR"))
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    sources = {ds.SOPInstanceUID for ds in ct_series.datasets}
    assert evidence == sources | {lungs.SOPInstanceUID, lesions.SOPInstanceUID}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    expected = [(lungs, 1), (lungs, 2), (lesions, 1), (lesions, 2)]
    assert len(groups) == len(expected)
    for group, (seg, number) in zip(groups, expected, strict=True):
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [number]
        # the SR's tracking UID is the SEG segment's, so a viewer can join them
        assert str(group.tracking_uid) == seg.SegmentSequence[number - 1].TrackingUID


@pytest.mark.data
def test_seg_frames_are_registered_to_the_source_slices(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    lungs, lesions = (hd.seg.segread(p) for p in ct_objects if p.stem.endswith("_SEG"))
    for seg in (lungs, lesions):
        assert seg.SegmentationType == "BINARY" and seg.SegmentsOverlap == "NO"
        assert seg.number_of_segments == 2
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    algorithm = lesions.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct-lesion", "0.3.0")
    # empty frames omitted: 2 x 60 lung frames; 11 GGO frames + 3 consolidation frames
    assert lungs.NumberOfFrames == 2 * 60 and lesions.NumberOfFrames == 11 + 3
    findings = ct_findings(ct_series)
    uids = [ds.SOPInstanceUID for ds in ct_series.datasets]
    for index in (12, 30, 45):
        for seg, masks in ((lungs, findings.masks[:2]), (lesions, findings.masks[2:])):
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[uids[index]], segment_numbers=[1, 2],
                assert_missing_frames_are_empty=True,
            )
            for number, mask in enumerate(masks):
                np.testing.assert_array_equal(pixels[0, ..., number], mask.array[index])
    for seg in (lungs, lesions):
        for frame in seg.PerFrameFunctionalGroupsSequence:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            index = uids.index(source.ReferencedSOPInstanceUID)
            assert [float(v) for v in position] == pytest.approx(ct_series.positions[index])


@pytest.mark.data
def test_overlapping_masks_of_one_group_are_encoded_as_overlapping(
    ct_series: LoadedSeries,
) -> None:
    """Segments of one SEG normally do not overlap; when a pipeline's masks do, the SEG says
    so and keeps every pixel of each."""
    findings = ct_findings(ct_series)
    findings.masks[3].array = findings.masks[2].array.copy()  # consolidation == GGO
    lesions = write_all(findings, ct_series)[1]
    assert lesions.SeriesDescription.startswith("AI lesions (RUO)")
    assert lesions.SegmentsOverlap == "YES"
    seg = hd.seg.Segmentation.from_dataset(lesions)
    uid = ct_series.datasets[30].SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[0, ..., 0], pixels[0, ..., 1])
    assert pixels[0, ..., 0].sum() == findings.masks[2].array[30].sum()


@pytest.mark.data
def test_empty_frames_are_kept_when_asked(ct_series: LoadedSeries) -> None:
    settings = OutputSettings(omit_empty_frames=False)
    findings = ct_findings(ct_series)
    lungs, lesions = write_all(findings, ct_series, settings)[:2]
    assert lungs.NumberOfFrames == lesions.NumberOfFrames == 2 * len(ct_series.datasets)


@pytest.mark.data
def test_secondary_capture_shows_the_key_slice(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    sc = pydicom.dcmread(one(ct_objects, "OT"))
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    assert "RESEARCH USE ONLY" in sc.ImageComments
    assert key_frame(ct_findings(ct_series).masks, len(ct_series.datasets)) == 30
    reference = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert reference == ct_series.datasets[30].SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape[1] == 512 and pixels.shape[0] > 512  # image plus text banner
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 180) & (pixels[..., 2] < 80)
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 80) & (pixels[..., 1] < 180)
    assert yellow[200:301, 100:301].sum() > 100  # GGO outline
    assert green[150:381, 60:261].sum() > 300  # right lung outline
    assert blue[150:381, 261:461].sum() > 300  # left lung outline, another colour
    assert pixels[512:].max() > 200  # burned-in text


@pytest.mark.data
def test_radiograph_objects_read_back(cr_series: LoadedSeries, cr_objects: list[Path]) -> None:
    pr_path, sr_path, sc_path = cr_objects
    assert pydicom.dcmread(pr_path).Modality == "PR"
    sr_text = pydicom.dcmread(sr_path)
    assert sr_text.ContentSequence  # a readable tree; dciodvfy checks its validity
    sc = pydicom.dcmread(sc_path)
    # the 1955 x 1841 radiograph is scaled to a longer side of 1024, with the banner below
    assert sc.Columns == round(1841 * OutputSettings().sc_max_size / 1955)
    assert sc.Rows > OutputSettings().sc_max_size
    heat = sc.pixel_array[320:620, 160:410].astype(int)  # heatmap area, scaled by 1024/1955
    assert ((heat[..., 1] + heat[..., 2]) / 2 - heat[..., 0]).mean() > 40  # tinted cyan


@pytest.mark.data
def test_findings_without_masks_make_no_seg_or_gsps(cr_series: LoadedSeries) -> None:
    findings = Findings("cxr", cr_series.series_instance_uid, classification(), models=[CLASSIFIER])
    objects = write_all(findings, cr_series)
    assert [o.Modality for o in objects] == ["SR", "OT"]


@pytest.mark.data
def test_seg_on_enhanced_multiframe_source_keeps_source_frame_order() -> None:
    series = load_series_files([ENHANCED_CT / "CT0012.not_fragmented_bot_rle.dcm"])
    mask = np.zeros(series.array.shape, bool)
    mask[0, 100:200, 100:200] = True  # array frame 0 is source frame 2
    findings = Findings(
        "ct",
        series.series_instance_uid,
        masks=[Mask("lesion", "Lesion", ALTERED, GGO, mask, LESION_MODEL)],
    )
    seg = write_all(findings, series)[0]
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert seg.NumberOfFrames == 1
    assert derivation.SourceImageSequence[0].ReferencedFrameNumber == 2


@pytest.mark.data
def test_defective_source_header_gives_an_output_error_with_the_series_uid() -> None:
    datasets = [pydicom.dcmread(p) for p in rider_files(3)]
    for ds in datasets:
        del ds.PatientName  # Type 2 in the Patient module: highdicom needs it to copy the module
        ds.PatientID = "SECRET-ID-42"
    series = load_series(datasets)
    findings = Findings("ct", series.series_instance_uid, classification())
    with pytest.raises(OutputError, match="PatientName") as info:
        write_all(findings, series)
    assert info.value.series_uid == series.series_instance_uid
    assert "SECRET-ID-42" not in info.value.reason  # reasons carry no header values


# --- what viewers need (issue 11) -------------------------------------------------------------


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    measurements = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER")
    return [g for g in measurements.ContentSequence if g.ValueType == "CONTAINER"]


def _image_references(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    """IMAGE items below `item`, as OHIF looks for them (directly or under an SCOORD)."""
    found = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "IMAGE":
            found.append(child)
        found.extend(_image_references(child))
    return found


def _regions(group: pydicom.Dataset) -> list[pydicom.Dataset]:
    """A group's image regions: SCOORDs at its top level (TID 1410) or under a NUM (TID 300)."""
    found = []
    for item in group.ContentSequence:
        if item.ValueType == "SCOORD":
            found.append(item)
        elif item.ValueType == "NUM":
            found.extend(c for c in item.get("ContentSequence", []) if c.ValueType == "SCOORD")
    return found


def _finding(group: pydicom.Dataset) -> str | None:
    return next((str(i.ConceptCodeSequence[0].CodeMeaning) for i in group.ContentSequence
                 if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"),
                None)


@pytest.mark.data
def test_sr_outlines_lungs_and_lesions_on_the_key_slice(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    sr = pydicom.dcmread(one(ct_objects, "SR"))
    outlined = [(g, _regions(g)[0]) for g in _groups(sr) if _regions(g)]
    # the verdict (the key image's frame), one outline per lung and per lesion type, and the
    # region of the measurements about both lungs
    assert [_finding(g) for g, _ in outlined] == [
        "COVID-19", "Right lung", "Left lung", "Ground glass opacity", "Lung consolidation",
        "Lung"]
    uids = [ds.SOPInstanceUID for ds in ct_series.datasets]
    slices = []
    for _, region in outlined:
        assert region.GraphicType == "POLYLINE"
        points = np.reshape(region.GraphicData, (-1, 2))
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        image = region.ContentSequence[0]
        slices.append(uids.index(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    # the key slice (largest lesion area, index 30) except for the consolidation, which is
    # absent there and outlined on its own largest slice
    assert slices[:4] == [30, 30, 30, 30] and slices[4] in (12, 13, 14) and slices[5] == 30
    ggo_group, ggo = outlined[3]
    points = np.reshape(ggo.GraphicData, (-1, 2))
    xs, ys = points[:, 0], points[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == pytest.approx((100, 300, 200, 300), abs=1)
    area = next(i for i in ggo_group.ContentSequence if i.ValueType == "NUM")
    assert area.ConceptNameCodeSequence[0].CodeMeaning == "Area"
    spacing = ct_series.spacing[1] * ct_series.spacing[2]
    value = float(area.MeasuredValueSequence[0].NumericValue)
    assert value == pytest.approx(100 * 200 * spacing, rel=0.03)


def _ohif_measurements(sr: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    """Groups merged by tracking UID, as OHIF's SR extension (3.13) builds its measurements."""
    merged: dict[str, list[pydicom.Dataset]] = {}
    for group in _groups(sr):
        uid = next(i.UID for i in group.ContentSequence if i.ValueType == "UIDREF"
                   and i.ConceptNameCodeSequence[0].CodeValue == "112040")
        merged.setdefault(uid, []).append(group)
    return merged


@pytest.mark.data
@pytest.mark.parametrize("objects", ["ct_objects", "cr_objects"])
def test_every_merged_measurement_has_an_image_region_ohif_can_place(
    objects: str, request: pytest.FixtureRequest
) -> None:
    """OHIF reads coords[0].ReferencedSOPSequence of each measurement; a group without an
    SCOORD (in itself or a group with its tracking UID) leaves it with a blank viewport."""
    sr = pydicom.dcmread(one(request.getfixturevalue(objects), "SR"))
    for groups in _ohif_measurements(sr).values():
        regions = [r for g in groups for r in _regions(g)]
        assert regions, [g.ContentSequence[0].TextValue for g in groups]
        image = regions[0].ContentSequence[0]
        assert image.ValueType == "IMAGE"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID


@pytest.mark.data
@pytest.mark.parametrize("objects", ["ct_objects", "cr_objects"])
def test_outlines_load_into_cornerstone_tools(
    objects: str, request: pytest.FixtureRequest
) -> None:
    """OHIF lists a measurement when Cornerstone's SR adapter can load its first group: the
    freehand-ROI tracking identifier and an area NUM inferred from the outline (on an image
    without a pixel size, an area in pixels). The verdict's region is a TID 1410 group with
    no area, drawn but not listed."""
    sr = pydicom.dcmread(one(request.getfixturevalue(objects), "SR"))
    listed = 0
    for groups in _ohif_measurements(sr).values():
        first = groups[0]
        if not _regions(first):
            continue
        identifier = first.ContentSequence[0].TextValue
        kinds = [item.ValueType for item in first.ContentSequence]
        names = [i.ConceptNameCodeSequence[0].CodeMeaning for i in first.ContentSequence
                 if i.ValueType == "NUM"]
        if identifier in ("AI result", "Both lungs"):  # drawn, not listed; no area
            assert "SCOORD" in kinds
            assert names == (["COVID-19 probability", "COVID-19 decision threshold"]
                             if identifier == "AI result" else ["Extent"])
            continue
        assert identifier.startswith("Cornerstone3DTools@^0.1.0:PlanarFreehandROI:")
        num = next(i for i in first.ContentSequence if i.ValueType == "NUM")
        assert num.ContentSequence[0].ValueType == "SCOORD"
        assert num.ContentSequence[0].RelationshipType == "INFERRED FROM"
        listed += 1
    assert listed == (4 if objects == "ct_objects" else 3)  # lungs and lesions; or region


@pytest.mark.data
def test_an_empty_segment_is_reported_with_the_lungs_region(ct_series: LoadedSeries) -> None:
    """No consolidation anywhere: its volume (0 mL) is still reported, and OHIF can place it,
    with both lungs, not beside the verdict."""
    findings = ct_findings(ct_series)
    findings.masks[3].array = np.zeros_like(findings.masks[3].array)
    sr = next(o for o in write_all(findings, ct_series) if o.Modality == "SR")
    merged = _ohif_measurements(sr)
    summary = next(groups for groups in merged.values()
                   if groups[0].ContentSequence[0].TextValue == "Both lungs")
    assert "Consolidation" in [g.ContentSequence[0].TextValue for g in summary]
    for groups in merged.values():
        assert any(_regions(g) for g in groups)


@pytest.mark.data
def test_every_measurement_group_references_an_image(ct_objects: list[Path]) -> None:
    sr = pydicom.dcmread(one(ct_objects, "SR"))
    for group in _groups(sr):
        references = _image_references(group)
        assert references, group.ContentSequence[0].TextValue
        assert all(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for ref in references)


@pytest.mark.data
def test_radiograph_overlay_is_a_presentation_state_with_outlines(
    cr_series: LoadedSeries, cr_objects: list[Path]
) -> None:
    """No SEG for a radiograph (no patient geometry; OHIF fails on one): a GSPS instead."""
    pr = pydicom.dcmread(one(cr_objects, "PR"))
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        cr_series.datasets[0].SOPInstanceUID
    )
    layers = {layer.GraphicLayer: layer for layer in pr.GraphicLayerSequence}
    assert {"LUNGS", "REGION", "AI_RESULT"} <= set(layers)
    colours = {tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) for layer in layers.values()}
    assert len(colours) == len(layers)
    by_layer = {a.GraphicLayer: a for a in pr.GraphicAnnotationSequence}
    lungs = by_layer["LUNGS"].GraphicObjectSequence
    assert len(lungs) == 2  # one outline per lung
    for graphic in lungs:
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        points = np.reshape(graphic.GraphicData, (-1, 2))
        np.testing.assert_array_equal(points[0], points[-1])
    text = by_layer["AI_RESULT"].TextObjectSequence[0].UnformattedTextValue
    assert "COVID-19 81 %" in text
    sr = hd.sr.srread(one(cr_objects, "SR"))
    planar = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.finding_type.meaning) for g in planar] == ["COVID-19"]  # the verdict
    outlined = [str(g.finding_type.meaning) for g in sr.content.get_image_measurement_groups()
                if g.finding_type is not None]
    assert {"Right lung", "Left lung", "Lesion"} <= set(outlined)


@pytest.mark.data
def test_segments_have_distinct_colours_that_do_not_blend(ct_objects: list[Path]) -> None:
    segments = [s for seg in segs(ct_objects) for s in seg.SegmentSequence]
    lab = [np.array(s.RecommendedDisplayCIELabValue, float) for s in segments]
    assert len({tuple(v) for v in lab}) == len(lab) == 4
    labels = [s.SegmentLabel for s in segments]
    colours = dict(zip(labels, lab, strict=True))
    # GGO and consolidation far apart in hue (a* is red-green, b* is yellow-blue)
    ggo, consolidation = colours["Ground glass opacity"], colours["Consolidation"]
    assert np.linalg.norm(ggo - consolidation) > 20000  # CIELab scaled to 0..65535


@pytest.mark.data
def test_sc_text_names_values_threshold_and_key_image_as_viewers_do(
    ct_series: LoadedSeries,
) -> None:
    from covid_plugin.outputs.regions import key_image_label
    from covid_plugin.outputs.text import summary_lines

    lines = summary_lines(ct_findings(ct_series))
    assert "Result: COVID-19 (COVID-19 81 %, Pneumonia 12 %, Normal 7 %)" in lines
    threshold = "Called COVID-19 when its probability p >= 50 %"
    assert any(line.startswith(threshold) for line in lines)
    # the key slice is named by its InstanceNumber and z, not its index from the first slice
    key = ct_series.datasets[30]
    z = ct_series.positions[30][2]
    assert key_image_label(ct_series, 30) == f"image {key.InstanceNumber}, z = {z:.1f} mm"


@pytest.mark.data
def test_sc_banner_has_a_colour_legend(ct_objects: list[Path]) -> None:
    pixels = pydicom.dcmread(one(ct_objects, "OT")).pixel_array[512:].astype(int)
    magenta = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] > 180)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 180)
    assert magenta.sum() > 50 and blue.sum() > 50  # consolidation and left-lung swatches


@pytest.mark.data
def test_no_heatmap_is_drawn_on_a_normal_call(cr_series: LoadedSeries) -> None:
    sc = write_all(cxr_findings(cr_series, predicted="normal"), cr_series)[-1]
    heat = sc.pixel_array[320:620, 160:410].astype(int)
    assert np.abs(heat[..., 0] - heat[..., 2]).max() == 0  # grey, as the source


@pytest.mark.data
def test_every_object_is_dated_and_names_its_processing_algorithms(
    ct_objects: list[Path], cr_objects: list[Path]
) -> None:
    for path in ct_objects + cr_objects:
        obj = pydicom.dcmread(path)
        assert obj.SeriesDate and obj.SeriesTime, path.name
        # the name first (viewers cut long descriptions off), then the run time
        assert len(obj.SeriesDescription[:-17]) <= 24, obj.SeriesDescription
        algorithms = [
            item
            for item in obj.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        ]
        names = {item.ManufacturerModelName for item in algorithms}
        assert CLASSIFIER.name in names and LUNG_MODEL.name in names, path.name
        classifier = next(i for i in algorithms if i.ManufacturerModelName == CLASSIFIER.name)
        assert classifier.SoftwareVersions == CLASSIFIER.version
        assert CLASSIFIER.sha256 in classifier.ContributionDescription
        assert classifier.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"


@pytest.mark.data
def test_sc_is_explicit_vr_and_names_the_study(ct_objects: list[Path], ct_series) -> None:
    sc = pydicom.dcmread(one(ct_objects, "OT"))
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sc.StudyDescription == ct_series.datasets[0].StudyDescription


@pytest.mark.data
@pytest.mark.parametrize("birth_date", ["00000000", "1950"])
def test_non_standard_birth_date_is_left_empty_not_fatal(birth_date: str) -> None:
    datasets = [pydicom.dcmread(p) for p in rider_files(3)]
    for ds in datasets:
        ds.PatientBirthDate = birth_date
    series = load_series(datasets)
    objects = write_all(ct_findings_small(series), series)
    assert objects and all(not obj.PatientBirthDate for obj in objects)


def ct_findings_small(series: LoadedSeries) -> Findings:
    lung = np.zeros(series.array.shape, bool)
    lung[:, 150:380, 60:460] = True
    return Findings("ct", series.series_instance_uid, classification(),
                    masks=[Mask("lungs", "Lungs", ANATOMY, LUNG, lung, LUNG_MODEL)])


@pytest.mark.data
def test_our_own_bugs_are_not_reported_as_unencodable_results(
    ct_series: LoadedSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    import covid_plugin.outputs as outputs

    def broken(*args, **kwargs):
        raise ValueError("a bug in our code")

    monkeypatch.setattr(outputs, "build_secondary_capture", broken)
    with pytest.raises(ValueError, match="a bug in our code") as info:
        write_all(ct_findings(ct_series), ct_series)
    assert not isinstance(info.value, OutputError)


def test_no_highdicom_class_is_subclassed_to_override_its_internals() -> None:
    """Public highdicom API only: a subclass overriding a private method breaks silently."""
    import inspect

    import covid_plugin.outputs as outputs
    from covid_plugin.outputs import declined, pr, sc, seg, sr

    for module in (outputs, declined, pr, sc, seg, sr):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                assert not any(b.__module__.startswith("highdicom") for b in cls.__mro__), cls


@pytest.mark.data
@requires_dciodvfy
@pytest.mark.dcmtk
@requires_dsrdump
def test_declined_series_gets_a_short_valid_sr_that_says_why(
    cr_series: LoadedSeries, tmp_path: Path
) -> None:
    from covid_plugin.outputs import write_declined

    reason = "lateral view (ViewPosition LL); only frontal films"
    (report,) = write_declined(cr_series, reason, models=[CLASSIFIER])
    path = tmp_path / "declined.dcm"
    report.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    text = dsrdump(path)
    assert f"Not analysed by the AI: {reason}" in text and "Research use only" in text
    assert report.SeriesDate and len(report.SeriesDescription[:-17]) <= 24
    assert report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr_series.datasets[0].SOPInstanceUID


@pytest.mark.data
def test_lungs_too_small_to_outline_leave_the_whole_image_as_the_region(
        cr_series: LoadedSeries) -> None:
    """A lung mask of one pixel has no outline: the report still gets written (it raised an
    IndexError before, so the job failed with no SR at all)."""
    findings = cxr_findings(cr_series, predicted="normal")
    tiny = np.zeros(cr_series.array.shape, bool)
    tiny[0, 700, 700] = True
    findings.masks[0].array = tiny
    objects = write_all(findings, cr_series)
    assert "SR" in [o.Modality for o in objects]
