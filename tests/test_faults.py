"""Every acknowledged study ends in one result set or an alarm (issue 18), function by
function: a disk that fills inside a library's write, a destination down for hours, a database
that restarts, a listener or worker that stalls past its lease, bad input refused on receipt
or declined with a report, and what an administrator sees (health, which store a command
opened, a purge's dry run). The same faults with real processes are in test_cluster.py."""

from __future__ import annotations

import json
import logging
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode_file_meta

from covid_plugin.config import HealthSettings, OutboxSettings, Settings
from covid_plugin.health import attention, problems_and_warnings
from covid_plugin.instance import read_header
from covid_plugin.observability import Metrics
from covid_plugin.outage import Outage
from covid_plugin.outputs import write_all
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import SQLiteDatabase, open_database
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.outbox import Outbox
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker
from tests.conftest import (
    CHEST_CR,
    REPO,
    echo,
    free_port,
    rider_files,
    tls_client_context,
    tls_node_config,
    wait_for,
)
from tests.pipelines_for_tests import MeanIntensityPipeline
from tests.test_store_backends import add_jobs, add_series, delivery

RESULT_FILE_LIMIT = 256 * 1024  # the SR fits, the secondary capture's pixel data does not


class DiskFullForPixelData(MeanIntensityPipeline):
    """From this run on no file may grow past RESULT_FILE_LIMIT, as on a disk that is full:
    pydicom's write of the secondary capture's Pixel Data fails, and pydicom re-raises it
    as an OSError without errno."""

    def run(self, series, models):
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (RESULT_FILE_LIMIT, hard))
        return super().run(series, models)


def disk_full_in_pydicom_scenario(data_dir: str) -> None:
    """Runs in its own process (the file-size limit is process-wide); prints what happened."""
    settings = Settings(data_dir=Path(data_dir), quiet_period_s=0,
                        selection={"min_ct_slices": 2})
    db = SQLiteDatabase(settings.db_path)
    spool = Spool(settings.spool_dir, db)
    jobs = JobQueue(db, max_attempts=2, retry_after_s=0.01)
    for path in rider_files(3):
        data = path.read_bytes()
        spool.store(read_header(data), data, "PACS")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1")
    worker = Worker(settings, spool, jobs, Metrics(), [DiskFullForPixelData()], write_all, set)
    worker.close_complete_series()
    seen = []
    for _ in range(2):
        wait_for(lambda: worker.run_one() or jobs.get(1).state not in ("queued", "running"),
                 timeout=20, what="a run")
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the index may be written
        worker.record_pending()
        job = jobs.get(1)
        seen.append([job.state, job.reason])
    print(json.dumps(seen))


@pytest.mark.data
def test_a_disk_full_inside_pydicom_is_retried_then_quarantined(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_faults import "
         "disk_full_in_pydicom_scenario as s; s(sys.argv[1])", str(tmp_path / "var")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (first, first_reason), (second, second_reason) = json.loads(result.stdout.splitlines()[-1])
    assert first == "queued" and first_reason.startswith("will retry: no space to write results")
    assert second == "quarantined" and "no space to write results" in second_reason
    assert "Traceback" not in first_reason + second_reason


def test_results_are_retried_for_hours_and_go_dead_only_past_their_age(db):
    """With the default settings a PACS that is down keeps its results pending (a capped
    backoff, no cap on the tries): they go dead only once they are `dead_after_s` old."""
    settings = OutboxSettings()
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db)
    queue.finish(queue.claim("w").id, [delivery(0)], owner="w")
    outbox = Outbox.from_settings(db, settings)
    [item] = outbox.list()
    for _ in range(20):  # 2 s doubling to the 300 s cap: hours of tries
        assert outbox.mark_failed(item.id, "association failed") == "pending"
    [item] = outbox.list()
    assert item.next_attempt_at - time.time() > settings.backoff_max_s - 5
    with db.transaction() as conn:  # the result was made longer ago than dead_after_s
        conn.execute("UPDATE outbox SET created_at = created_at - ?",
                     (settings.dead_after_s + 1,))
    assert outbox.mark_failed(item.id, "association failed") == "dead"
    assert outbox.retry() == 1  # a retried result counts its age from the retry
    assert outbox.mark_failed(item.id, "association failed") == "pending"


def test_health_names_what_will_not_be_processed_or_delivered(tmp_path: Path, db):
    """Each check stays quiet on a healthy store, and names the series or job it found."""
    settings = Settings(data_dir=tmp_path, quiet_period_s=1,
                        health={"overdue_after_s": 60})
    jobs = JobQueue(db)
    outbox = Outbox.from_settings(db, settings.outbox)
    listener = Associations(db, "listener", stale_after_s=30)

    def found() -> dict[str, str]:
        return attention(settings, jobs, outbox, listener)

    old = time.time() - 3600
    add_series(db, "1.done", last_at=old)  # a healthy history: done, its result sent
    add_jobs(db, "1.done", "queued")
    jobs.finish(jobs.claim("w").id, [delivery(0)], owner="w")
    outbox.mark_sent(outbox.list()[0].id)
    listener.worker_heartbeat()
    assert found() == {}

    add_series(db, "1.dead", last_at=old)  # its result failed once it was a day old
    add_jobs(db, "1.dead", "queued")
    jobs.finish(jobs.claim("w").id, [delivery(1)], owner="w")
    with db.transaction() as conn:
        conn.execute("UPDATE outbox SET state = 'dead' WHERE sop_instance_uid = '9.1'")
    assert "1.dead" in found()["dead_results"]

    add_series(db, "1.waits", last_at=old)  # queued, and the only worker stopped
    add_jobs(db, "1.waits", "queued")
    assert "no_worker" not in found()
    with db.transaction() as conn:
        conn.execute("UPDATE listeners SET heartbeat_at = 0")
    assert found()["no_worker"].startswith("1 job(s) waiting")

    add_series(db, "1.overdue", last_at=old)  # released cleanly long ago, never queued
    add_jobs(db, "1.overdue", "received")
    add_series(db, "1.held", last_at=old)  # its association was aborted: waits for a resend
    add_jobs(db, "1.held", "received")
    add_series(db, "1.quiet", last_at=time.time())  # still inside its quiet period
    add_jobs(db, "1.quiet", "received")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1 "
                     "WHERE series_uid = '1.overdue'")
        conn.execute("UPDATE series SET interrupted_at = last_at + 1 "
                     "WHERE series_uid = '1.held'")
    assert found()["overdue_series"].endswith(": 1.overdue")
    assert found()["held_series"].endswith(": 1.held")

    add_series(db, "1.broken", last_at=old)  # recorded incomplete, never resent
    add_jobs(db, "1.broken", "rejected")
    add_series(db, "1.off", last_at=old)  # rejected by the selection rules: not a problem
    add_jobs(db, "1.off", "rejected")
    add_series(db, "1.poison", last_at=old)
    add_jobs(db, "1.poison", "quarantined")
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET reason = 'incomplete: the transfer broke off', "
                     "incomplete = ? WHERE series_uid = '1.broken'", (True,))
        conn.execute("UPDATE jobs SET reason = 'not a chest study' WHERE series_uid = '1.off'")
    report = found()
    assert report["incomplete_series"].endswith(": 1.broken")
    assert "(series 1.poison)" in report["quarantined_jobs"]
    assert sorted(report) == ["dead_results", "held_series", "incomplete_series",
                              "no_worker", "overdue_series", "quarantined_jobs"]

    lenient = settings.model_copy(update={"health": HealthSettings(
        warn_only=["held_series", "quarantined_jobs"])})
    problems, warnings = problems_and_warnings(lenient, report)
    assert len(problems) == 4 and len(warnings) == 2
    assert any("1.held" in w for w in warnings)


def test_a_listener_reaped_while_paused_registers_its_association_again(tmp_path: Path, db):
    """A listener paused past listener_stale_after_s with an association open is taken for
    dead: its association is ended as interrupted. Once it runs again, its heartbeat finds
    that out and registers the association again, and the sender's release completes the
    series; it is not held as incomplete."""
    from types import SimpleNamespace

    from covid_plugin.node.scp import StorageSCP
    from covid_plugin.series import completion

    add_series(db, "1.2.3")
    add_jobs(db, "1.2.3", "received")
    listener = Associations(db, "listener", stale_after_s=0.05)
    scp = StorageSCP(Settings(data_dir=tmp_path), Spool(tmp_path / "spool", db), Metrics(),
                     listener)
    scp.heartbeat()
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
    scp._delivering(assoc, "1.2.3")
    time.sleep(0.1)  # the listener is paused
    assert Associations(db, "worker", stale_after_s=0.05).reap() == 1
    assert listener.active_series() == set()
    scp.heartbeat()  # it runs again
    assert listener.active_series() == {"1.2.3"}
    scp._on_released(SimpleNamespace(assoc=assoc))  # the sender sent the rest and released
    [series] = JobQueue(db).open_series()
    assert completion(series, time.time() + 10, 1.0, listener.active_series()) == "complete"


def test_a_release_after_the_listener_was_reaped_still_completes_the_series(tmp_path: Path,
                                                                           db):
    """The release can come before the listener's next heartbeat: it is recorded for the
    series the association delivered to, though its rows are gone."""
    from types import SimpleNamespace

    from covid_plugin.node.scp import StorageSCP
    from covid_plugin.series import completion

    add_series(db, "1.2.3")
    add_jobs(db, "1.2.3", "received")
    listener = Associations(db, "listener", stale_after_s=0.05)
    scp = StorageSCP(Settings(data_dir=tmp_path), Spool(tmp_path / "spool", db), Metrics(),
                     listener)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
    scp._delivering(assoc, "1.2.3")
    time.sleep(0.1)
    Associations(db, "worker", stale_after_s=0.05).reap()
    scp._on_released(SimpleNamespace(assoc=assoc))
    [series] = JobQueue(db).open_series()
    assert completion(series, time.time() + 10, 1.0, set()) == "complete"


def test_an_outage_is_logged_when_it_starts_and_ends_with_a_growing_wait(caplog):
    log = logging.getLogger("tests.outage")
    outage = Outage("worker round", log, base_s=0.2, max_s=5.0)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        delays = [outage.failed(ConnectionError("server closed the connection"))
                  for _ in range(50)]
        outage.failed(TimeoutError("connect timed out"))  # another kind: said once
        assert outage.succeeded() == 0.2
        assert outage.succeeded() == 0.2
    assert delays[:5] == [0.4, 0.8, 1.6, 3.2, 5.0] and delays[-1] == 5.0
    assert [r.getMessage().split(" (")[0].split(",")[0] for r in caplog.records] == [
        "worker round failed", "worker round still failing", "worker round works again"]


@pytest.mark.data
def test_a_run_that_lost_its_lease_is_counted_and_logged_as_dropped(tmp_path: Path, db,
                                                                    caplog):
    settings = Settings(data_dir=tmp_path, quiet_period_s=0, selection={"min_ct_slices": 2})
    spool = Spool(settings.spool_dir, db)
    for path in rider_files(3):
        data = path.read_bytes()
        spool.store(read_header(data), data, "PACS")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1")

    class Stalls(MeanIntensityPipeline):
        def run(self, series, models):
            time.sleep(0.1)  # past the 0.05 s lease: another worker takes the job
            JobQueue(db).expire_leases()
            for _ in range(3):  # heartbeats while the run goes on: the loss is said once
                worker.runner.renew_lease()
            return super().run(series, models)

    metrics = Metrics()
    worker = Worker(settings, spool, JobQueue(db, lease_s=0.05), metrics, [Stalls()],
                    write_all, set, owner="stalled-worker")
    worker.close_complete_series()
    with caplog.at_level(logging.INFO, logger="covid_plugin.worker"):
        assert worker.run_one()
    assert "job 1 (series" in caplog.text and " dropped in " in caplog.text
    assert " done in " not in caplog.text
    assert caplog.text.count("lease lost; another worker may run it") == 1
    counted = {s.labels["outcome"]: s.value for m in metrics.registry.collect()
               if m.name == "covid_plugin_jobs" for s in m.samples
               if s.name.endswith("_total")}
    assert counted == {"dropped": 1.0}


def test_the_worker_rides_out_a_database_restart_logging_it_once(tmp_path: Path,
                                                                 postgres_server, caplog):
    """PostgreSQL stopped for a while under a running worker: one error when it goes, one line
    when it is back, not a traceback every 0.2 s; then a job queued meanwhile runs."""
    url = postgres_server.create_database()
    db = open_database(url, tmp_path / "unused.sqlite")
    settings = Settings(data_dir=tmp_path, quiet_period_s=0, database_url=url)
    worker = Worker(settings, Spool(settings.spool_dir, db), JobQueue(db), Metrics(),
                    [MeanIntensityPipeline()], write_all, set, owner="worker")
    with caplog.at_level(logging.INFO, logger="covid_plugin.worker"):
        worker.start()
        try:
            time.sleep(0.5)
            postgres_server.halt()
            try:
                time.sleep(3)
            finally:
                postgres_server.resume()
            wait_for(lambda: "works again" in caplog.text, timeout=20, what="recovery")
        finally:
            worker.stop()
            db.close()
    rounds = [r.getMessage() for r in caplog.records if r.name == "covid_plugin.worker"
              and r.levelno >= logging.WARNING]
    # the outage starts, its error changes once (the server goes from shutting down to
    # gone), it ends: three lines over 3 s and more, where each 0.2 s round logged before
    assert 2 <= len(rounds) <= 3, [m[:80] for m in rounds]
    assert rounds[0].startswith("worker round failed") and "works again" in rounds[-1]
    assert sum(r.exc_info is not None for r in caplog.records) == 1  # one traceback
    postgres_server.drop_database(url)


def test_the_first_write_and_read_after_a_database_restart_succeed(postgres_server):
    """A restart ends every session: the next BEGIN, or the next statement outside a
    transaction, finds its connection broken and is run once more on a new one, instead of
    failing (a listener answered the first C-STORE after a restart with 0xA700)."""
    url = postgres_server.create_database()
    db = open_database(url, Path("unused.sqlite"))
    try:
        add_series(db, "1.1")
        postgres_server.halt()
        postgres_server.resume()
        add_series(db, "1.2")  # a write: BEGIN on the old session
        postgres_server.halt()
        postgres_server.resume()
        assert db.connection().execute("SELECT COUNT(*) FROM series").fetchone()[0] == 2
    finally:
        db.close()
        postgres_server.drop_database(url)


@pytest.mark.data
def test_a_series_with_an_instance_refused_during_an_outage_waits_for_the_resend(
        tmp_path: Path, postgres_server):
    """The database stops in the middle of a transfer: the instance that came then is
    refused (0xA700), the rest are stored, and the sender releases. The series lacks the
    refused instance, so it is held until the sender sends it again, then runs whole."""
    from pynetdicom import AE

    from covid_plugin.node.scp import StorageSCP
    from covid_plugin.series import completion, delivered_cleanly

    url = postgres_server.create_database()
    settings = Settings(data_dir=tmp_path, port=0, database_url=url)
    db = open_database(url, Path("unused.sqlite"))
    listener = Associations(db, "listener")
    scp = StorageSCP(settings, Spool(settings.spool_dir, db), Metrics(), listener)
    scp.start()
    datasets = [pydicom.dcmread(p) for p in rider_files(3)]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)

    def series():
        [record] = JobQueue(db).open_series()
        return record

    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="COVID_PLUGIN")
        statuses = [assoc.send_c_store(datasets[0]).Status]
        postgres_server.halt()
        try:
            statuses.append(assoc.send_c_store(datasets[1]).Status)
        finally:
            postgres_server.resume()
        statuses.append(assoc.send_c_store(datasets[2]).Status)
        assoc.release()
        assert statuses == [0, 0xA700, 0]  # the first write after the restart is taken
        wait_for(lambda: series().interrupted_at is not None, timeout=10,
                 what="the series held")
        assert series().n_instances == 2 and not delivered_cleanly(series())
        assert completion(series(), time.time() + 60, 1.0, set()) == "wait"
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="COVID_PLUGIN")  # the resend
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [0, 0, 0]
        assoc.release()
        wait_for(lambda: delivered_cleanly(series()), timeout=10, what="the resend released")
        assert series().n_instances == 3
        assert completion(series(), time.time() + 60, 1.0, set()) == "complete"
    finally:
        scp.stop()
        db.close()
        postgres_server.drop_database(url)


def native_pixels_declared_jpeg2000(path: Path) -> Path:
    """The chest CR decoded, its native pixels written, its file meta still saying JPEG 2000:
    what a broken router sends (pydicom would not write it; the bytes are put together)."""
    ds = pydicom.dcmread(CHEST_CR)
    ds.PixelData = ds.pixel_array.tobytes()
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # how the dataset is encoded
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = ds.file_meta
    meta.TransferSyntaxUID = JPEG2000
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body.getvalue())
    return path


def send_files(port: int, paths: list[Path], syntax: str) -> list[int | None]:
    """pynetdicom sending files as they are (no decoding, no re-encoding)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPClassUID,
                             syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN")
    statuses = [getattr(assoc.send_c_store(p), "Status", None) for p in paths]
    assoc.release()
    return statuses


@pytest.mark.data
def test_native_pixels_under_a_compressed_transfer_syntax_are_refused_on_receipt(
        tmp_path: Path):
    """Acknowledged before, the job then failed 'internal error (ValueError)'; now the sender
    hears at once what is wrong, and the reason is recorded."""
    from covid_plugin.node.scp import StorageSCP

    settings = Settings(data_dir=tmp_path, port=0)
    db = SQLiteDatabase(settings.db_path)
    scp = StorageSCP(settings, Spool(settings.spool_dir, db), Metrics(),
                     Associations(db, "listener"))
    scp.start()
    try:
        statuses = send_files(scp.port, [native_pixels_declared_jpeg2000(
            tmp_path / "native.dcm")], JPEG2000)
    finally:
        scp.stop()
    assert statuses == [0xC000]
    [(reason,)] = db.connection().execute("SELECT reason FROM rejected_instances").fetchall()
    assert reason == ("Pixel Data is not encapsulated (defined length) but the transfer "
                      "syntax JPEG 2000 Image Compression requires compressed frames")
    assert db.connection().execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


def ct_series_with(folder: Path, steps_mm: list[float], tilt_degrees: float = 0.0
                   ) -> list[Path]:
    """Real RIDER slices restacked: slice i at z = sum of the first i steps, each tilted about
    the patient's left-right axis as a gantry tilt stores it (positions still step along z)."""
    folder.mkdir()
    tilt = np.radians(tilt_degrees)
    z = np.concatenate([[0.0], np.cumsum(steps_mm)])
    paths = []
    for i, source in enumerate(rider_files(len(z))):
        ds = pydicom.dcmread(source)
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(-np.sin(tilt))]
        ds.ImagePositionPatient = [-250.0, -250.0, float(z[i])]
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.data
@pytest.mark.parametrize(("steps", "tilt", "said"), [
    ([2.0, 2.9] * 4, 0.0, "uneven slice spacing (2.0 to 2.9 mm)"),
    ([2.0] * 8, 20.0, "slices are stacked 20 degrees off their normal (gantry tilt)"),
])
def test_a_tilted_or_unevenly_spaced_ct_is_declined_and_the_report_says_why(
        tmp_path: Path, steps, tilt, said):
    from covid_plugin.outputs import write_declined
    from covid_plugin.pipelines.ct import CtPipeline
    from covid_plugin.pipelines.interface import analyse

    paths = ct_series_with(tmp_path / "series", steps, tilt)
    outcome = analyse(CtPipeline(), None, paths, write_all, write_declined)
    assert outcome.skipped == 1 and said in (outcome.note or "")
    [(_, [report])] = outcome.results
    texts = [item.TextValue for item in report.ContentSequence if item.ValueType == "TEXT"]
    assert any(said in text for text in texts)


@pytest.mark.data
def test_an_evenly_spaced_axial_ct_is_on_a_regular_grid(tmp_path: Path):
    from covid_plugin.volume import irregular_grid, load_series_files

    assert irregular_grid(load_series_files(rider_files(8))) is None


@pytest.mark.data
def test_an_aborted_association_is_ended_and_logged_once(tmp_path: Path, caplog):
    """EVT_ABORTED and EVT_CONN_CLOSE both come for an abort: one ending, one log line."""
    from covid_plugin.node.scp import StorageSCP

    settings = Settings(data_dir=tmp_path, port=0)
    db = SQLiteDatabase(settings.db_path)
    scp = StorageSCP(settings, Spool(settings.spool_dir, db), Metrics(),
                     Associations(db, "listener"))
    scp.start()
    try:
        ds = pydicom.dcmread(rider_files(1)[0])
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        with caplog.at_level(logging.INFO, logger="covid_plugin.node.scp"):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="COVID_PLUGIN")
            assert assoc.send_c_store(ds).Status == 0
            assoc.abort()
            wait_for(lambda: db.connection().execute(
                "SELECT interrupted_at FROM series").fetchone()[0] is not None,
                timeout=10, what="the abort recorded")
            time.sleep(0.5)  # the second event, had it been taken too
    finally:
        scp.stop()
    assert caplog.text.count("ended without release") == 1


@pytest.mark.data
def test_an_invalid_uid_from_the_network_never_reaches_the_log(tmp_path: Path, caplog):
    from covid_plugin.node.scp import StorageSCP

    settings = Settings(data_dir=tmp_path, port=0)
    db = SQLiteDatabase(settings.db_path)
    scp = StorageSCP(settings, Spool(settings.spool_dir, db), Metrics(),
                     Associations(db, "listener"))
    scp.start()
    ds = pydicom.dcmread(rider_files(1)[0])
    ds.SOPInstanceUID = "DOE^JOHN 1962"  # what a misconfigured sender puts there
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    try:
        with caplog.at_level(logging.DEBUG, logger="covid_plugin"):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="COVID_PLUGIN")
            status = assoc.send_c_store(ds).Status
            assoc.release()
    finally:
        scp.stop()
    ours = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith("covid_plugin"))
    assert status == 0xC000
    assert "refused instance (invalid UID) from PACS: SOPInstanceUID is not a valid UID" \
        in ours
    assert "DOE" not in ours


@pytest.mark.parametrize("command", [["jobs"], ["purge", "--dry-run"], ["requeue", "1"],
                                     ["outbox"]])
def test_admin_commands_refuse_a_store_that_does_not_exist(tmp_path: Path, monkeypatch,
                                                           capsys, command):
    """Run without --config in the wrong folder, they created ./var/covid_plugin.sqlite and
    said nothing was there."""
    from covid_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    assert "no store at var/covid_plugin.sqlite" in capsys.readouterr().err
    assert not (tmp_path / "var" / "covid_plugin.sqlite").exists()


def test_admin_commands_say_which_store_they_opened(tmp_path: Path, capsys):
    from covid_plugin.cli import main

    SQLiteDatabase(tmp_path / "covid_plugin.sqlite").close()
    assert main(["jobs", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == f"store: {tmp_path / 'covid_plugin.sqlite'}\n"


def test_silent_sockets_do_not_lock_a_real_tls_caller_out_of_its_address(node_factory, pki):
    """16 idle TCP connections from one address filled max_associations_per_peer and the
    PACS at that address was refused; now the oldest silent one makes room for it."""
    node = node_factory(tls_node_config(pki))
    node.start(ready=lambda: echo(node.port, ssl_context=tls_client_context(pki)))
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(16)]
    try:
        time.sleep(0.5)  # all 16 accepted, each waiting for a ClientHello
        assert echo(node.port, ssl_context=tls_client_context(pki))
        silent[0].settimeout(5)
        assert silent[0].recv(1) == b""  # the oldest was the one closed
    finally:
        for sock in silent:
            sock.close()
    assert "closed to make room" in node.log()


def test_the_listener_queues_a_burst_of_connections(node_factory):
    """socketserver's listen() backlog is 5; a PACS opening many associations at once had
    its connections beyond it wait for SYN retries."""
    node = node_factory().start()
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{node.port}"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert int(listening[2]) >= 128  # Send-Q of a listening socket: its backlog


@pytest.mark.data
def test_each_result_is_marked_sent_as_the_destination_acknowledges_it(tmp_path: Path):
    """A sender killed mid-batch sent again every object of the batch, the acknowledged ones
    too: they were marked sent only once the whole batch was through."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage

    from covid_plugin.node.scu import DicomSender, OutboxSender
    from covid_plugin.store.outbox import Delivery

    db = SQLiteDatabase(tmp_path / "db.sqlite")
    outbox = Outbox(db, None, 1.0, 1.0)
    seen: list[list[str]] = []  # the outbox states when each object arrives at the PACS

    def on_store(event: evt.Event) -> int:
        states = SQLiteDatabase(tmp_path / "db.sqlite").connection().execute(
            "SELECT state FROM outbox ORDER BY id").fetchall()
        seen.append([s for (s,) in states])
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db)
    files = rider_files(3)
    queue.finish(queue.claim("w").id, [
        Delivery(path, f"9.{n}", "PACS", "127.0.0.1", port) for n, path in enumerate(files)],
        owner="w")
    try:
        sender = OutboxSender(outbox, DicomSender("COVID_PLUGIN"), Metrics(), 0.2)
        assert sender.send_due() == 3
    finally:
        server.shutdown()
    assert seen == [["pending"] * 3, ["sent", "pending", "pending"],
                    ["sent", "sent", "pending"]]


@pytest.mark.data
def test_a_dry_run_counts_what_the_purge_then_removes(tmp_path: Path):
    """The dry run counted no series rows where the purge, having removed their instances
    first, removed them too."""
    from covid_plugin.store.retention import purge
    from tests.test_retention import DAY, State

    state = State(tmp_path, retention={"spool_days": 1, "results_days": 1, "db_days": 1})
    later = time.time() + 8 * DAY
    dry = purge(state.settings, state.db, dry_run=True, at=later)
    assert state.count("SELECT COUNT(*) FROM series") == 2  # nothing changed
    real = purge(state.settings, state.db, at=later)
    assert (dry.files, dry.bytes, dry.rows) == (real.files, real.bytes, real.rows)
    assert real.rows["series"] == 1


@pytest.mark.data
def test_a_series_the_pipeline_declines_is_rejected_and_its_report_still_sent(tmp_path: Path):
    """A child's film declined for age was recorded 'done' though nothing was analysed; it is
    'rejected' with the reason, and the "not analysed" report still goes to the PACS."""
    from tests.test_declined_report import REASON, DecliningPipeline

    settings = Settings(data_dir=tmp_path, quiet_period_s=0,
                        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 9}])
    db = SQLiteDatabase(settings.db_path)
    spool, jobs = Spool(settings.spool_dir, db), JobQueue(db)
    data = CHEST_CR.read_bytes()
    spool.store(read_header(data), data, "PACS")
    with db.transaction() as conn:
        conn.execute("UPDATE series SET released_at = last_at + 1")
    worker = Worker(settings, spool, jobs, Metrics(), [DecliningPipeline()], write_all, set)
    worker.close_complete_series()
    assert worker.run_one()
    [job] = jobs.all()
    assert job.state == "rejected" and REASON in job.reason
    [item] = Outbox.from_settings(db, settings.outbox).list()
    assert pydicom.dcmread(item.path).Modality == "SR"
