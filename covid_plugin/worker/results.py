"""A run's results on disk and where they go.

Each attempt writes into its own folder, so a stalled worker never touches the files of the
attempt that replaced it; files are fsynced before they are recorded, since the outbox will
send them; a re-run's report names the earlier run's report as its predecessor, so that a
PACS and a reader can tell which one stands.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydicom import Dataset

from covid_plugin.config import DicomwebDestination, Peer, Settings
from covid_plugin.findings import Findings, Predecessor
from covid_plugin.pipelines.interface import Writer
from covid_plugin.store.jobs import Job, ReportRef
from covid_plugin.store.outbox import Delivery
from covid_plugin.volume import LoadedSeries


def attempt_folder(results_dir: Path, job: Job) -> Path:
    """results/<job>/<attempt>: each claim counts an attempt, so no two runs share it."""
    return results_dir / str(job.id) / str(job.attempts)


def destinations_for(settings: Settings, calling_ae: str) -> list[Peer | DicomwebDestination]:
    """Configured destinations, else the calling PACS's return address."""
    if settings.destinations:
        return list(settings.destinations)
    peer = settings.return_address(calling_ae)
    return [peer] if peer else []


def delivery(destination: Peer | DicomwebDestination, path: Path, uid: str) -> Delivery:
    """One outbox row: a DICOMweb destination is named by its URL, a DICOM peer by AE@host:port."""
    if isinstance(destination, DicomwebDestination):
        parts = urlsplit(destination.url)
        return Delivery(path, uid, "", parts.hostname or "", parts.port or 0, destination.url)
    return Delivery(path, uid, destination.ae_title, destination.host, destination.port)


def save_durably(datasets: list[Dataset], folder: Path) -> list[tuple[Path, str]]:
    """Each dataset as <SOPInstanceUID>.dcm, on disk before it returns: what is recorded as
    a result (and queued to send) survives a crash. Returns the paths and their UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        saved.append((path, str(ds.SOPInstanceUID)))
    return saved


def superseding(writer: Writer, previous: list[ReportRef], n_before: int,
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
