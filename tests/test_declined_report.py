"""A series a pipeline declines gets a short 'not analysed' SR that travels like any result."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_plugin.config import Settings
from covid_plugin.findings import Findings
from covid_plugin.outputs import write_all, write_declined
from covid_plugin.pipelines.interface import SeriesSkipped, analyse
from covid_plugin.volume import LoadedSeries
from tests.conftest import CHEST_CR

REASON = "lateral view (ViewPosition LL); only frontal films"


class DecliningPipeline:
    """Declines every film, as the CXR pipeline declines a lateral one."""

    name = "cxr"
    modalities = ("CR",)
    per_instance = True

    def load_models(self, models_dir: Path, device: str) -> None:
        return None

    def run(self, series: LoadedSeries, models: None) -> Findings:
        raise SeriesSkipped(REASON)


@pytest.mark.data
def test_declined_series_yields_the_not_analysed_report() -> None:
    outcome = analyse(DecliningPipeline(), None, [CHEST_CR], write_all, write_declined)
    assert outcome.skipped == 1 and "lateral view" in (outcome.note or "")
    (findings, objects), = outcome.results
    assert findings.classification is None and "not analysed" in findings.notes[0]
    (report,) = objects
    assert report.Modality == "SR"
    texts = [item.TextValue for item in report.ContentSequence if item.ValueType == "TEXT"]
    assert any(REASON in text for text in texts)
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeMeaning
                for item in report.ContributingEquipmentSequence]
    assert "Processing Algorithm" in purposes  # IHE AI Results: on every object, this one too


@pytest.mark.data
def test_without_a_decliner_a_declined_series_yields_nothing() -> None:
    outcome = analyse(DecliningPipeline(), None, [CHEST_CR], write_all)
    assert outcome.results == [] and outcome.skipped == 1


@pytest.mark.parametrize("value", [True, False])
def test_declined_reports_are_a_setting_on_by_default(value: bool) -> None:
    assert Settings().declined_reports is True
    assert Settings(declined_reports=value).declined_reports is value
