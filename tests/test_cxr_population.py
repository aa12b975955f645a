"""Age gating of the CXR pipeline: the age read from the header, and who is declined."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from covid_plugin.config import CxrPopulationSettings, load_settings
from covid_plugin.pipelines import default_pipelines
from covid_plugin.pipelines.cxr import CxrPipeline
from covid_plugin.pipelines.interface import SeriesSkipped
from covid_plugin.pipelines.population import (
    age_from_age_string,
    parse_date,
    patient_age_years,
    population_reason,
)
from covid_plugin.volume import load_series_files

SAMPLE = Path(__file__).resolve().parents[1] / "dicom_samples" / "cxr-normal_nih-cxr14-PA"


@pytest.mark.parametrize(("value", "years"), [
    ("045Y", 45.0), ("006M", 0.5), ("010D", 10 / 365.2425), ("003W", 21 / 365.2425),
    ("45Y", 45.0), (" 017Y ", 17.0), ("018y", 18.0),
])
def test_patient_age_strings_in_years(value: str, years: float) -> None:
    assert age_from_age_string(value) == pytest.approx(years)


@pytest.mark.parametrize("value", ["", None, "45", "Y", "abc", "0045Y", "045X", "999Y", "-5Y"])
def test_malformed_patient_age_is_unknown(value: object) -> None:
    assert age_from_age_string(value) is None


@pytest.mark.parametrize("value", ["00000000", "1950", "19501301", "20230230", "", "abcdefgh"])
def test_malformed_dates_are_unknown(value: str) -> None:
    assert parse_date(value) is None


def header(**elements: str) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_age_from_birth_date_against_the_first_usable_date() -> None:
    assert patient_age_years(header(PatientBirthDate="19700615", StudyDate="20200614")) == \
        pytest.approx(49.997, abs=0.01)
    # StudyDate malformed: AcquisitionDate, then ContentDate are used
    assert patient_age_years(header(PatientBirthDate="20100101", StudyDate="00000000",
                                    AcquisitionDate="20160101")) == pytest.approx(6.0)
    assert patient_age_years(header(PatientBirthDate="20100101",
                                    ContentDate="20200101")) == pytest.approx(10.0)
    # PatientAge wins over the dates
    assert patient_age_years(header(PatientAge="030Y", PatientBirthDate="20100101",
                                    StudyDate="20200101")) == 30.0
    # a leap-day birth
    assert patient_age_years(header(PatientBirthDate="20000229",
                                    StudyDate="20190228")) == pytest.approx(19.0, abs=0.01)


@pytest.mark.parametrize("elements", [
    {}, {"PatientBirthDate": "00000000", "StudyDate": "20200101"},
    {"PatientBirthDate": "1950", "StudyDate": "20200101"},
    {"PatientBirthDate": "19500101"},  # no date to measure to
    {"PatientBirthDate": "20300101", "StudyDate": "20200101"},  # born after the study
    {"PatientAge": "abc", "PatientBirthDate": "18500101", "StudyDate": "20200101"},  # 170 y
])
def test_unknown_age_never_raises(elements: dict) -> None:
    assert patient_age_years(header(**elements)) is None


def test_gate_declines_children_and_admits_adults_by_default() -> None:
    adults = CxrPopulationSettings()
    assert adults.min_age_years == 18 and adults.max_age_years is None
    assert population_reason(45.0, adults) is None
    assert population_reason(18.0, adults) is None
    reason = population_reason(17.9, adults)
    assert reason is not None and "17 y" in reason and ">= 18" in reason
    assert population_reason(None, adults) is None  # unknown: analysed by default
    strict = CxrPopulationSettings(unknown_age="decline", max_age_years=80)
    assert "unknown" in population_reason(None, strict)
    assert population_reason(80.9, strict) is None
    assert "81 y" in population_reason(81.0, strict)


def test_population_settings_come_from_the_config() -> None:
    settings = load_settings(environ={"COVID_PLUGIN_CXR_POPULATION__MIN_AGE_YEARS": "0",
                                      "COVID_PLUGIN_CXR_POPULATION__UNKNOWN_AGE": "decline"})
    assert settings.cxr_population.min_age_years == 0
    cxr = next(p for p in default_pipelines(settings) if p.name == "cxr")
    assert cxr.population.unknown_age == "decline"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="dicom_samples not present")
def test_pipeline_declines_a_child_with_a_reason_that_carries_no_header_value() -> None:
    """A real film with a child's age: skipped before any model runs (no models given), and
    the recorded reason names the derived age only, never the patient's name, id or dates."""
    series = load_series_files(sorted(SAMPLE.glob("*.dcm")))
    ds: pydicom.Dataset = series.datasets[0]
    ds.PatientAge = "006Y"
    ds.PatientName = "Secret^Child"
    ds.PatientID = "ID-4711"
    with pytest.raises(SeriesSkipped, match="not analysable") as caught:
        CxrPipeline().run(series, models={})
    reason = str(caught.value)
    assert "6 y" in reason
    for value in ("Secret", "4711", "006Y"):
        assert value not in reason
    del ds.PatientAge
    ds.PatientBirthDate = "00000000"  # malformed: unknown, and unknown is declined if asked
    with pytest.raises(SeriesSkipped, match="age unknown"):
        CxrPipeline(CxrPopulationSettings(unknown_age="decline")).run(series, models={})
