"""When a series is complete, and whether it becomes a job.

DICOM has no "end of series" message, so a series is complete once no instance has arrived
for the quiet period, no association that delivered to it is still open, and the last
association that delivered to it was released normally. A sender that was killed, or
aborted, or a node that restarted in the middle of a transfer, leaves a series that may be
partial: it waits for the sender to send again (a PACS retries a failed transfer) and, if
nothing comes, is recorded as incomplete instead of being processed. After a start-up the
node also waits one quiet period before it closes anything: senders cut off by the restart
need that long to come back.
The selection rules then keep what the pipelines can honestly process and record why the rest
was refused.
"""

from __future__ import annotations

from typing import Literal

from covid_plugin.config import SelectionSettings
from covid_plugin.store.jobs import SeriesRecord

_MULTIFRAME_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_SCOUT_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW")


Completion = Literal["wait", "complete", "incomplete"]


def completion(series: SeriesRecord, now: float, quiet_period_s: float, active_series: set[str],
               held_until: float = 0.0, incomplete_timeout_s: float = 3600.0) -> Completion:
    """'complete' to close the series, 'incomplete' to record that it will not be processed,
    'wait' while either may still happen."""
    if series.series_uid in active_series or now < held_until:
        return "wait"
    if now - series.last_at < quiet_period_s:
        return "wait"
    if delivered_cleanly(series):
        return "complete"
    broke_off = max(series.last_at, series.interrupted_at or 0.0)
    return "incomplete" if now - broke_off >= incomplete_timeout_s else "wait"


def delivered_cleanly(series: SeriesRecord) -> bool:
    """Every instance came before a normal release, and no abort followed that release."""
    released = series.released_at
    return (released is not None and released >= series.last_at
            and (series.interrupted_at is None or released >= series.interrupted_at))


def incomplete_reason(series: SeriesRecord, incomplete_timeout_s: float) -> str:
    return (f"incomplete: the transfer broke off after {series.n_instances} instance(s) "
            f"(association aborted or node restarted) and was not resent within "
            f"{incomplete_timeout_s:g} s")


def rejection_reason(series: SeriesRecord, rules: SelectionSettings) -> str | None:
    """None when the series should be processed, else a reason a PACS administrator can read."""
    modality = series.modality or "(none)"
    if modality not in rules.modalities:
        return f"modality {modality} is not processed (accepted: {', '.join(rules.modalities)})"
    description = series.description.upper()
    mentions_chest = any(word in description for word in rules.chest_keywords)
    if series.body_part:
        # the body part, when given, decides: a description can be copied from another
        # series or study (BodyPartExamined HEAD under "CT CHEST" was analysed as a chest)
        if not any(word in series.body_part for word in rules.chest_keywords):
            said = ("though the descriptions mention the chest" if mentions_chest
                    else "descriptions do not mention the chest")
            return f"not a chest study (body part {series.body_part}, {said})"
    elif series.description.strip():
        if not mentions_chest:
            return "not a chest study (body part (none), descriptions do not mention the chest)"
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
