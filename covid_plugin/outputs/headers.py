"""Header attributes every result object carries, whichever writer made it.

- IHE AI Results: a Contributing Equipment item with purpose "Processing Algorithm" for each
  model (name, version, weights sha256), beside the items highdicom adds itself.
- One creation time per run, so that SeriesDate/Time and ContentDate/Time agree across the
  objects of a run (viewers sort and label series by them).
- Patient and study attributes copied leniently: a source value that is not valid DICOM (a
  birth date "00000000" or "1950") is left empty in the results instead of failing the job.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

from covid_plugin.findings import Findings, ModelInfo
from covid_plugin.outputs.settings import OutputSettings

# IHE Radiology TF Vol. 3, AI Results (AIR): Purpose of Reference of the algorithm's item.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")

# Patient and study attributes highdicom copies into every derived object, by VR to check.
LENIENT_DATES = ("PatientBirthDate", "StudyDate")
LENIENT_TIMES = ("PatientBirthTime", "StudyTime")
LENIENT_SEX = ("M", "F", "O", "")


def models_of(findings: Findings) -> list[ModelInfo]:
    """Every model that contributed to the findings, once each, in a stable order."""
    found: list[ModelInfo] = list(findings.models)
    if findings.classification is not None:
        found.append(findings.classification.model)
    found.extend(mask.model for mask in findings.masks)
    return list(dict.fromkeys(found))


def processing_algorithm_items(
    models: Iterable[ModelInfo], settings: OutputSettings, when: datetime.datetime
) -> list[Dataset]:
    """One Contributing Equipment item per model, as IHE AI Results asks."""
    items = []
    for model in models:
        item = Dataset()
        item.Manufacturer = settings.manufacturer
        item.ManufacturerModelName = model.name[:64]
        item.SoftwareVersions = model.version[:64]
        item.DeviceSerialNumber = settings.device_serial_number
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
            PROCESSING_ALGORITHM
        )
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.ContributionDateTime = DT(when)
        item.ContributionDescription = (
            f"{model.name} {model.version}, weights sha256 {model.sha256}"
        )
        items.append(item)
    return items


def stamp(
    obj: Dataset, models: Sequence[ModelInfo], settings: OutputSettings, when: datetime.datetime
) -> Dataset:
    """Add the models as Processing Algorithm equipment to an object highdicom has built, and
    the run's date and time to its series description.

    highdicom's own ContributingEquipment only takes DCM purposes, so the IHE item is a plain
    Contributing Equipment Sequence item appended beside the ones highdicom wrote. The run
    time in the description is what tells two result sets of one series apart in a viewer's
    series list, even when the node could not link the later run to the earlier one.
    """
    existing = list(obj.get("ContributingEquipmentSequence", []))
    obj.ContributingEquipmentSequence = existing + processing_algorithm_items(
        models, settings, when
    )
    if obj.get("SeriesDescription"):
        obj.SeriesDescription = run_description(str(obj.SeriesDescription), when)
    return obj


def run_description(description: str, when: datetime.datetime) -> str:
    """'AI report (RUO) 2026-12-06 05:31': the name first, so that a viewer that cuts a long
    description off keeps what the series is."""
    return f"{description} {when:%Y-%m-%d %H:%M}"[:64]


def creation_times(when: datetime.datetime, content: bool = True) -> dict[str, object]:
    """highdicom keyword arguments that date the new series and its content the same way.

    A presentation state has no Content Date/Time (it dates itself by its creation date).
    """
    times: dict[str, object] = {"series_date": when.date(), "series_time": when.time()}
    if content:
        times |= {"content_date": when.date(), "content_time": when.time()}
    return times


def lenient_patient_attributes(datasets: Iterable[Dataset]) -> None:
    """Blank the patient/study values a derived object cannot carry, in the in-memory headers.

    Only the copies the writers read are changed, never the received files; Type 2 attributes
    stay present (empty), Type 3 ones with unusable values are removed.
    """
    for ds in datasets:
        for keyword in LENIENT_DATES:
            _blank_unless(ds, keyword, DA)
        for keyword in LENIENT_TIMES:
            _blank_unless(ds, keyword, TM)
        if "PatientSex" in ds and str(ds.PatientSex or "").upper() not in LENIENT_SEX:
            ds.PatientSex = ""
        if "PatientAge" in ds and not _valid_age(str(ds.PatientAge or "")):
            del ds.PatientAge


def _blank_unless(ds: Dataset, keyword: str, parse: type) -> None:
    if keyword not in ds:
        return
    try:
        raw = ds[keyword].value
        if raw not in (None, "") and not isinstance(raw, datetime.date | datetime.time):
            parse(str(raw))
    except (ValueError, TypeError, OverflowError):
        setattr(ds, keyword, "")


def _valid_age(value: str) -> bool:
    return len(value) == 4 and value[:3].isdigit() and value[3] in "DWMY"
