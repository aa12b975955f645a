"""The findings table `covid-plugin run` and `covid-plugin demo` print, one row per series."""

from __future__ import annotations

from dataclasses import dataclass

from covid_plugin.findings import Findings
from covid_plugin.pipelines import codes


@dataclass
class ResultRow:
    series_uid: str
    modality: str
    outcome: str  # done, skipped, rejected, failed
    findings: Findings | None = None
    reason: str = ""
    n_files: int = 0


def _measure(findings: Findings, name: str, mask_key: str | None) -> float | None:
    for m in findings.measurements:
        if m.name.meaning == name and m.mask_key == mask_key:
            return m.value
    return None


def _describe(row: ResultRow) -> str:
    f = row.findings
    if f is None or f.classification is None:
        return row.reason
    c = f.classification
    probs = ", ".join(f"{p.key} {p.probability:.2f}" for p in c.probabilities)
    text = f"{c.predicted.upper()} ({probs})"
    if f.kind == "ct":
        both = _measure(f, codes.PERCENT_INVOLVED.meaning, None)
        right = _measure(f, codes.PERCENT_INVOLVED.meaning, "lung_right")
        left = _measure(f, codes.PERCENT_INVOLVED.meaning, "lung_left")
        lungs = sum(v or 0.0 for v in (_measure(f, "Volume", "lung_right"),
                                       _measure(f, "Volume", "lung_left")))
        lesions = sum(v or 0.0 for v in (_measure(f, "Volume", "ggo"),
                                         _measure(f, "Volume", "consolidation")))
        text += (f"; lungs {lungs:.0f} mL, lesions {lesions:.0f} mL, involved {both:.1f}% "
                 f"(R {right:.1f}%, L {left:.1f}%)")
    return text


def format_table(rows: list[ResultRow]) -> str:
    lines = [f"{'series':<28} {'mod':<4} {'outcome':<9} {'files':>5}  findings / reason"]
    for row in rows:
        uid = row.series_uid if len(row.series_uid) <= 28 else "…" + row.series_uid[-27:]
        lines.append(f"{uid:<28} {row.modality:<4} {row.outcome:<9} {row.n_files:>5}  "
                     f"{_describe(row)}")
    lines.append("Research use only; not for diagnosis.")
    return "\n".join(lines)
