"""Text the three CT model cards share: intended use, the HU sources, table rows, numbers.

Each model's card.md is written by its own package (ct_lung/card.py, ct_lesion/card.py,
ct_cls/card.py) from its metrics, so that numbers never drift from what was measured.
"""

from __future__ import annotations

import platform

import torch

INTENDED_USE = (
    "**Intended use: research only. Not a medical device; not for diagnosis, triage or any "
    "clinical decision.**"
)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


HU_SOURCES = "\n".join([
    row("source", "series", "licence"),
    row("---", "---", "---"),
    row("COVID-CT-MD (Afshar et al., Sci Data 8:121, 2021; doi:10.1038/s41597-021-00900-3)",
         "6 whole chests, 4 mm (P001, P002 COVID; cap001, cap002 CAP; normal001, normal002), "
         "and 30-slice 2 mm blocks of P002, cap002, normal002",
         "CC BY 4.0 (figshare record; licence text not read, re-check before commercial use)"),
    row("TCIA Lung-PET-CT-Dx (doi:10.7937/TCIA.2020.NNC2-0461)", "A0001 (16 slices), A0002 (14)",
         "CC BY 4.0"),
    row("TCIA RIDER Pilot (doi:10.7937/m87f-mz83)", "60 slices, lung bases", "CC BY 4.0"),
    row("TCIA COVID-19-NY-SBU (doi:10.7937/TCIA.BBAG-2923)",
         "2 single axial slices (lung checks only: the node does not score a single slice)",
         "CC BY 4.0"),
]) + "\n"


def device_text() -> str:
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), torch {torch.__version__}, 1 thread"


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
