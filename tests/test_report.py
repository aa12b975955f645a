"""What a reader sees of the result objects, on the repository's own samples (dicom_samples/):
the SR names each probability by its class, the verdict carries its probability and
threshold and no area, lungs are named by side (also on a radiograph), a segment's volume
sits beside its outline, no group shows a raw finding-site code; the SC says RESEARCH USE
ONLY on the image, draws the heatmap only where it is high, keeps its top band free of text
and shows a film with non-square pixels in its physical aspect; every series description
carries the run time; and the SR's outlines of the NIH film (non-square pixels) lie on its
lungs on the pixel grid.

The findings are built by hand (real headers and pixels, synthetic masks): these tests are
about the objects, not about any model. tests/viewer/ checks what OHIF draws of them.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.draw import ellipse, polygon2mask

from covid_plugin.findings import (
    Classification,
    ClassProbability,
    Code,
    Findings,
    Mask,
    Measurement,
    ModelInfo,
)
from covid_plugin.outputs import OutputSettings, write_all
from covid_plugin.outputs.codes import LOCAL_SCHEME
from covid_plugin.volume import LoadedSeries, load_series_files
from tests.dicom_validators import dciodvfy_errors, requires_dciodvfy

SAMPLES = Path(__file__).resolve().parent.parent / "dicom_samples"
NIH_FILM = SAMPLES / "cxr-normal_nih-cxr14-PA"
CT_SAMPLE = SAMPLES / "ct-covid_covid-ct-md-P002"

MODEL = ModelInfo("test-model", "1.0", "0" * 64)
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
ALTERED = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LUNG = Code("39607008", "SCT", "Lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
GGO = Code("112120", "DCM", "Ground glass opacity")
LESION = Code("52988006", "SCT", "Lesion")
COVID = Code("840539006", "SCT", "COVID-19")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NORMAL = Code("17621005", "SCT", "Normal")
VOLUME = Code("118565006", "SCT", "Volume")
EXTENT = Code("260858005", "SCT", "Extent")
ML = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
FINDING, FINDING_SITE, AREA = "121071", "363698007", "42798000"


def classification(predicted: str) -> Classification:
    return Classification(
        MODEL,
        [ClassProbability("covid", COVID, 0.52), ClassProbability("pneumonia_other", PNEUMONIA,
                                                                  0.30),
         ClassProbability("normal", NORMAL, 0.18)],
        predicted, threshold=0.11,
    )


@pytest.fixture(scope="module")
def film() -> LoadedSeries:
    return load_series_files(sorted(NIH_FILM.glob("*.dcm")))


@pytest.fixture(scope="module")
def ct() -> LoadedSeries:
    return load_series_files(sorted(CT_SAMPLE.glob("*.dcm")))


def film_lungs(film: LoadedSeries) -> np.ndarray:
    """Two lung-shaped ellipses where the NIH film's lungs are (320 x 320 pixels)."""
    lungs = np.zeros(film.array.shape, bool)
    lungs[(0, *ellipse(150, 95, 95, 50, shape=lungs.shape[1:]))] = True  # image left
    lungs[(0, *ellipse(150, 225, 95, 50, shape=lungs.shape[1:]))] = True  # image right
    return lungs


def film_findings(film: LoadedSeries, predicted: str = "covid") -> Findings:
    lungs = film_lungs(film)
    heat = np.zeros(film.array.shape, np.float32)
    yy, xx = np.mgrid[: heat.shape[1], : heat.shape[2]]
    heat[0] = np.exp(-((yy - 150) ** 2 + (xx - 95) ** 2) / (2 * 25.0**2))  # peak 1 at (150, 95)
    return Findings(
        "cxr", film.series_instance_uid, classification(predicted),
        masks=[Mask("lungs", "Lungs", ANATOMY, LUNG, lungs, MODEL)],
        heatmap=heat, models=[MODEL],
    )


def ct_findings(ct: LoadedSeries) -> Findings:
    right = np.zeros(ct.array.shape, bool)
    right[:, 150:350, 100:240] = True
    left = np.zeros(ct.array.shape, bool)
    left[:, 150:350, 280:420] = True
    ggo = np.zeros(ct.array.shape, bool)
    ggo[10:20, 200:240, 300:340] = True
    return Findings(
        "ct", ct.series_instance_uid,
        Classification(MODEL, [ClassProbability("covid", COVID, 0.52),
                               ClassProbability("non_covid", Code("260385009", "SCT",
                                                                  "Negative"), 0.48)],
                       "covid", threshold=0.11),
        masks=[Mask("lung_right", "Right lung", ANATOMY, RIGHT_LUNG, right, MODEL),
               Mask("lung_left", "Left lung", ANATOMY, LEFT_LUNG, left, MODEL),
               Mask("ggo", "Ground glass opacity", ALTERED, GGO, ggo, MODEL, LUNG)],
        measurements=[Measurement(VOLUME, 880.1, ML, "lung_right", RIGHT_LUNG),
                      Measurement(VOLUME, 793.9, ML, "lung_left", LEFT_LUNG),
                      Measurement(EXTENT, 1.2, PERCENT, "lung_left", LEFT_LUNG),
                      Measurement(VOLUME, 16.0, ML, "ggo", LUNG),
                      Measurement(EXTENT, 0.6, PERCENT, None, LUNG)],
        models=[MODEL],
    )


def objects(findings: Findings, series: LoadedSeries) -> dict[str, pydicom.Dataset]:
    return {str(o.Modality): o for o in write_all(findings, series, OutputSettings())}


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    measurements = next(i for i in sr.ContentSequence
                        if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def finding(group: pydicom.Dataset) -> str | None:
    return next((str(i.ConceptCodeSequence[0].CodeMeaning) for i in group.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == FINDING), None)


def numbers(group: pydicom.Dataset) -> dict[str, str]:
    """The group's NUMs as OHIF prints them: concept name -> 'value unit'."""
    return {str(i.ConceptNameCodeSequence[0].CodeMeaning):
            f"{float(i.MeasuredValueSequence[0].NumericValue):g} "
            f"{i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
            for i in group.ContentSequence if i.ValueType == "NUM"}


def outline(group: pydicom.Dataset) -> np.ndarray | None:
    """The group's SCOORD (at any depth) as (n, 2) column, row."""
    def find(item):
        for child in item.get("ContentSequence", []):
            if child.ValueType == "SCOORD":
                return np.array(child.GraphicData, float).reshape(-1, 2)
            if (found := find(child)) is not None:
                return found
        return None
    return find(group)


def test_verdict_names_the_call_with_its_probability_and_threshold_and_no_area(film) -> None:
    sr = objects(film_findings(film), film)["SR"]
    verdict = groups(sr)[0]
    assert finding(verdict) == "COVID-19"
    assert numbers(verdict) == {"COVID-19 probability": "52 %",
                                "COVID-19 decision threshold": "11 %"}
    assert outline(verdict) is not None  # the region it is about, drawn by viewers
    # every class once, named by its class
    named = {name: value for g in groups(sr) for name, value in numbers(g).items()
             if name.endswith(" probability")}
    assert named == {"COVID-19 probability": "52 %", "Pneumonia probability": "30 %",
                     "Normal probability": "18 %"}
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == LOCAL_SCHEME


def test_ct_verdict_has_no_area_and_volumes_sit_beside_their_outlines(ct) -> None:
    sr = objects(ct_findings(ct), ct)["SR"]
    by_finding: dict[str, dict[str, str]] = {}
    for g in groups(sr):
        by_finding.setdefault(finding(g) or "", {}).update(numbers(g))
    verdict = numbers(groups(sr)[0])
    assert not any(name in ("Area", "Volume") for name in verdict), verdict
    assert set(by_finding["Right lung"]) >= {"Area", "Volume"}
    assert by_finding["Right lung"]["Volume"] == "880.1 mL"
    assert by_finding["Left lung"]["Extent"] == "1.2 %"
    assert by_finding["Ground glass opacity"]["Volume"] == "16 mL"
    # an outline group: area first (what OHIF's freehand loader reads), then the volumes
    right = next(g for g in groups(sr) if finding(g) == "Right lung" and outline(g) is not None)
    assert list(numbers(right)) == ["Area", "Volume"]
    # OHIF skips a NUM beside an outline that has any child but a SCOORD (a finding site)
    for g in groups(sr):
        if outline(g) is not None and not any(i.ValueType == "SCOORD" for i in g.ContentSequence):
            for num in (i for i in g.ContentSequence if i.ValueType == "NUM"):
                assert all(c.ValueType == "SCOORD" for c in num.get("ContentSequence", [])), \
                    finding(g)


def merged(sr: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    """Groups by tracking UID, as OHIF merges them into one drawn measurement."""
    by_uid: dict[str, list[pydicom.Dataset]] = {}
    for g in groups(sr):
        uid = next(str(i.UID) for i in g.ContentSequence if i.ValueType == "UIDREF")
        by_uid.setdefault(uid, []).append(g)
    return by_uid


def test_nothing_measured_is_printed_beside_the_verdict_even_an_empty_segment(ct) -> None:
    """OHIF prints every NUM of the groups that share the verdict's tracking UID beside it:
    only probabilities and the threshold may be there; an empty segment's 0 mL and the
    percent of both lungs go with the "Both lungs" region."""
    findings = ct_findings(ct)
    findings.masks[2].array = np.zeros_like(findings.masks[2].array)  # no ground glass
    findings.measurements[3] = Measurement(VOLUME, 0.0, ML, "ggo", LUNG)
    sr = objects(findings, ct)["SR"]
    verdict_uid = next(str(i.UID) for i in groups(sr)[0].ContentSequence
                       if i.ValueType == "UIDREF")
    beside = [name for g in merged(sr)[verdict_uid] for name in numbers(g)]
    assert beside and all(n.endswith((" probability", " decision threshold")) for n in beside)
    lungs = next(m for m in merged(sr).values() if finding(m[0]) == "Lung")
    # regions apart, so that OHIF, which writes a region's text at its right edge, writes
    # neither over the other nor over a lung's: the verdict on a band across the lower part
    # (text by the middle of the image), both lungs on the image's frame (text at its edge)
    verdict, both = outline(groups(sr)[0]), outline(lungs[0])
    rows, columns = ct.array.shape[1:]
    assert verdict[:, 1].min() >= 0.8 * rows and verdict[:, 0].max() <= columns / 2 + 1
    assert both[:, 0].max() == columns and both[:, 1].max() == rows
    assert {name: value for g in lungs for name, value in numbers(g).items()} == {
        "Extent": "0.6 %", "Volume": "0 mL"}


@pytest.mark.parametrize("which", ["film", "ct"])
def test_no_group_carries_a_finding_site_a_viewer_prints_as_a_code(which, film, ct) -> None:
    """OHIF prints a group's finding site as '363698007: Lung'; sites belong to the NUMs."""
    series = film if which == "film" else ct
    findings = film_findings(film) if which == "film" else ct_findings(ct)
    sr = objects(findings, series)["SR"]
    for g in groups(sr):
        codes = [str(i.ConceptNameCodeSequence[0].CodeValue) for i in g.ContentSequence]
        assert FINDING_SITE not in codes, finding(g)


def test_film_lungs_are_named_by_side_and_lie_on_the_lungs_of_the_pixel_grid(film) -> None:
    """The NIH film has non-square pixels (1.3359 x 1.0944 mm): SCOORDs are pixel (column,
    row) positions whatever the spacing, so each outline covers its lung on the pixel grid;
    the patient's right lung is on the image's left (PatientOrientation L\\F)."""
    assert [float(v) for v in film.datasets[0].ImagerPixelSpacing] == [1.3359, 1.0944]
    sr = objects(film_findings(film), film)["SR"]
    lungs = film_lungs(film)[0]
    sides = {finding(g): outline(g) for g in groups(sr) if finding(g) in ("Right lung",
                                                                          "Left lung")}
    assert set(sides) == {"Right lung", "Left lung"}
    assert sides["Right lung"][:, 0].mean() < 160 < sides["Left lung"][:, 0].mean()
    for name, points in sides.items():
        assert points[:, 0].min() >= 0 and points[:, 0].max() <= film.array.shape[2]
        assert points[:, 1].min() >= 0 and points[:, 1].max() <= film.array.shape[1]
        # (row, column) polygon on the pixel grid, pixel centres at +0.5
        drawn = polygon2mask(lungs.shape, points[:, ::-1] - 0.5)
        overlap = (drawn & lungs).sum() / drawn.sum()
        assert overlap > 0.95, (name, overlap)
    right_area = next(numbers(g)["Area"] for g in groups(sr) if finding(g) == "Right lung")
    pixels = float(right_area.split()[0]) / (1.3359 * 1.0944)
    assert abs(pixels - film_lungs(film)[0, :, :160].sum()) < 0.05 * pixels  # mm2, both sides


def test_presentation_state_names_each_lung_by_side(film) -> None:
    pr = objects(film_findings(film), film)["PR"]
    lungs = next(a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "LUNGS")
    labels = {str(t.UnformattedTextValue): t.AnchorPoint[0] for t in lungs.TextObjectSequence}
    assert set(labels) == {"Right lung", "Left lung"}
    assert labels["Right lung"] < 160 < labels["Left lung"]  # the film's left is the right lung


def test_film_without_pixel_size_lists_its_outlines_with_an_area_in_pixels() -> None:
    series = load_series_files(sorted((SAMPLES / "cxr-covid_hannover-PA").glob("*.dcm")))
    lungs = np.zeros(series.array.shape, bool)
    lungs[0, 80:240, 40:140] = lungs[0, 80:240, 180:280] = True
    findings = Findings("cxr", series.series_instance_uid, classification("covid"),
                        masks=[Mask("lungs", "Lungs", ANATOMY, LUNG, lungs, MODEL)],
                        models=[MODEL])
    sr = objects(findings, series)["SR"]
    areas = [numbers(g).get("Area") for g in groups(sr) if finding(g) in ("Right lung",
                                                                          "Left lung")]
    assert len(areas) == 2 and all(a is not None and a.endswith(" {pixels}") for a in areas)


def test_secondary_capture_caveat_on_the_image_heat_only_where_high_top_band_free(film) -> None:
    sc = objects(film_findings(film), film)["OT"]
    pixels = sc.pixel_array.astype(int)
    size = 512  # the film's longer side (its height, 320 x 1.3359 mm) scaled to sc_min_size
    # square pixels of the film's physical aspect: 320 x 1.0944 mm wide, 320 x 1.3359 mm high
    assert sc.Columns == round(size * 1.0944 / 1.3359)
    image = pixels[:size]
    text = (image[..., 0] > 200) & (image[..., 1] > 200) & (image[..., 2] < 80)  # yellow
    assert text[-40:].sum() > 100, "RESEARCH USE ONLY is not on the image's bottom edge"
    assert text[: size // 10].sum() == 0, "text in the top band (OHIF's cine bar)"
    tint = (image[..., 1] + image[..., 2]) / 2 - image[..., 0]  # cyan on a grey film
    row, column = size / 320, sc.Columns / 320
    assert tint[round(150 * row), round(95 * column)] > 40  # high heat is drawn
    assert tint[round(150 * row), round(225 * column)] < 5  # the other lung is not washed over
    assert (tint[size // 10: -40, :] > 5).mean() < 0.2  # the top of the heat only
    banner = pixels[size:]
    assert banner.max() > 200  # the findings below the image


def test_threshold_is_explained_in_words(film) -> None:
    from covid_plugin.outputs.text import threshold_line

    assert threshold_line(classification("covid")) == (
        "Called COVID-19 when its probability p >= 11 %, else the more probable of "
        "Pneumonia / Normal"
    )


def test_series_descriptions_carry_the_run_time_and_objects_say_what_carries_what(
    film,
) -> None:
    before = datetime.datetime.now()
    made = objects(film_findings(film), film)
    after = datetime.datetime.now()
    times = {f"{t:%Y-%m-%d %H:%M}" for t in (before, after)}  # the run may cross a minute
    for obj in made.values():
        description = str(obj.SeriesDescription)
        assert description.startswith("AI ") and description[-16:] in times, description
        date, time = str(obj.SeriesDate), str(obj.SeriesTime)
        assert description[-16:] == f"{date[:4]}-{date[4:6]}-{date[6:]} {time[:2]}:{time[2:4]}"
    comments = [str(i.TextValue) for i in made["SR"].ContentSequence[-1].ContentSequence]
    assert any("presentation state 'AI outlines (RUO)'" in c and "OHIF 3 cannot show it" in c
               for c in comments), comments


@requires_dciodvfy
@pytest.mark.parametrize("which", ["film", "ct"])
def test_objects_pass_dciodvfy(which, film, ct, tmp_path) -> None:
    series = film if which == "film" else ct
    findings = film_findings(film) if which == "film" else ct_findings(ct)
    for modality, obj in objects(findings, series).items():
        path = tmp_path / f"{modality}.dcm"
        obj.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], modality
