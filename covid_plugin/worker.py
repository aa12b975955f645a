"""The worker: completes series, runs queued jobs through a pipeline, hands results to the outbox.

It is the only place where pixel data is decoded and models run, on its own thread, so that
the listener keeps answering while a CT is being segmented. A job killed half-way is run again
from the start at the next start-up (its partial result files are discarded first), up to the
attempt cap. Every way a job can end is recorded; when even that write fails (the disk is
full), the outcome is kept and written on a later round, so no job stays 'running'.
A series run again because more instances arrived names the earlier run's report as its
predecessor, and says so in the report, so that a PACS and a reader can tell which one stands.
Workers sharing a PostgreSQL database run jobs under leases: a job whose worker died is taken
by another once its lease expires, and a worker that lost its lease (it stalled for longer than
the lease) drops its results instead of recording them, so each job ends exactly once. Each
attempt writes into its own results folder, so a stalled worker never touches the files of
the attempt that replaced it.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydicom import Dataset

from covid_plugin.config import DicomwebDestination, Peer, Settings
from covid_plugin.findings import Findings, Predecessor
from covid_plugin.observability import Metrics
from covid_plugin.outage import Outage
from covid_plugin.outputs import write_declined
from covid_plugin.pipelines.interface import Pipeline, Writer, analyse
from covid_plugin.series import completion, incomplete_reason, rejection_reason
from covid_plugin.store.db import STORE_ERRORS
from covid_plugin.store.jobs import Delivery, Job, JobQueue, JobState, LeaseLost, ReportRef
from covid_plugin.store.retention import purge
from covid_plugin.store.run_marks import RunMarks
from covid_plugin.store.spool import Spool
from covid_plugin.volume import LoadedSeries

log = logging.getLogger(__name__)

# the disk, not the series, is at fault: the job is tried again later
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Ending(StrEnum):
    """How a job ended, as the worker logs and counts it: the `outcome` label of
    covid_plugin_jobs_total, whose values dashboards read (keep the strings)."""

    DONE = "done"
    SKIPPED = "skipped"  # the pipeline declined the series (its "not analysed" report is sent)
    RETRY = "retry"  # the node, not the series, was at fault (a full disk): queued again
    FAILED = "failed"
    DROPPED = "dropped"  # found on recording: another worker took the job, its run stands


@dataclass(frozen=True)
class Results:
    """What a run made, recorded with its job in one transaction and then announced."""

    deliveries: tuple[Delivery, ...]  # an outbox row per saved file and destination
    reports: tuple[ReportRef, ...]  # the SRs, which a later run of the series names
    paths: tuple[Path, ...]  # the saved files
    findings: tuple[Findings, ...]
    n_instances: int
    supersedes: int | None  # the job of the earlier run whose results these replace


@dataclass(frozen=True)
class Outcome:
    """What a run decided, as a value rather than a closure that writes it: it can be kept
    while the store takes no writes and written on a later round, by the one method that
    turns outcomes into JobQueue calls."""

    ending: Ending
    reason: str | None = None  # the job's recorded reason (a note beside results)
    results: Results | None = None

    def __post_init__(self) -> None:
        if self.ending is Ending.DROPPED:
            raise ValueError("'dropped' is found when recording, never decided by a run")
        if self.ending is Ending.DONE and self.results is None:
            raise ValueError("a 'done' outcome carries its results")
        if self.results is not None and self.ending not in (Ending.DONE, Ending.SKIPPED):
            raise ValueError(f"a '{self.ending}' outcome sends no results")


def system_error(exc: BaseException) -> OSError | None:
    """The OSError that carries the system's errno, following __cause__ and __context__:
    pydicom re-raises a failed write as `type(exc)(message)` (pydicom.tag.tag_in_exception),
    an OSError without errno whose message is a whole traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def destinations_for(settings: Settings, calling_ae: str) -> list[Peer | DicomwebDestination]:
    """Configured destinations, else the calling PACS's return address."""
    if settings.destinations:
        return list(settings.destinations)
    peer = settings.return_addresses.get(calling_ae)
    return [peer] if peer else []


def delivery(destination: Peer | DicomwebDestination, path: Path, uid: str) -> Delivery:
    """One outbox row: a DICOMweb destination is named by its URL, a DICOM peer by AE@host:port."""
    if isinstance(destination, DicomwebDestination):
        parts = urlsplit(destination.url)
        return Delivery(path, uid, "", parts.hostname or "", parts.port or 0, destination.url)
    return Delivery(path, uid, destination.ae_title, destination.host, destination.port)


def save_durably(datasets: list[Dataset], folder: Path) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        saved.append((path, str(ds.SOPInstanceUID)))
    return saved


def _superseding(writer: Writer, previous: list[ReportRef], n_before: int,
                 n_now: int, run_at: datetime.datetime | None = None) -> Writer:
    """The writer for a re-run: its report names the earlier reports as predecessors and says,
    in words a reader sees in the SR and on the secondary capture, that it replaces them
    (and when the earlier run was, where its mark says)."""
    reports = [Predecessor(r.study_uid, r.series_uid, r.sop_class_uid, r.sop_instance_uid)
               for r in previous]
    made = f", made {run_at:%Y-%m-%d %H:%M}" if run_at is not None else ""

    def write(findings: Findings, series: LoadedSeries) -> list[Dataset]:
        findings.predecessors = reports
        findings.notes.append(f"Replaces the earlier AI result for this series "
                              f"({n_before} instances){made}; this one used {n_now}.")
        return writer(findings, series)
    return write


class Worker:
    """Series tracker + job runner, one thread."""

    def __init__(self, settings: Settings, spool: Spool, jobs: JobQueue, metrics: Metrics,
                 pipelines: list[Pipeline], writer: Writer,
                 active_series: Callable[[], set[str]],
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None,
                 owner: str = "worker", reap: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.owner = owner  # holds the leases of the jobs this worker claims
        self.reap = reap  # ends the associations of listeners that stopped answering
        self.spool = spool
        self.jobs = jobs
        self.metrics = metrics
        self.writer = writer
        self.active_series = active_series
        self.on_result = on_result  # the demo prints findings; the node itself needs none
        self.marks = RunMarks(settings.results_dir)  # each series' last run, beside its results
        self._pipelines = {m: p for p in pipelines for m in p.modalities}
        self._models: dict[str, Any] = {}
        self._held_until = 0.0  # no series is closed before one quiet period after start
        self._unrecorded: list[tuple[Job, Outcome]] = []  # not written yet: kept to retry
        self._next_purge = 0.0
        self._next_housekeeping = 0.0
        self._current: Job | None = None  # the job running now, whose lease the heartbeat renews
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self) -> None:
        """Load every model first: a model that cannot load (hash mismatch, missing file)
        stops the node at start, and the first study waits for no one."""
        for pipeline in dict.fromkeys(self._pipelines.values()):
            started = time.monotonic()
            self._models_for(pipeline)
            log.info("%s pipeline models loaded in %.1f s", pipeline.name,
                     time.monotonic() - started)
        self._held_until = time.time() + self.settings.quiet_period_s
        self._next_purge = time.time() + self.settings.quiet_period_s
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def unrecorded(self) -> list[int]:
        """Jobs whose outcome could not be written yet (health reports them)."""
        return [job.id for job, _ in self._unrecorded]

    def renew_lease(self) -> None:
        """Called by the heartbeat thread while the worker thread is busy with a job."""
        job = self._current
        if job is not None and not self.jobs.renew(job.id, self.owner):
            log.error("job %d (series %s): lease lost; another worker may run it, and this "
                      "run's results will be dropped", job.id, job.series_uid)

    def housekeeping(self) -> None:
        """Every heartbeat: end the associations of dead listeners, and take back the jobs of
        dead workers (queued again, or quarantined at the attempt cap)."""
        t = time.time()
        if t < self._next_housekeeping:
            return
        self._next_housekeeping = t + self.settings.cluster.heartbeat_s
        if self.reap is not None:
            self.reap()  # both log what they took back
        self.jobs.expire_leases()

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
            if reason is None and series.modality not in self._pipelines:
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

    def run_one(self) -> bool:
        """Run the next queued job, if any; returns whether there was one.

        Nothing is claimed while an earlier outcome is still unwritten: the store cannot take
        writes, and a claim would only add a second job to recover.
        """
        if not self.record_pending():
            return False
        job = self.jobs.claim(self.owner)
        if job is None:
            return False
        started = time.monotonic()
        outcome = self._attempt(job)
        ended = self._record(job, outcome)
        log.info("job %d (series %s) %s in %.2f s", job.id, job.series_uid,
                 ended or f"{outcome.ending}, not recorded yet,", time.monotonic() - started)
        return True

    def _attempt(self, job: Job) -> Outcome:
        """Run the claimed job under its lease; every way it can end is an outcome."""
        self._current = job
        try:
            return self._process(job)
        except OSError as exc:
            return self._io_failure(job, exc)
        except Exception as exc:  # one bad job must not stop the others
            # no exception text in the reason or at INFO: it can quote header values
            log.error("job %d (series %s) failed: %s", job.id, job.series_uid,
                      type(exc).__name__)
            log.debug("job %d failure details", job.id, exc_info=exc)
            return Outcome(Ending.FAILED, f"internal error ({type(exc).__name__}); "
                                          "details at DEBUG")
        finally:
            self._current = None

    def record_pending(self) -> bool:
        """Write outcomes that could not be written before; True when none is left."""
        pending, self._unrecorded = self._unrecorded, []
        for job, outcome in pending:
            self._record(job, outcome)
        return not self._unrecorded

    def _record(self, job: Job, outcome: Outcome) -> Ending | None:
        """Write the outcome and count it; returns the ending that stands (DROPPED when the
        lease was lost), or None while it could not be written (it is kept to retry)."""
        ending = outcome.ending
        try:
            self._write(job, outcome)
        except LeaseLost:
            # another worker took the job after this one's lease expired: its run stands
            log.error("job %d (series %s): lease lost before the outcome was recorded; this "
                      "run's results are dropped", job.id, job.series_uid)
            shutil.rmtree(self._folder(job), ignore_errors=True)
            ending = Ending.DROPPED
        except (*STORE_ERRORS, OSError) as exc:
            log.error("job %d (series %s): outcome not recorded (%s); will retry", job.id,
                      job.series_uid, exc)
            self._unrecorded.append((job, outcome))
            return None
        self.metrics.jobs.labels(outcome=ending.value).inc()
        return ending

    def _write(self, job: Job, outcome: Outcome) -> None:
        """The one place an outcome becomes JobQueue calls, under this worker's lease."""
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

    def _io_failure(self, job: Job, exc: OSError) -> Outcome:
        """A file operation failed: for lack of space the job is tried later (the disk, not
        the series, is at fault), anything else fails it."""
        shutil.rmtree(self._folder(job), ignore_errors=True)  # give back what it had taken
        cause = system_error(exc)
        detail = (cause.strerror or str(cause)) if cause is not None else type(exc).__name__
        if cause is None or cause.errno not in _NO_SPACE:
            log.error("job %d (series %s) failed: %s", job.id, job.series_uid, detail)
            return Outcome(Ending.FAILED, f"a file could not be read or written: {detail}")
        log.error("job %d (series %s): no space for results (%s); will retry", job.id,
                  job.series_uid, detail)
        return Outcome(Ending.RETRY, f"no space to write results ({detail})")

    def _folder(self, job: Job) -> Path:
        """results/<job>/<attempt>: each claim counts an attempt, so no two runs share it."""
        return self.settings.results_dir / str(job.id) / str(job.attempts)

    def _models_for(self, pipeline: Pipeline) -> Any:
        if pipeline.name not in self._models:
            self._models[pipeline.name] = pipeline.load_models(
                self.settings.models_dir, self.settings.device)
        return self._models[pipeline.name]

    def _process(self, job: Job) -> Outcome:
        """Run the job through its pipeline and save what it made."""
        pipeline = self._pipelines[job.modality]
        paths = self.spool.instance_paths(job.series_uid)
        earlier, n_before, previous = self.jobs.previous_run(job)
        writer = self.writer
        if earlier is not None:
            log.info("job %d re-runs series %s: its results replace those of job %d", job.id,
                     job.series_uid, earlier)
            writer = _superseding(self.writer, previous, n_before, len(paths))
        elif (mark := self.marks.last_run(job.series_uid)) is not None:
            # the database holds no earlier run (it was lost or replaced); the data dir does
            log.info("job %d re-runs series %s, last run %s by the data dir's run mark",
                     job.id, job.series_uid, mark.run_at.isoformat(timespec="seconds"))
            writer = _superseding(self.writer, mark.reports, mark.n_instances, len(paths),
                                  mark.run_at)
        analysis = analyse(pipeline, self._models_for(pipeline), paths, writer,
                           write_declined if self.settings.declined_reports else None)
        results, note = analysis.results, analysis.note
        if not results:
            if analysis.skipped == len(analysis.problems):
                return Outcome(Ending.SKIPPED, note or "skipped")
            return Outcome(Ending.FAILED, note or "no result")
        folder = self._folder(job)
        # earlier attempts' files were never recorded as results (or this attempt would not
        # exist): a killed run's leftovers, or a stalled worker's dropped ones. A later
        # attempt's folder is not this run's to touch: if this worker stalled past its lease,
        # that is the winner's, and its outbox rows point into it
        for earlier_attempt in folder.parent.glob("*"):
            if earlier_attempt.name.isdigit() and int(earlier_attempt.name) < job.attempts:
                shutil.rmtree(earlier_attempt, ignore_errors=True)
        datasets = [ds for _, objects in results for ds in objects]
        saved = save_durably(datasets, folder)
        reports = tuple(ReportRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                  str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                        for ds in datasets if ds.Modality == "SR")
        deliveries = tuple(
            delivery(destination, path, uid)
            for destination in destinations_for(self.settings, job.calling_ae)
            for path, uid in saved
        )
        if not deliveries:
            log.warning("job %d: no destination configured for %s; results kept in %s",
                        job.id, job.calling_ae, folder)

        # every film or series declined: only "not analysed" reports, which are sent, and the
        # job is rejected with the reason, as a series the pipeline declines is
        declined = all(findings.classification is None for findings, _ in results)
        made = Results(deliveries, reports, tuple(path for path, _ in saved),
                       tuple(findings for findings, _ in results), len(paths), earlier)
        return Outcome(Ending.SKIPPED if declined else Ending.DONE, note, made)

    def purge_if_due(self) -> None:
        """Apply the retention policy every `retention.interval_s`."""
        t = time.time()
        if t < self._next_purge:
            return
        self._next_purge = t + self.settings.retention.interval_s
        report = purge(self.settings, self.spool.db, dry_run=False)
        if report.total_files or report.total_rows:
            log.info("retention: %s", report.summary())

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
