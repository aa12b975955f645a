"""The series tracker: closes each series that has gone quiet into a queued job, or rejects it
with the reason (the selection rules, a transfer that broke off and was never resent, no
pipeline for its modality).

Completion is decided in the database (the series rows and their close), never in one
process's memory, so several workers may track the same series: one of them closes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from covid_plugin.config import Settings
from covid_plugin.observability import Metrics
from covid_plugin.series import completion, incomplete_reason, rejection_reason
from covid_plugin.store.jobs import JobQueue

log = logging.getLogger(__name__)


class SeriesTracker:
    """Queues or rejects complete series; `modalities` are those a pipeline runs."""

    def __init__(self, settings: Settings, jobs: JobQueue, metrics: Metrics,
                 active_series: Callable[[], set[str]], modalities: Collection[str]) -> None:
        self.settings = settings
        self.jobs = jobs
        self.metrics = metrics
        self.active_series = active_series  # series with an association still open
        self.modalities = modalities
        self._held_until = 0.0

    def hold_until(self, t: float) -> None:
        """Close no series before `t`: at start, one quiet period, so that a series whose
        transfer the stop cut off can be resent before it is judged."""
        self._held_until = t

    def close_complete_series(self) -> int:
        """Queue or reject every series that has gone quiet; returns how many were closed."""
        open_series = self.jobs.open_series()
        if not open_series:  # the usual round: no need to ask which associations are open
            return 0
        active, t, closed = self.active_series(), time.time(), 0
        timeout = self.settings.jobs.incomplete_timeout_s
        for series in open_series:
            state = completion(series, t, self.settings.quiet_period_s, active,
                               self._held_until, timeout)
            if state == "wait":
                continue
            if state == "incomplete":
                reason: str | None = incomplete_reason(series, timeout)
            else:
                reason = rejection_reason(series, self.settings.selection)
            if reason is None and series.modality not in self.modalities:
                reason = f"no pipeline for modality {series.modality}"
            if not self.jobs.close(series.job_id, reason, incomplete=state == "incomplete"):
                continue  # another worker closed it a moment ago
            closed += 1
            if reason:
                self.metrics.series_rejected.inc()
                log.info("series %s from %s rejected: %s", series.series_uid,
                         series.calling_ae, reason)
            else:
                log.info("series %s from %s queued (%d instances)", series.series_uid,
                         series.calling_ae, series.n_instances)
        return closed
