"""`covid-plugin demo`: the whole product on one machine, in a minute.

Starts the node on embedded defaults and an ephemeral port, a local storage peer standing in
for the PACS, sends `dicom_samples/` by C-STORE as that PACS, waits until every series has
been answered, prints the findings and says where the files are.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt

from covid_plugin.config import Settings
from covid_plugin.findings import Findings
from covid_plugin.service import Node
from covid_plugin.store.jobs import Job
from covid_plugin.store.outbox import OutboxState
from covid_plugin.store.states import ENDED_STATES, JobState
from covid_plugin.summary import ResultRow, format_table

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PACS_AE = "DEMO_PACS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settled(jobs: list[Job], pending_results: int) -> bool:
    """The demo stops waiting: every job has ended, whichever way (quarantined and superseded
    too), and no result is waiting to be sent."""
    return bool(jobs) and all(j.state in ENDED_STATES for j in jobs) and not pending_results


class ResultReceiver:
    """A storage SCP that files what the node sends back, as the PACS would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.ae = AE(ae_title=PACS_AE)
        self.ae.supported_contexts = StoragePresentationContexts
        self.received: list[Path] = []
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        path = self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        self.received.append(path)
        return 0x0000

    def start(self) -> None:
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def send_folder(folder: Path, port: int, called: str) -> int:
    """C-STORE every DICOM file under `folder` in one association, as the PACS."""
    datasets = [dcmread(p) for p in sorted(folder.rglob("*.dcm"))]
    ae = AE(ae_title=PACS_AE)
    for syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(*syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"could not associate with the node on port {port}")
    sent = 0
    for ds in datasets:
        status = assoc.send_c_store(ds)
        sent += getattr(status, "Status", None) == 0
    assoc.release()
    return sent


def run_demo(samples: Path, workdir: Path, timeout_s: float = 900) -> int:
    receiver = ResultReceiver(workdir / "received")
    receiver.start()
    settings = Settings(
        port=_free_port(), host="127.0.0.1", data_dir=workdir / "node", quiet_period_s=2,
        return_addresses={PACS_AE: {"ae_title": PACS_AE, "host": "127.0.0.1",
                                    "port": receiver.port}},
        outbox={"poll_interval_s": 0.2},
    )
    findings: dict[str, Findings] = {}
    lock = threading.Lock()

    def on_result(job: Job, result: Findings, paths: list[Path]) -> None:
        with lock:
            findings[job.series_uid] = result

    node = Node(settings, on_result=on_result)
    node.start()
    try:
        started = time.monotonic()
        sent = send_folder(samples, node.scp.port, settings.ae_title)
        print(f"sent {sent} instances from {samples} to {settings.ae_title} on port "
              f"{node.scp.port}; waiting for results ...")
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if settled(node.jobs.all(), node.outbox.counts().get(OutboxState.PENDING, 0)):
                break
            time.sleep(0.5)
        else:
            print(f"timed out after {timeout_s:.0f} s")
        elapsed = time.monotonic() - started
        rows = [ResultRow(j.series_uid, j.modality, j.state, findings.get(j.series_uid),
                          j.reason or "") for j in node.jobs.all()]
    finally:
        node.stop()
        receiver.stop()
    for row in rows:
        row.n_files = sum(1 for _ in (settings.spool_dir).glob(f"*/{row.series_uid}/*.dcm"))
    print(format_table(rows))
    print(f"\n{len(receiver.received)} result objects (SR, SEG, SC) received by the local "
          f"PACS peer in {receiver.folder}")
    print(f"node state (spool, SQLite index, results): {settings.data_dir}")
    print(f"from the first C-STORE to the last result acknowledged: {elapsed:.1f} s")
    ok = rows and all(r.outcome in (JobState.DONE, JobState.REJECTED) for r in rows)
    return 0 if ok else 1
