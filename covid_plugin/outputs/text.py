"""The findings as short human-readable lines, shared by the SC banner and the GSPS caption.

Numbers are written with a space before the unit ("COVID-19 70 %"), so that a label ending in
digits never runs into a value ("COVID-1970%").
"""

from __future__ import annotations

from covid_plugin.findings import Classification, Findings

CAVEAT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


def percent(value: float) -> str:
    return f"{value * 100:.0f} %"


def result_line(findings: Findings) -> str | None:
    """'Result: COVID-19 (COVID-19 70 %, Pneumonia 12 %, Normal 7 %)', None without a call."""
    c = findings.classification
    if c is None:
        return None
    probabilities = ", ".join(f"{p.code.meaning} {percent(p.probability)}" for p in c.probabilities)
    return f"Result: {_called(c)} ({probabilities})"


def threshold_line(classification: Classification) -> str | None:
    """How the call was made: the operating threshold the model's figures were measured at."""
    if classification.threshold is None:
        return None
    covid = next((p for p in classification.probabilities if p.key == "covid"), None)
    if covid is None:
        return f"Decision threshold: {classification.threshold:g}"
    others = [p.code.meaning for p in classification.probabilities if p is not covid]
    otherwise = others[0] if len(others) == 1 else "the more probable of " + " / ".join(others)
    return (
        f"Threshold: {covid.code.meaning} when its probability >= "
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
