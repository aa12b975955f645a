"""The job runner: claims a job under this worker's lease, runs it through its pipeline, saves
what it made, and returns how it ended as an Outcome.

It is the only place where pixel data is decoded and models run. It records nothing about
the ending itself: the recorder does, so that an ending the store cannot take yet is kept and
written later. A job killed half-way is run again from the start (its earlier attempts'
files are removed first); a series run again names the earlier run's reports.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from covid_plugin.config import Settings
from covid_plugin.outputs import write_declined
from covid_plugin.pipelines.interface import Pipeline, Writer, analyse
from covid_plugin.store.jobs import Job, JobQueue, ReportRef
from covid_plugin.store.run_marks import RunMarks
from covid_plugin.store.spool import Spool
from covid_plugin.worker.outcome import Ending, Outcome, Results
from covid_plugin.worker.results import (
    attempt_folder,
    delivery,
    destinations_for,
    save_durably,
    superseding,
)

log = logging.getLogger(__name__)

# the disk, not the series, is at fault: the job is tried again later
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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


class JobRunner:
    """Claims jobs as `owner` and runs each through the pipeline for its modality."""

    def __init__(self, settings: Settings, spool: Spool, jobs: JobQueue,
                 pipelines: list[Pipeline], writer: Writer, marks: RunMarks,
                 owner: str) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.pipelines = {m: p for p in pipelines for m in p.modalities}
        self.writer = writer
        self.marks = marks  # each series' last run, for a re-run the database cannot link
        self.owner = owner  # holds the leases of the jobs this runner claims
        self._models: dict[str, Any] = {}
        self._current: Job | None = None  # the job running now, whose lease the heartbeat renews
        self._lost: int | None = None  # the running job whose lease is gone: said once

    def load_models(self) -> None:
        """Load every pipeline's models: a model that cannot load (hash mismatch, missing
        file) then stops the node at start, and the first study waits for no one."""
        for pipeline in dict.fromkeys(self.pipelines.values()):
            started = time.monotonic()
            self._models_for(pipeline)
            log.info("%s pipeline models loaded in %.1f s", pipeline.name,
                     time.monotonic() - started)

    def claim(self) -> Job | None:
        """The next queued job, now leased to this runner's owner; None when none waits."""
        return self.jobs.claim(self.owner)

    def renew_lease(self) -> None:
        """Called by the heartbeat thread while the worker thread is busy with a job."""
        job = self._current
        if job is None or job.id == self._lost:
            return  # a lost lease does not come back: the run ends 'dropped'
        if not self.jobs.renew(job.id, self.owner):
            self._lost = job.id
            log.error("job %d (series %s): lease lost; another worker may run it, and this "
                      "run's results will be dropped", job.id, job.series_uid)

    def run(self, job: Job) -> Outcome:
        """Run a claimed job under its lease; every way it can end is an outcome."""
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

    def _io_failure(self, job: Job, exc: OSError) -> Outcome:
        """A file operation failed: for lack of space the job is tried later (the disk, not
        the series, is at fault), anything else fails it."""
        # give back what it had taken
        shutil.rmtree(attempt_folder(self.settings.results_dir, job), ignore_errors=True)
        cause = system_error(exc)
        detail = (cause.strerror or str(cause)) if cause is not None else type(exc).__name__
        if cause is None or cause.errno not in _NO_SPACE:
            log.error("job %d (series %s) failed: %s", job.id, job.series_uid, detail)
            return Outcome(Ending.FAILED, f"a file could not be read or written: {detail}")
        log.error("job %d (series %s): no space for results (%s); will retry", job.id,
                  job.series_uid, detail)
        return Outcome(Ending.RETRY, f"no space to write results ({detail})")

    def _models_for(self, pipeline: Pipeline) -> Any:
        if pipeline.name not in self._models:
            self._models[pipeline.name] = pipeline.load_models(
                self.settings.models_dir, self.settings.device)
        return self._models[pipeline.name]

    def _writer_for(self, job: Job, n_instances: int) -> tuple[Writer, int | None]:
        """The writer for this run, and the job whose results it replaces: a re-run's report
        names the earlier reports, found in the database, else in the data dir's run mark."""
        earlier, n_before, previous = self.jobs.previous_run(job)
        if earlier is not None:
            log.info("job %d re-runs series %s: its results replace those of job %d", job.id,
                     job.series_uid, earlier)
            return superseding(self.writer, previous, n_before, n_instances), earlier
        if (mark := self.marks.last_run(job.series_uid)) is not None:
            # the database holds no earlier run (it was lost or replaced); the data dir does
            log.info("job %d re-runs series %s, last run %s by the data dir's run mark",
                     job.id, job.series_uid, mark.run_at.isoformat(timespec="seconds"))
            return superseding(self.writer, mark.reports, mark.n_instances, n_instances,
                               mark.run_at), None
        return self.writer, None

    def _process(self, job: Job) -> Outcome:
        """Run the job through its pipeline and save what it made."""
        pipeline = self.pipelines[job.modality]
        paths = self.spool.instance_paths(job.series_uid)
        writer, earlier = self._writer_for(job, len(paths))
        analysis = analyse(pipeline, self._models_for(pipeline), paths, writer,
                           write_declined if self.settings.declined_reports else None)
        results, note = analysis.results, analysis.note
        if not results:
            if analysis.skipped == len(analysis.problems):
                return Outcome(Ending.SKIPPED, note or "skipped")
            return Outcome(Ending.FAILED, note or "no result")
        folder = attempt_folder(self.settings.results_dir, job)
        _remove_earlier_attempts(folder, job)
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


def _remove_earlier_attempts(folder: Path, job: Job) -> None:
    """Earlier attempts' files were never recorded as results (or this attempt would not
    exist): a killed run's leftovers, or a stalled worker's dropped ones. A later attempt's
    folder is not this run's to touch: if this worker stalled past its lease, that is the
    winner's, and its outbox rows point into it."""
    for earlier_attempt in folder.parent.glob("*"):
        if earlier_attempt.name.isdigit() and int(earlier_attempt.name) < job.attempts:
            shutil.rmtree(earlier_attempt, ignore_errors=True)
