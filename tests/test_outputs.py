"""The SEG, SR and SC writers on real source DICOM, checked by dciodvfy, dsrdump and highdicom.

The findings are built by hand (synthetic masks and probabilities): these tests are about the
encoding, not about any model.
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
from covid_plugin.outputs.sc import key_frame
from covid_plugin.volume import LoadedSeries, load_series, load_series_files
from tests.conftest import CHEST_CR, DATA, rider_files
from tests.dicom_validators import dciodvfy_errors, dsrdump, requires_dciodvfy, requires_dsrdump

ENHANCED_CT = DATA / "dicom" / "nema-mfct_CT0012_enhanced-ct-multiframe"
CLASSIFIER = ModelInfo("cxr-covid", "1.2.0", "0f" * 32)
LESION_MODEL = ModelInfo("ct-lesion", "0.3.0", "a1" * 32)
LUNG_MODEL = ModelInfo("ct-lung-hu", "1.0.0", "rule-based")
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
LUNG = Code("39607008", "SCT", "Lung")
GGO = Code("112120", "DCM", "Ground glass opacity")
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
COVID = Code("840539006", "SCT", "COVID-19")
NORMAL = Code("17621005", "SCT", "Normal")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
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
    """Lung in every slice, GGO in a block of slices, consolidation in a few, all in the lung."""
    shape = series.array.shape
    lung = np.zeros(shape, bool)
    lung[:, 150:380, 60:460] = True
    ggo = np.zeros(shape, bool)
    ggo[10:20, 200:260, 100:180] = True
    ggo[30, 200:300, 100:300] = True  # the single largest lesion slice: the key slice
    consolidation = np.zeros(shape, bool)
    consolidation[12:15, 300:320, 300:340] = True
    masks = [
        Mask("lung", "Lung", ANATOMY, LUNG, lung, LUNG_MODEL, LUNG),
        Mask("ggo", "Ground glass opacity", ALTERED, GGO, ggo, LESION_MODEL, LUNG),
        Mask("consolidation", "Consolidation", ALTERED, CONSOLIDATION, consolidation, LESION_MODEL),
    ]
    return Findings(
        kind="ct",
        series_instance_uid=series.series_instance_uid,
        classification=classification(),
        masks=masks,
        measurements=[
            Measurement(VOLUME, 1530.2, ML, "lung"),
            Measurement(VOLUME, 41.7, ML, "ggo"),
            Measurement(VOLUME, 1.9, ML, "consolidation"),
            Measurement(EXTENT, 2.85, PERCENT, None, LUNG),
        ],
        models=[CLASSIFIER, LESION_MODEL, LUNG_MODEL],
        notes=["Only 60 slices: the lung apices are not covered."],
    )


def cxr_findings(series: LoadedSeries) -> Findings:
    heatmap = np.zeros(series.array.shape, np.float32)
    heatmap[0, 600:1200, 300:800] = 0.9
    lung = np.zeros(series.array.shape, bool)
    lung[0, 300:1500, 200:1600] = True
    return Findings(
        kind="cxr",
        series_instance_uid=series.series_instance_uid,
        classification=classification(),
        masks=[Mask("lung", "Lung", ANATOMY, LUNG, lung, LUNG_MODEL, LUNG)],
        heatmap=heatmap,
        models=[CLASSIFIER],
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
        path = folder / f"{obj.Modality}.dcm"
        obj.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_write_all_makes_seg_sr_sc_in_new_series_of_the_source_study(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    objects = [pydicom.dcmread(p) for p in ct_objects]
    assert [o.Modality for o in objects] == ["SEG", "SR", "OT"]
    source = ct_series.datasets[0]
    series_uids = {o.SeriesInstanceUID for o in objects}
    assert len(series_uids) == 3 and source.SeriesInstanceUID not in series_uids
    for obj in objects:
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.PatientID == source.PatientID
        assert obj.Manufacturer == "covid_plugin"


@requires_dciodvfy
@pytest.mark.parametrize("objects", ["ct_objects", "cr_objects"])
def test_every_object_passes_dciodvfy(objects: str, request: pytest.FixtureRequest) -> None:
    for path in request.getfixturevalue(objects):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.dcmtk
@requires_dsrdump
def test_sr_parses_and_carries_the_coded_report(ct_objects: list[Path]) -> None:
    text = dsrdump(ct_objects[1])
    for expected in (
        "Imaging Measurement Report",
        '(169069000,SCT,"Computed tomography of chest")',
        '(121007,DCM,"Device")',
        "Device Observer UID",
        '(840539006,SCT,"COVID-19")',
        'NUM:(,,"Probability")="0.81" (1,UCUM,"no units")',
        'NUM:(,,"Volume")="41.7" (mL,UCUM,"milliliter")',
        'NUM:(,,"Extent")="2.85" (%,UCUM,"percent")',
        '"Algorithm Name")="ct-lesion"',
        f'"Algorithm Parameters")="weights_sha256={"a1" * 32}"',
        '"Algorithm Parameters")="threshold=0.5"',
        '"Referenced Segment")=(SG image,,2)',
        "Source Series for Segmentation",
        "Research use only; not for diagnosis",
        "lung apices are not covered",
    ):
        assert expected in text, expected


def test_sr_references_the_seg_and_the_source_images(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    seg = pydicom.dcmread(ct_objects[0])
    sr = hd.sr.srread(ct_objects[1])
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in ct_series.datasets} | {seg.SOPInstanceUID}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    for number, group in enumerate(groups, start=1):
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [number]
        # the SR's tracking UID is the SEG segment's, so a viewer can join them
        assert str(group.tracking_uid) == seg.SegmentSequence[number - 1].TrackingUID


def test_seg_frames_are_registered_to_the_source_slices(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    seg = hd.seg.segread(ct_objects[0])
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 3
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    algorithm = seg.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct-lesion", "0.3.0")
    # empty frames omitted: 60 lung frames + 11 GGO frames + 3 consolidation frames
    assert seg.NumberOfFrames == 60 + 11 + 3
    findings = ct_findings(ct_series)
    uids = [ds.SOPInstanceUID for ds in ct_series.datasets]
    for index in (12, 30, 45):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[index]], segment_numbers=[1, 2, 3]
        )
        for number, mask in enumerate(findings.masks):
            np.testing.assert_array_equal(pixels[0, ..., number], mask.array[index])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        index = uids.index(source.ReferencedSOPInstanceUID)
        assert [float(v) for v in position] == pytest.approx(ct_series.positions[index])


def test_empty_frames_are_kept_when_asked(ct_series: LoadedSeries) -> None:
    settings = OutputSettings(omit_empty_frames=False)
    findings = ct_findings(ct_series)
    seg = write_all(findings, ct_series, settings)[0]
    assert seg.NumberOfFrames == 3 * len(ct_series.datasets)


def test_secondary_capture_shows_the_key_slice(
    ct_series: LoadedSeries, ct_objects: list[Path]
) -> None:
    sc = pydicom.dcmread(ct_objects[2])
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    assert "RESEARCH USE ONLY" in sc.ImageComments
    assert key_frame(ct_findings(ct_series).masks, len(ct_series.datasets)) == 30
    reference = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert reference == ct_series.datasets[30].SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape[1] == 512 and pixels.shape[0] > 512  # image plus text banner
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert red[200:301, 100:301].sum() > 100  # GGO contour
    assert green[150:381, 60:461].sum() > 500  # lung contour
    assert pixels[512:].max() > 200  # burned-in text


def test_radiograph_objects_read_back(cr_series: LoadedSeries, cr_objects: list[Path]) -> None:
    seg_path, sr_path, sc_path = cr_objects
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 1 and seg.NumberOfFrames == 1
    assert seg.get_source_image_uids()[0][2] == cr_series.datasets[0].SOPInstanceUID
    sr_text = pydicom.dcmread(sr_path)
    assert sr_text.ContentSequence  # a readable tree; dciodvfy checks its validity
    sc = pydicom.dcmread(sc_path)
    # the 1955 x 1841 radiograph is scaled to a longer side of 1024, with the banner below
    assert sc.Columns == round(1841 * OutputSettings().sc_max_size / 1955)
    assert sc.Rows > OutputSettings().sc_max_size
    heat = sc.pixel_array[320:620, 160:410].astype(int)  # heatmap area, scaled by 1024/1955
    assert (heat[..., 0] - heat[..., 2]).mean() > 40  # high heat is blended towards red


def test_findings_without_masks_make_no_seg(cr_series: LoadedSeries) -> None:
    findings = Findings("cxr", cr_series.series_instance_uid, classification(), models=[CLASSIFIER])
    objects = write_all(findings, cr_series)
    assert [o.Modality for o in objects] == ["SR", "OT"]


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


def test_defective_source_header_gives_an_output_error_with_the_series_uid() -> None:
    datasets = [pydicom.dcmread(p) for p in rider_files(3)]
    for ds in datasets:
        del ds.PatientName  # Type 2 in the Patient module: highdicom needs it to copy the module
    series = load_series(datasets)
    findings = Findings("ct", series.series_instance_uid, classification())
    with pytest.raises(OutputError, match="PatientName") as info:
        write_all(findings, series)
    assert info.value.series_uid == series.series_instance_uid
