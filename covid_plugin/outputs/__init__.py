"""Findings -> DICOM objects (SEG, SR, SC) in new series of the source study.

A thin layer over highdicom: the writers know the Findings record and the source headers,
nothing of the models that produced them.
"""

from __future__ import annotations

from pydicom import Dataset

from covid_plugin.findings import Findings
from covid_plugin.outputs.sc import build_secondary_capture
from covid_plugin.outputs.seg import build_segmentation
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.sr import build_report
from covid_plugin.volume import LoadedSeries

__all__ = [
    "OutputError",
    "OutputSettings",
    "build_report",
    "build_secondary_capture",
    "build_segmentation",
    "write_all",
]


class OutputError(ValueError):
    """Results that could not be encoded for this source series (e.g. a defective header)."""

    def __init__(self, reason: str, series_uid: str) -> None:
        super().__init__(f"series {series_uid}: {reason}")
        self.reason = reason
        self.series_uid = series_uid


def write_all(
    findings: Findings, series: LoadedSeries, settings: OutputSettings | None = None
) -> list[Dataset]:
    """All objects for one pipeline run, in sending order: SEG (if any masks), SR, SC.

    The SEG goes first because the SR refers to its segments. highdicom's refusals (a source
    header without a required attribute, an invalid UID) become an OutputError that names
    the series, so the worker can record why a job produced nothing.
    """
    settings = settings or OutputSettings()
    try:
        segmentation = build_segmentation(findings, series, settings)
        report = build_report(findings, series, settings, segmentation)
        capture = build_secondary_capture(findings, series, settings)
    except (AttributeError, TypeError, ValueError) as error:
        raise OutputError(
            f"cannot encode results: {type(error).__name__}: {error}", series.series_instance_uid
        ) from error
    return [obj for obj in (segmentation, report, capture) if obj is not None]
