"""A short SR for a series the node looked at and did not analyse, stating why.

IHE AI Results asks that a reader can tell "the AI declined" from "the AI never ran": a lateral
film, a CT without lungs, a patient outside the validated population or a series that is not
a chest all get this report instead of silence. It holds the reason and the intended-use
caveat as text under a plain report container, with the node as device observer and the
source images as evidence. Turned off with the node's `declined_reports` setting.
"""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset

from covid_plugin.findings import ModelInfo
from covid_plugin.outputs.codes import COMMENT, INTENDED_USE
from covid_plugin.outputs.headers import creation_times, stamp
from covid_plugin.outputs.settings import OutputSettings
from covid_plugin.outputs.sr import observation_context

REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
NOT_ANALYSED = "Not analysed by the AI"


def build_declined_report(
    sources: list[Dataset],
    reason: str,
    settings: OutputSettings,
    models: list[ModelInfo] | None = None,
    when: datetime.datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """The 'not analysed' SR for the series of `sources`; `reason` must hold no header values
    that identify the patient (it is what the job records, too)."""
    when = when or datetime.datetime.now()
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *observation_context(settings),
            hd.sr.TextContentItem(
                name=COMMENT, value=f"{NOT_ANALYSED}: {reason}", relationship_type=contains
            ),
            hd.sr.TextContentItem(name=COMMENT, value=INTENDED_USE, relationship_type=contains),
        ]
    )
    report = hd.sr.ComprehensiveSR(
        evidence=sources,
        content=root,
        series_instance_uid=hd.UID(),
        series_number=settings.declined_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        series_description=settings.declined_series_description,
        **creation_times(when),
    )
    return stamp(report, models or [], settings, when)
