"""Findings -> DICOM objects (SEG or GSPS, SR, SC) in new series of the source study.

A thin layer over highdicom: the writers know the Findings record and the source headers,
nothing of the models that produced them.
"""

from __future__ import annotations

import datetime
import re
import traceback

from pydicom import Dataset
from pydicom.datadict import keyword_dict

from covid_plugin.findings import Findings, ModelInfo
from covid_plugin.outputs.codes import RULE_BASED_SHA256
from covid_plugin.outputs.declined import build_declined_report
from covid_plugin.outputs.headers import lenient_patient_attributes
from covid_plugin.outputs.pr import build_presentation_state
from covid_plugin.outputs.regions import key_image_of, mask_outlines
from covid_plugin.outputs.sc import build_secondary_capture
from covid_plugin.outputs.seg import build_segmentations, segmentations_of
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.sr import build_report
from covid_plugin.outputs.text import carriers_line
from covid_plugin.volume import LoadedSeries

__all__ = [
    "OutputError",
    "OutputSettings",
    "build_declined_report",
    "build_presentation_state",
    "build_report",
    "build_secondary_capture",
    "build_segmentations",
    "write_all",
    "write_declined",
]

# A ValueError, AttributeError or KeyError raised inside these libraries means "this source
# header cannot be encoded"; anything raised in our own code, and a TypeError anywhere (a
# wrong call), is a bug and propagates as it is.
ENCODING_LIBRARIES = ("highdicom", "pydicom")
HEADER_ERRORS = (AttributeError, ValueError, KeyError)
MIN_KEYWORD_LENGTH = 6  # "UID", "Code" etc. are keywords too, but name nothing useful


class OutputError(ValueError):
    """Results that could not be encoded for this source series (e.g. a defective header)."""

    def __init__(self, reason: str, series_uid: str) -> None:
        super().__init__(f"series {series_uid}: {reason}")
        self.reason = reason
        self.series_uid = series_uid


def write_all(
    findings: Findings, series: LoadedSeries, settings: OutputSettings | None = None
) -> list[Dataset]:
    """All objects for one pipeline run, in sending order: SEGs or GSPS (if any masks), SR, SC.

    The SEGs go first because the SR refers to their segments. A CT's masks go into two SEGs
    (lungs, lesions), a radiograph's outlines into a presentation state. Patient attributes
    that are not valid DICOM are blanked in the copies, not fatal. highdicom's and pydicom's
    refusals (a source header without a required attribute, an invalid UID) become an
    OutputError that names the series and the attributes, never their values; our own errors
    are not disguised as that.
    """
    settings = settings or OutputSettings()
    when = datetime.datetime.now()
    lenient_patient_attributes(series.datasets)
    try:
        segments = build_segmentations(findings, series, settings, when)
        frame = key_image_of(findings, series)  # one key image for the SR and the SC
        # each mask outlined once, for the SR and the presentation state alike
        drawn = {mask.key: mask_outlines(mask, series, frame) for mask in findings.masks}
        presentation = build_presentation_state(findings, series, settings, drawn, when)
        carriers = carriers_line(series.modality, settings, presentation is not None)
        report = build_report(findings, series, settings, segments, when, frame, drawn,
                              carriers)
        capture = build_secondary_capture(findings, series, settings, when, frame, carriers)
    except HEADER_ERRORS as error:
        raise _as_output_error(error, series.series_instance_uid) from error
    others = [obj for obj in (presentation, report, capture) if obj is not None]
    return [*segmentations_of(segments), *others]


def write_declined(
    series: LoadedSeries,
    reason: str,
    settings: OutputSettings | None = None,
    models: list[ModelInfo] | None = None,
) -> list[Dataset]:
    """The 'not analysed' SR for a series a pipeline declined (whether to send one is the
    node's `declined_reports` setting: the worker then passes no decliner).

    Without `models` (a pipeline declines before any model ran), the node's own selection
    rules are named as the processing algorithm.
    """
    settings = settings or OutputSettings()
    models = models or [
        ModelInfo(f"{settings.model_name} rules", settings.software_version, RULE_BASED_SHA256)
    ]
    lenient_patient_attributes(series.datasets)
    try:
        return [build_declined_report(list(series.datasets), reason, settings, models)]
    except HEADER_ERRORS as error:
        raise _as_output_error(error, series.series_instance_uid) from error


def _as_output_error(error: Exception, series_uid: str) -> Exception:
    """An OutputError when an encoding library refused the input, else the error itself."""
    frames = traceback.extract_tb(error.__traceback__)
    origin = frames[-1].filename if frames else ""
    library = next((name for name in ENCODING_LIBRARIES if f"/{name}/" in origin), None)
    if library is None:
        return error
    attributes = sorted(
        word
        for word in set(re.findall(r"[A-Z][A-Za-z]+", str(error)))
        if word in keyword_dict and len(word) >= MIN_KEYWORD_LENGTH
    )
    about = f" about {', '.join(attributes)}" if attributes else ""
    return OutputError(
        f"cannot encode results: {library} refused the source header{about} "
        f"({type(error).__name__})",
        series_uid,
    )
