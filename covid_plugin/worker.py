"""The worker: completes series, runs queued jobs through a pipeline, hands results to the outbox.

It is the only place where pixel data is decoded and models run, on its own thread, so that
the listener keeps answering while a CT is being segmented. A job killed half-way is run again
from the start at the next start-up (its partial result files are discarded first).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydicom import Dataset

from covid_plugin.config import DicomwebDestination, Peer, Settings
from covid_plugin.findings import Findings
from covid_plugin.observability import Metrics
from covid_plugin.outputs import OutputError, write_declined
from covid_plugin.series import is_complete, rejection_reason
from covid_plugin.store.jobs import Delivery, Job, JobQueue
from covid_plugin.store.spool import Spool
from covid_plugin.volume import LoadedSeries, SeriesError, load_series_files

log = logging.getLogger(__name__)


class SeriesSkipped(Exception):
    """A pipeline declines a series it cannot honestly process (a lateral film, say)."""


class Pipeline(Protocol):
    """What the worker needs of a pipeline; pipelines/ holds the real ones.

    A pipeline may set `per_instance = True` to see each instance of a series on its own
    (radiographs: one series can hold a PA and a lateral film).
    """

    name: str
    modalities: tuple[str, ...]

    def load_models(self, models_dir: Path, device: str) -> Any: ...

    def run(self, series: LoadedSeries, models: Any) -> Findings: ...


Writer = Callable[[Findings, LoadedSeries], list[Dataset]]
Decliner = Callable[[LoadedSeries, str], list[Dataset]]  # the "not analysed" report


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


@dataclass
class Analysis:
    """What came of running one pipeline over one series' files."""

    results: list[tuple[Findings, list[Dataset]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def note(self) -> str | None:
        return "; ".join(dict.fromkeys(self.problems)) or None


def analyse(pipeline: Pipeline, models: Any, paths: list[Path], writer: Writer,
            decline: Decliner | None = None) -> Analysis:
    """Load, run and write; a radiograph pipeline sees each film on its own.

    Problems with the input are collected as reasons, not raised: the caller records them.
    With `decline`, a series the pipeline declines still yields a result: the short report
    that says why, sent like any other.
    """
    units = [[p] for p in paths] if getattr(pipeline, "per_instance", False) else [paths]
    out = Analysis()
    for unit in units:
        try:
            series = load_series_files(unit)
            findings = pipeline.run(series, models)
            out.results.append((findings, writer(findings, series)))
        except SeriesError as exc:
            out.problems.append(f"series cannot be loaded: {exc.reason}")
        except SeriesSkipped as exc:
            out.skipped += 1
            out.problems.append(f"skipped by the {pipeline.name} pipeline: {exc}")
            if decline is not None:
                declined = Findings(pipeline.name, series.series_instance_uid,
                                    notes=[f"not analysed: {exc}"])
                try:
                    out.results.append((declined, decline(series, str(exc))))
                except OutputError as error:
                    out.problems.append(f"report cannot be encoded: {error.reason}")
        except OutputError as exc:
            out.problems.append(f"results cannot be encoded: {exc.reason}")
    return out


class Worker:
    """Series tracker + job runner, one thread."""

    def __init__(self, settings: Settings, spool: Spool, jobs: JobQueue, metrics: Metrics,
                 pipelines: list[Pipeline], writer: Writer,
                 active_series: Callable[[], set[str]],
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.metrics = metrics
        self.writer = writer
        self.active_series = active_series
        self.on_result = on_result  # the demo prints findings; the node itself needs none
        self._pipelines = {m: p for p in pipelines for m in p.modalities}
        self._models: dict[str, Any] = {}
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
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close_complete_series(self) -> int:
        """Queue or reject every series that has gone quiet; returns how many were closed."""
        active, t, closed = self.active_series(), time.time(), 0
        for series in self.jobs.open_series():
            if not is_complete(series, t, self.settings.quiet_period_s, active):
                continue
            reason = rejection_reason(series, self.settings.selection)
            if reason is None and series.modality not in self._pipelines:
                reason = f"no pipeline for modality {series.modality}"
            self.jobs.close(series.job_id, reason)
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
        """Run the oldest queued job, if any; returns whether there was one."""
        job = self.jobs.claim()
        if job is None:
            return False
        started = time.monotonic()
        try:
            outcome = self._process(job)
        except Exception as exc:  # one bad job must not stop the others
            log.exception("job %d (series %s) failed", job.id, job.series_uid)
            self.jobs.fail(job.id, f"{type(exc).__name__}: {exc}")
            self.metrics.jobs.labels(outcome="failed").inc()
            return True
        self.metrics.jobs.labels(outcome=outcome).inc()
        log.info("job %d (series %s) %s in %.2f s", job.id, job.series_uid, outcome,
                 time.monotonic() - started)
        return True

    def _models_for(self, pipeline: Pipeline) -> Any:
        if pipeline.name not in self._models:
            self._models[pipeline.name] = pipeline.load_models(
                self.settings.models_dir, self.settings.device)
        return self._models[pipeline.name]

    def _process(self, job: Job) -> str:
        pipeline = self._pipelines[job.modality]
        outcome = analyse(pipeline, self._models_for(pipeline),
                          self.spool.instance_paths(job.series_uid), self.writer,
                          write_declined if self.settings.declined_reports else None)
        results, note = outcome.results, outcome.note
        if not results:
            if outcome.skipped == len(outcome.problems):
                self.jobs.skip(job.id, note or "skipped")
                return "skipped"
            self.jobs.fail(job.id, note or "no result")
            return "failed"
        folder = self.settings.results_dir / str(job.id)
        shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted earlier run
        saved = save_durably([ds for _, datasets in results for ds in datasets], folder)
        deliveries = [
            delivery(destination, path, uid)
            for destination in destinations_for(self.settings, job.calling_ae)
            for path, uid in saved
        ]
        if not deliveries:
            log.warning("job %d: no destination configured for %s; results kept in %s",
                        job.id, job.calling_ae, folder)
        self.jobs.finish(job.id, deliveries, note)
        if self.on_result is not None:
            for findings, _ in results:
                self.on_result(job, findings, [path for path, _ in saved])
        return "done"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.close_complete_series()
                if self.run_one():
                    continue
            except Exception:  # the store was busy or broken for a moment: try again
                log.exception("worker round failed")
            self._stop.wait(0.2)
