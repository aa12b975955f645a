"""From completed series to results at the PACS: the queue, the worker, the outbox, restarts."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.conftest import CHEST_CR, echo, rider_files, wait_for
from tests.test_node_ingest import index, send, storescu

pytestmark = pytest.mark.data  # every test here reads the data set


def job_states(node) -> list[str]:
    return [r["state"] for r in index(node).execute("SELECT state FROM jobs ORDER BY id")]


def test_complete_series_runs_once_and_results_reach_the_return_address(
        node_factory, storescp_factory):
    pacs = storescp_factory().start()
    node = node_factory({"return_addresses": {"STORESCU": {
        "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}}}).start()
    assert storescu(node.port, rider_files(24)).returncode == 0
    wait_for(lambda: job_states(node) == ["done"], timeout=60, what="job done")
    wait_for(lambda: len(pacs.files()) == 2, timeout=30, what="SR and SC at the PACS")
    received = [pydicom.dcmread(p) for p in pacs.files()]
    source = pydicom.dcmread(rider_files(1)[0])
    assert {ds.Modality for ds in received} == {"SR", "OT"}
    assert {ds.StudyInstanceUID for ds in received} == {source.StudyInstanceUID}
    assert all(ds.SeriesInstanceUID != source.SeriesInstanceUID for ds in received)

    def outbox() -> list[tuple[str, int]]:
        return [(r["state"], r["attempts"])
                for r in index(node).execute("SELECT state, attempts FROM outbox")]

    wait_for(lambda: outbox() == [("sent", 1), ("sent", 1)], timeout=10, what="outbox sent")


def test_selection_rules_record_why_a_series_was_rejected(node_factory):
    node = node_factory({"selection": {"min_ct_slices": 20}}).start()
    assert storescu(node.port, rider_files(5)).returncode == 0
    wait_for(lambda: job_states(node) == ["rejected"], timeout=30, what="rejection")
    reason = index(node).execute("SELECT reason FROM jobs").fetchone()[0]
    assert reason == "CT series has 5 slice(s) (needs at least 20)"
    listing = node.cli("jobs")
    assert "rejected" in listing.stdout and "needs at least 20" in listing.stdout


def test_kill_during_ingest_loses_no_acknowledged_instance(node_factory):
    node = node_factory({"quiet_period_s": 3600}).start()
    datasets = [pydicom.dcmread(f) for f in rider_files()]
    acknowledged: list[str] = []
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COVID_PLUGIN")
    assert assoc.is_established

    def killer() -> None:
        wait_for(lambda: len(acknowledged) >= 20, timeout=60, interval=0.001, what="20 acks")
        node.kill9()

    thread = threading.Thread(target=killer)
    thread.start()
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0:
            break
        acknowledged.append(ds.SOPInstanceUID)
    thread.join()
    assoc.abort()
    assert 20 <= len(acknowledged) < len(datasets)
    node.start()  # restart: recovery runs before the listener opens
    rows = {r["sop_instance_uid"]: r["path"]
            for r in index(node).execute("SELECT sop_instance_uid, path FROM instances")}
    for uid in acknowledged:
        assert uid in rows
        assert pydicom.dcmread(rows[uid]).SOPInstanceUID == uid
    assert not list((Path(node.config["data_dir"]) / "spool" / "tmp").iterdir())


def test_kill_during_job_finishes_it_exactly_once_after_restart(node_factory, storescp_factory):
    pacs = storescp_factory().start()
    destinations = [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]
    node = node_factory({"destinations": destinations},
                        env={"TEST_PIPELINE_DELAY_S": "4"}).start()
    assert storescu(node.port, rider_files(20)).returncode == 0
    wait_for(lambda: job_states(node) == ["running"], timeout=30, what="job running")
    node.kill9()
    assert job_states(node) == ["running"]
    node.start()
    wait_for(lambda: job_states(node) == ["done"], timeout=60, what="job done after restart")
    wait_for(lambda: len(pacs.files()) == 2, timeout=30, what="results delivered")
    time.sleep(2)  # nothing more arrives: the interrupted run left no second set of results
    assert len(pacs.files()) == 2
    attempts = index(node).execute("SELECT attempts FROM jobs").fetchone()[0]
    assert attempts == 2
    assert "1 jobs re-queued" in node.log()


def test_destination_down_retries_with_backoff_then_delivers(node_factory, storescp_factory):
    pacs = storescp_factory()  # not started yet: the destination is down
    node = node_factory({
        "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "outbox": {"max_attempts": 50, "backoff_base_s": 0.5, "backoff_max_s": 2,
                   "poll_interval_s": 0.2},
    }).start()
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    db = index(node)

    def attempts() -> list[sqlite3.Row]:
        return db.execute("SELECT state, attempts, next_attempt_at, updated_at, last_error "
                          "FROM outbox").fetchall()

    wait_for(lambda: attempts() and all(r["attempts"] >= 3 for r in attempts()), timeout=60,
             what="three failed attempts")
    row = attempts()[0]
    assert row["state"] == "pending" and "association" in row["last_error"]
    # backoff: the next attempt is scheduled later than the last one, by at least the base
    assert row["next_attempt_at"] - row["updated_at"] >= 0.5
    pacs.start()
    wait_for(lambda: {r["state"] for r in attempts()} == {"sent"}, timeout=30, what="delivery")
    assert len(pacs.files()) == len(attempts()) == 2


def test_dead_letter_after_n_tries_then_retry_command_delivers(node_factory, storescp_factory):
    pacs = storescp_factory()
    node = node_factory({
        "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "outbox": {"max_attempts": 2, "backoff_base_s": 0.2, "poll_interval_s": 0.2},
    }).start()
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: "dead" in node.cli("outbox", "--state", "dead").stdout, timeout=60,
             what="dead letters")
    dead = node.cli("outbox", "--state", "dead").stdout.strip().splitlines()
    assert len(dead) == 2 and all("tries=2" in line for line in dead)
    pacs.start()
    time.sleep(1)
    assert pacs.files() == []  # dead items stay dead until someone says otherwise
    result = node.cli("retry", "--all")
    assert result.returncode == 0 and "2 dead item(s) queued again" in result.stdout
    wait_for(lambda: len(pacs.files()) == 2, timeout=30, what="delivery after retry")
    assert node.cli("outbox", "--state", "dead").stdout.strip() == ""


def test_health_command_and_metrics_endpoint(node_factory):
    import requests

    from tests.conftest import free_port

    port = free_port()
    node = node_factory({"metrics_port": port}).start()
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'covid_plugin_instances_received_total{modality="CR"} 1.0' in metrics
    health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert health.status_code == 200 and health.json()["worker_alive"] is True
    result = node.cli("health")
    assert result.returncode == 0 and '"echo": true' in result.stdout
    node.stop()
    assert node.cli("health").returncode == 1
    assert not echo(node.port)


def test_logs_never_carry_patient_names_or_ids(node_factory, storescp_factory):
    pacs = storescp_factory().start()
    node = node_factory({"destinations": [
        {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]}).start()
    datasets = [pydicom.dcmread(f) for f in rider_files(21)]
    for ds in datasets:
        ds.PatientName = "Doe^Jane^Q"
        ds.PatientID = "MRN-SECRET-4711"
    broken = datasets.pop()
    del broken.SeriesInstanceUID  # a refused instance is logged too
    assert send(node.port, datasets + [broken]) == [0] * 20 + [0xA900]
    wait_for(lambda: job_states(node) == ["done"], timeout=60, what="job done")
    wait_for(lambda: len(pacs.files()) == 2, timeout=30, what="results")
    log = node.log()
    assert "refused instance" in log and "job 1" in log
    assert "Doe" not in log and "Jane" not in log and "SECRET" not in log
