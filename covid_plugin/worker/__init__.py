"""The worker: completes series, runs queued jobs through a pipeline, hands results to the outbox.

It runs on its own thread, so that the listener keeps answering while a CT is being
segmented. One round, along the data path: housekeeping takes back what dead peers held
(housekeeping.py), the tracker closes series that have gone quiet into jobs (tracker.py), the
runner claims one job and runs it, returning an Outcome value (runner.py, outcome.py,
results.py), and the recorder writes that outcome to the queue (recorder.py). A round with no
job applies the retention policy. Workers sharing a PostgreSQL database run jobs under
leases: a job whose worker died is taken by another once its lease expires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from covid_plugin.config import Settings
from covid_plugin.findings import Findings
from covid_plugin.observability import Metrics
from covid_plugin.outage import Outage
from covid_plugin.pipelines.interface import Pipeline, Writer
from covid_plugin.store.jobs import Job, JobQueue
from covid_plugin.store.run_marks import RunMarks
from covid_plugin.store.spool import Spool
from covid_plugin.worker.housekeeping import Housekeeping
from covid_plugin.worker.recorder import OutcomeRecorder
from covid_plugin.worker.runner import JobRunner
from covid_plugin.worker.tracker import SeriesTracker

log = logging.getLogger(__name__)


class Worker:
    """Series tracker, job runner, outcome recorder and housekeeping on one thread."""

    def __init__(self, settings: Settings, spool: Spool, jobs: JobQueue, metrics: Metrics,
                 pipelines: list[Pipeline], writer: Writer,
                 active_series: Callable[[], set[str]],
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None,
                 owner: str = "worker", reap: Callable[[], int] | None = None) -> None:
        # what it works on, as before the split: callers and tests reach the queue here
        self.settings, self.spool, self.jobs, self.metrics = settings, spool, jobs, metrics
        self.owner = owner  # holds the leases of the jobs this worker claims
        marks = RunMarks(settings.results_dir)  # each series' last run, beside its results
        self.runner = JobRunner(settings, spool, jobs, pipelines, writer, marks, owner)
        self.tracker = SeriesTracker(settings, jobs, metrics, active_series,
                                     self.runner.pipelines.keys())
        self.recorder = OutcomeRecorder(jobs, metrics, marks, settings.results_dir, owner,
                                        on_result)
        self.upkeep = Housekeeping(settings, spool, jobs, reap)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self) -> None:
        """Load every model first (a model that cannot load stops the node at start), hold
        series and retention for one quiet period, then start the thread."""
        self.runner.load_models()
        held_until = time.time() + self.settings.quiet_period_s
        self.tracker.hold_until(held_until)
        self.upkeep.hold_purge_until(held_until)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def unrecorded(self) -> list[int]:
        """Jobs whose outcome could not be written yet (health reports them)."""
        return self.recorder.unrecorded()

    def renew_lease(self) -> None:
        """Called by the heartbeat thread while the worker thread is busy with a job."""
        self.runner.renew_lease()

    def housekeeping(self) -> None:
        """Take back what dead listeners and workers held, once per heartbeat."""
        self.upkeep.reap_if_due()

    def close_complete_series(self) -> int:
        """Queue or reject every series that has gone quiet; returns how many were closed."""
        return self.tracker.close_complete_series()

    def run_one(self) -> bool:
        """Run the next queued job, if any; returns whether there was one.

        Nothing is claimed while an earlier outcome is still unwritten: the store cannot take
        writes, and a claim would only add a second job to recover.
        """
        if not self.recorder.record_pending():
            return False
        job = self.runner.claim()
        if job is None:
            return False
        started = time.monotonic()
        outcome = self.runner.run(job)
        ended = self.recorder.record(job, outcome)
        log.info("job %d (series %s) %s in %.2f s", job.id, job.series_uid,
                 ended or f"{outcome.ending}, not recorded yet,", time.monotonic() - started)
        return True

    def record_pending(self) -> bool:
        """Write outcomes that could not be written before; True when none is left."""
        return self.recorder.record_pending()

    def purge_if_due(self) -> None:
        """Apply the retention policy every `retention.interval_s`."""
        self.upkeep.purge_if_due()

    def _run(self) -> None:
        outage = Outage("worker round", log, base_s=0.2)
        while not self._stop.is_set():
            try:
                self.housekeeping()
                self.close_complete_series()
                ran = self.run_one()
                if not ran:
                    self.purge_if_due()
                delay = outage.succeeded()
                if ran:
                    continue
            except Exception as exc:  # the store is away (a restart, an outage): try again
                delay = outage.failed(exc)
            self._stop.wait(delay)
