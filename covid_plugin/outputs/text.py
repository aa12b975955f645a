"""The findings as short human-readable lines, shared by the SC banner and the GSPS caption.

Numbers are written with a space before the unit ("COVID-19 70 %"), so that a label ending in
digits never runs into a value ("COVID-1970%").
"""

from __future__ import annotations

from covid_plugin.findings import Classification, ClassProbability, Findings
from covid_plugin.outputs.settings import OutputSettings

CAVEAT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
THRESHOLDED_KEY = "covid"  # the class a decision threshold is set for


def percent(value: float) -> str:
    return f"{value * 100:.0f} %"


def result_line(findings: Findings) -> str | None:
    """'Result: COVID-19 (COVID-19 70 %, Pneumonia 12 %, Normal 7 %)', None without a call."""
    c = findings.classification
    if c is None:
        return None
    probabilities = ", ".join(f"{p.code.meaning} {percent(p.probability)}" for p in c.probabilities)
    return f"Result: {_called(c)} ({probabilities})"


def thresholded_class(classification: Classification) -> ClassProbability | None:
    """The class the decision threshold is for (COVID-19), None if the model has none."""
    return next(
        (p for p in classification.probabilities if p.key == THRESHOLDED_KEY), None
    )


def threshold_line(classification: Classification) -> str | None:
    """How the call was made, in words: 'Called COVID-19 when its probability p >= 11 %
    (else Negative)'."""
    if classification.threshold is None:
        return None
    covid = thresholded_class(classification)
    if covid is None:
        return f"Decision threshold: {classification.threshold:g}"
    others = [p.code.meaning for p in classification.probabilities if p is not covid]
    otherwise = others[0] if len(others) == 1 else "the more probable of " + " / ".join(others)
    return (
        f"Called {covid.code.meaning} when its probability p >= "
        f"{percent(classification.threshold)}, else {otherwise}"
    )


def summary_lines(findings: Findings, key_image: str | None = None) -> list[str]:
    """The findings as short text lines, most important first."""
    lines = [CAVEAT]
    c = findings.classification
    line = result_line(findings)
    if line:
        lines.append(line)
    if c is not None and (threshold := threshold_line(c)):
        lines.append(threshold)
    if key_image:
        lines.append(f"Key slice: {key_image}")
    labels = {mask.key: mask.label for mask in findings.masks}
    for m in findings.measurements:
        about = f" ({labels[m.mask_key]})" if m.mask_key in labels else ""
        lines.append(f"{m.name.meaning}{about}: {m.value:.1f} {m.unit.value}")
    lines.extend(findings.notes)
    models = findings.models or ([c.model] if c is not None else [])
    if models:
        lines.append("Models: " + ", ".join(f"{m.name} {m.version}" for m in models))
    return lines


def _called(c: Classification) -> str:
    return next(p.code.meaning for p in c.probabilities if p.key == c.predicted)


def carriers_line(modality: str, settings: OutputSettings, presentation_state: bool) -> str:
    """Which result object carries what, for readers whose viewer cannot show one of them
    (OHIF 3 shows no presentation state; a plain viewer no SR or SEG)."""
    picture = f"the picture '{settings.sc_series_description}' shows them in any viewer"
    if modality == "CT":
        return (
            f"Lung and lesion masks: SEG series '{settings.seg_series_description}' and "
            f"'{settings.lesion_seg_series_description}'; the report "
            f"'{settings.sr_series_description}' outlines them on the key slice; {picture}."
        )
    if presentation_state:
        return (
            f"Outlines: in the report '{settings.sr_series_description}' (drawn by OHIF) and "
            f"the presentation state '{settings.pr_series_description}' (series "
            f"{settings.pr_series_number}, for PACS workstations; OHIF 3 cannot show it); "
            f"{picture}."
        )
    return f"Outlines: in the report '{settings.sr_series_description}'; {picture}."
