"""Whom a model may be asked about: the patient's age from the DICOM header, and the gate.

The chest X-ray classifier is trained, calibrated and judged on adults; on children it was
never validated (the old model's figures were carried by easy paediatric films). A film of a
patient outside the validated population is therefore declined with a recorded reason rather
than given a number. Header values are often malformed ("00000000", "1950", "45"), so every
parser here returns None for "unknown" instead of raising: a bad age must never crash the
node. Reasons carry no header value, only the derived age in whole years.
"""

from __future__ import annotations

import re
from datetime import date

from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from covid_plugin.config import CxrPopulationSettings

# DICOM AS: nnnD, nnnW, nnnM or nnnY (PS3.5 6.2); a missing zero padding is tolerated
_AGE_STRING = re.compile(r"(\d{1,3})\s*([DWMY])")
_DAYS_PER_YEAR = 365.2425
_UNIT_YEARS = {"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
MAX_PLAUSIBLE_AGE = 130.0  # above this a header age is a typing error, hence unknown
# dates an age is measured to, in order of preference (the study is when the film was taken)
REFERENCE_DATES = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")


def age_from_age_string(value: object) -> float | None:
    """PatientAge ("045Y", "006M", "010D", "003W") in years; None when absent or malformed."""
    match = _AGE_STRING.fullmatch(str(value or "").strip().upper())
    if match is None:
        return None
    years = int(match.group(1)) * _UNIT_YEARS[match.group(2)]
    return years if years <= MAX_PLAUSIBLE_AGE else None


def parse_date(value: object) -> date | None:
    """A DICOM DA (YYYYMMDD, or the old YYYY.MM.DD) as a date, read by pydicom; None when
    absent or not a real date ("00000000", month 13, 30 February)."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        return DA(text)
    except ValueError:
        return None


def age_between(birth: date, on: date) -> float | None:
    """Whole years plus the fraction of the current year; None if the dates are impossible."""
    if on < birth:
        return None
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    anniversary = _replace_year(birth, birth.year + years)
    years_float = years + (on - anniversary).days / _DAYS_PER_YEAR
    return years_float if years_float <= MAX_PLAUSIBLE_AGE else None


def _replace_year(day: date, year: int) -> date:
    """`day` in `year`; 29 February becomes 28 February in a common year."""
    try:
        return day.replace(year=year)
    except ValueError:
        return day.replace(year=year, day=28)


def _text(dataset: Dataset, keyword: str) -> str:
    """An element's value as text; "" when absent or unreadable (never raises)."""
    try:
        value = dataset.get(keyword, "")
    except Exception:  # a malformed element may fail to convert on access
        return ""
    return "" if value is None else str(value)


def patient_age_years(dataset: Dataset) -> float | None:
    """The patient's age at the study, in years: PatientAge, else PatientBirthDate against the
    first usable of StudyDate, AcquisitionDate, ContentDate, SeriesDate; None when unknown."""
    age = age_from_age_string(_text(dataset, "PatientAge"))
    if age is not None:
        return age
    birth = parse_date(_text(dataset, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in REFERENCE_DATES:
        on = parse_date(_text(dataset, keyword))
        if on is not None:
            return age_between(birth, on)
    return None


def population_reason(age: float | None, population: CxrPopulationSettings) -> str | None:
    """Why a patient of this age is not analysed; None when the patient is in the population.

    Only the derived age in whole years appears in the reason, never a header value.
    """
    if age is None:
        if population.unknown_age == "decline":
            return ("patient age unknown (no usable PatientAge or birth and study dates); "
                    "cxr_population.unknown_age is 'decline'")
        return None
    low, high = population.min_age_years, population.max_age_years
    if (low is not None and age < low) or (high is not None and int(age) > high):
        return (f"patient age {int(age)} y is outside the population the model was validated "
                f"on ({describe(population)})")
    return None


def describe(population: CxrPopulationSettings) -> str:
    """'age >= 18 y', 'age 18-80 y' or 'any age': the validated population in words."""
    low, high = population.min_age_years, population.max_age_years
    if low is not None and high is not None:
        return f"age {low:g}-{high:g} y"
    if low is not None:
        return f"age >= {low:g} y"
    if high is not None:
        return f"age <= {high:g} y"
    return "any age"
