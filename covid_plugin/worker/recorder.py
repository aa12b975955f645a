"""The one place a job's Outcome is written to the JobQueue, under this worker's lease.

Every way a job can end is recorded; when even that write fails (the disk is full), the
outcome is kept and written on a later round, so no job stays 'running'. A worker that lost
its lease (it stalled for longer than the lease, and another worker took the job) drops its
results instead of recording them, so each job ends exactly once.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covid_plugin.findings import Findings
from covid_plugin.observability import Metrics
from covid_plugin.store.db import STORE_ERRORS
from covid_plugin.store.jobs import Job, JobQueue, LeaseLost
from covid_plugin.store.run_marks import RunMarks
from covid_plugin.store.states import JobState
from covid_plugin.worker.outcome import Ending, Outcome, Results
from covid_plugin.worker.results import attempt_folder

log = logging.getLogger(__name__)


class OutcomeRecorder:
    """Writes outcomes as `owner`, counts the endings that stand, keeps the unwritten."""

    def __init__(self, jobs: JobQueue, metrics: Metrics, marks: RunMarks, results_dir: Path,
                 owner: str,
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None) -> None:
        self.jobs = jobs
        self.metrics = metrics
        self.marks = marks
        self.results_dir = results_dir
        self.owner = owner
        self.on_result = on_result  # the demo prints findings; the node itself needs none
        self._unrecorded: list[tuple[Job, Outcome]] = []

    def unrecorded(self) -> list[int]:
        """Jobs whose outcome could not be written yet (health reports them)."""
        return [job.id for job, _ in self._unrecorded]

    def record_pending(self) -> bool:
        """Write outcomes that could not be written before; True when none is left."""
        pending, self._unrecorded = self._unrecorded, []
        for job, outcome in pending:
            self.record(job, outcome)
        return not self._unrecorded

    def record(self, job: Job, outcome: Outcome) -> Ending | None:
        """Write the outcome and count it; returns the ending that stands (DROPPED when the
        lease was lost), or None while it could not be written (it is kept to retry)."""
        ending = outcome.ending
        try:
            self._write(job, outcome)
        except LeaseLost:
            # another worker took the job after this one's lease expired: its run stands
            log.error("job %d (series %s): lease lost before the outcome was recorded; this "
                      "run's results are dropped", job.id, job.series_uid)
            shutil.rmtree(attempt_folder(self.results_dir, job), ignore_errors=True)
            ending = Ending.DROPPED
        except (*STORE_ERRORS, OSError) as exc:
            log.error("job %d (series %s): outcome not recorded (%s); will retry", job.id,
                      job.series_uid, exc)
            self._unrecorded.append((job, outcome))
            return None
        self.metrics.jobs.labels(outcome=ending.value).inc()
        return ending

    def _write(self, job: Job, outcome: Outcome) -> None:
        if outcome.results is not None:
            self._finish(job, outcome.reason, outcome.results,
                         declined=outcome.ending is Ending.SKIPPED)
        elif outcome.ending is Ending.RETRY:
            if self._end(job, self.jobs.retry_later, outcome.reason) == JobState.QUARANTINED:
                log.error("job %d (series %s) quarantined after %d attempts", job.id,
                          job.series_uid, job.attempts)
        elif outcome.ending is Ending.SKIPPED:
            self._end(job, self.jobs.skip, outcome.reason)
        else:
            self._end(job, self.jobs.fail, outcome.reason)

    def _finish(self, job: Job, note: str | None, results: Results, declined: bool) -> None:
        """Record the results and queue them for their destinations; then the run mark and
        on_result, which hear only of results that stand."""
        self.jobs.finish(job.id, results.deliveries, note, results.reports,
                         supersedes=results.supersedes, owner=self.owner, declined=declined)
        try:  # a hint for a node that loses its database; never a reason to retry
            self.marks.record(job.series_uid, datetime.datetime.now(), results.n_instances,
                              list(results.reports))
        except OSError as error:
            log.warning("job %d: no run mark written for series %s: %s", job.id,
                        job.series_uid, type(error).__name__)
        if self.on_result is not None:
            for findings in results.findings:
                self.on_result(job, findings, list(results.paths))

    def _end(self, job: Job, end: Callable[..., Any], reason: str | None) -> Any:
        """Record an ending other than 'done' while this worker holds the lease: the queue
        changes nothing (False, None) once another worker has taken the job."""
        result = end(job.id, reason, owner=self.owner)
        if not result:
            raise LeaseLost(f"job {job.id}: {self.owner} no longer holds its lease")
        return result
