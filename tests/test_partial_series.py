"""Partial series are not processed, and a re-run visibly replaces the earlier result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from pynetdicom import AE

from tests.conftest import REPO, rider_files, wait_for
from tests.dicom_validators import DCIODVFY, DSRDUMP, dciodvfy_errors, dsrdump
from tests.test_node_ingest import index, storescu


def jobs(node) -> list[tuple[str, int | None]]:
    return [(r["state"], r["n_instances_at_queue"]) for r in index(node).execute(
        "SELECT state, n_instances_at_queue FROM jobs ORDER BY id")]


def send_then_die(port: int, n: int) -> None:
    """A sender killed (kill -9) after `n` acknowledged instances, in the middle of a series."""
    datasets = [pydicom.dcmread(p) for p in rider_files(n + 5)]
    ae = AE(ae_title="DYINGSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN")
    for ds in datasets[:n]:
        assert assoc.send_c_store(ds).Status == 0
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.data
def test_series_from_a_killed_sender_waits_for_the_resend(node_factory, storescp_factory):
    pacs = storescp_factory().start()
    node = node_factory({
        "quiet_period_s": 1, "jobs": {"incomplete_timeout_s": 4},
        "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
    }).start()
    dying = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_partial_series import "
         f"send_then_die; send_then_die({node.port}, 25)"], cwd=REPO, timeout=60)
    assert dying.returncode == -9
    time.sleep(2.5)  # well past the quiet period: the 25 slices are not processed
    assert jobs(node) == [("received", None)]
    db = index(node)
    assert db.execute("SELECT interrupted_at FROM series").fetchone()[0]  # connection lost
    # the sender does not come back: recorded as incomplete, nothing sent to the PACS
    wait_for(lambda: jobs(node)[0][0] == "rejected", timeout=10, what="incomplete recorded")
    reason, incomplete = db.execute("SELECT reason, incomplete FROM jobs").fetchone()
    assert reason.startswith("incomplete: the transfer broke off after 25 instance(s)")
    assert incomplete == 1  # the resend below opens a new job because of this column
    # the PACS sends the whole series again: it is processed once, complete
    assert storescu(node.port, rider_files(40)).returncode == 0
    wait_for(lambda: jobs(node) == [("rejected", 25), ("done", 40)], timeout=60,
             what="the resent series done")
    wait_for(lambda: len(pacs.files()) == 2, timeout=30, what="results")
    time.sleep(1)
    assert len(pacs.files()) == 2  # one result set, from the complete series


@pytest.mark.data
@pytest.mark.slow
def test_node_killed_during_receive_holds_the_partial_series(node_factory):
    node = node_factory({"quiet_period_s": 1, "jobs": {"incomplete_timeout_s": 600},
                         "selection": {"min_ct_slices": 5}}).start()
    datasets = [pydicom.dcmread(f) for f in rider_files(40)]
    acknowledged: list[str] = []
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COVID_PLUGIN")

    def killer() -> None:
        wait_for(lambda: len(acknowledged) >= 15, timeout=60, interval=0.001, what="15 acks")
        node.kill9()

    thread = threading.Thread(target=killer)
    thread.start()
    for ds in datasets:
        if getattr(assoc.send_c_store(ds), "Status", None) != 0:
            break
        acknowledged.append(ds.SOPInstanceUID)
    thread.join()
    assoc.abort()
    node.start()
    time.sleep(3)  # quiet period and start-up hold both over: still not processed
    assert jobs(node) == [("received", None)]
    # the sender's retry completes it
    assert storescu(node.port, rider_files(40)).returncode == 0
    wait_for(lambda: jobs(node) == [("done", 40)], timeout=60, what="complete series done")


@pytest.mark.data
def test_late_instances_rerun_the_series_and_supersede_the_earlier_report(
        node_factory, storescp_factory):
    pacs = storescp_factory().start()
    node = node_factory({"destinations": [
        {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]}).start()
    files = rider_files(26)
    assert storescu(node.port, files[:20]).returncode == 0
    wait_for(lambda: len(pacs.files()) == 2, timeout=60, what="first results")
    first = {ds.Modality: ds for ds in map(pydicom.dcmread, pacs.files())}
    assert storescu(node.port, files[20:]).returncode == 0  # six slices arrive late
    wait_for(lambda: len(pacs.files()) == 4, timeout=60, what="second results")
    assert jobs(node) == [("done", 20), ("done", 26)]
    reports = [ds for ds in map(pydicom.dcmread, pacs.files()) if ds.Modality == "SR"]
    [second] = [ds for ds in reports if ds.SOPInstanceUID != first["SR"].SOPInstanceUID]
    predecessor = second.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first["SR"].StudyInstanceUID
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first["SR"].SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        first["SR"].SOPInstanceUID)
    assert "PredecessorDocumentsSequence" not in first["SR"]
    assert index(node).execute("SELECT supersedes FROM jobs WHERE id = 2").fetchone()[0] == 1
    path = next(p for p in pacs.files()
                if pydicom.dcmread(p).SOPInstanceUID == second.SOPInstanceUID)
    if DSRDUMP:
        assert "Replaces the earlier AI result for this series (20 instances)" in dsrdump(path)
    if DCIODVFY:
        assert dciodvfy_errors(path) == []


def test_a_queued_run_waits_for_late_instances_and_is_superseded(tmp_path):
    from covid_plugin.store.db import SQLiteDatabase
    from covid_plugin.store.jobs import JobQueue

    db = SQLiteDatabase(tmp_path / "db.sqlite")
    queue = JobQueue(db)
    with db.transaction() as conn:
        conn.execute("INSERT INTO series VALUES ('1.1', '1', 'CT', '', '', '', '', 'A', 30, "
                     "0, 0, 0, NULL)")
        conn.execute("INSERT INTO jobs (series_uid, state, created_at, updated_at) "
                     "VALUES ('1.1', 'queued', 0, 0), ('1.1', 'received', 0, 0)")
    assert queue.claim("w") is None  # more instances are arriving: the queued run would be partial
    queue.close(2, None)
    assert [(j.state, j.reason) for j in queue.all()] == [
        ("superseded", "more instances arrived before it ran; job 2 runs instead"),
        ("queued", None)]
    assert queue.claim("w").id == 2


@pytest.mark.data
def test_connection_closed_before_the_released_event_still_counts_as_released(tmp_path):
    """pynetdicom fires EVT_RELEASED on the association's thread after sending the
    A-RELEASE-RP, and the sender's close fires EVT_CONN_CLOSE on the DUL thread: on a loaded
    machine the close comes first. A normal release must not then be taken for a broken-off
    transfer (the series would wait an hour and be rejected as incomplete)."""
    from types import SimpleNamespace

    from pynetdicom import evt
    from pynetdicom.pdu import A_RELEASE_RQ

    from covid_plugin.config import Settings
    from covid_plugin.instance import read_header
    from covid_plugin.node.scp import StorageSCP
    from covid_plugin.observability import Metrics
    from covid_plugin.store.associations import Associations
    from covid_plugin.store.db import SQLiteDatabase
    from covid_plugin.store.spool import Spool

    settings = Settings(data_dir=tmp_path)
    db = SQLiteDatabase(settings.db_path)
    spool = Spool(settings.spool_dir, db)
    data = rider_files(1)[0].read_bytes()
    header = read_header(data)
    spool.store(header, data, "PACS")
    scp = StorageSCP(settings, spool, Metrics(), Associations(db, "listener"))

    def state() -> tuple[float | None, float | None]:
        return tuple(db.connection().execute(
            "SELECT released_at, interrupted_at FROM series").fetchone())

    release = (evt.EVT_PDU_RECV, {"pdu": A_RELEASE_RQ()})
    for order in ([release, (evt.EVT_CONN_CLOSE, {}), (evt.EVT_RELEASED, {})],
                  [release, (evt.EVT_RELEASED, {}), (evt.EVT_CONN_CLOSE, {})]):
        assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
        scp._delivering(assoc, header.series_uid)
        for event, attrs in order:
            {evt.EVT_PDU_RECV: scp._on_pdu, evt.EVT_CONN_CLOSE: scp._on_conn_close,
             evt.EVT_RELEASED: scp._on_released}[event](evt.Event(assoc, event, attrs))
        released_at, interrupted_at = state()
        assert released_at is not None and interrupted_at is None, order
        with db.transaction() as conn:
            conn.execute("UPDATE series SET released_at = NULL")
    # a connection that closes without a release request is a broken-off transfer
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
    scp._delivering(assoc, header.series_uid)
    scp._on_conn_close(evt.Event(assoc, evt.EVT_CONN_CLOSE, {}))
    assert state()[1] is not None
