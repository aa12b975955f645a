"""When a series is complete, and whether it becomes a job.

DICOM has no "end of series" message, so a series is complete once no instance has arrived
for the quiet period and no association that delivered to it is still open. The selection
rules then keep what the pipelines can honestly process and record why the rest was refused.
"""

from __future__ import annotations

from covid_plugin.config import SelectionSettings
from covid_plugin.store.jobs import SeriesRecord

_MULTIFRAME_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_SCOUT_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW")


def is_complete(series: SeriesRecord, now: float, quiet_period_s: float,
                active_series: set[str]) -> bool:
    return series.series_uid not in active_series and now - series.last_at >= quiet_period_s


def rejection_reason(series: SeriesRecord, rules: SelectionSettings) -> str | None:
    """None when the series should be processed, else a reason a PACS administrator can read."""
    modality = series.modality or "(none)"
    if modality not in rules.modalities:
        return f"modality {modality} is not processed (accepted: {', '.join(rules.modalities)})"
    text = f"{series.body_part} {series.description}".upper()
    if series.body_part or series.description.strip():
        if not any(word in text for word in rules.chest_keywords):
            part = series.body_part or "(none)"
            return f"not a chest study (body part {part}, descriptions do not mention the chest)"
    elif not rules.accept_unknown_body_part:
        return "body part unknown and accept_unknown_body_part is off"
    if any(word in series.image_type or word in series.description.upper()
           for word in _SCOUT_WORDS):
        return "localizer/scout image"
    # an Enhanced CT object is one instance holding all frames: the loader counts those
    multiframe = series.sop_class_uid in _MULTIFRAME_CT
    if modality == "CT" and not multiframe and series.n_instances < rules.min_ct_slices:
        return f"CT series has {series.n_instances} slice(s) (needs at least {rules.min_ct_slices})"
    return None
