"""Jobs never stay stuck and never loop: full disks, crashing series, attempt caps, health."""

from __future__ import annotations

import json
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from covid_plugin.config import Settings
from covid_plugin.instance import read_header
from covid_plugin.observability import Metrics, operations_health
from covid_plugin.outputs import write_all
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import SQLiteDatabase
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker
from tests.conftest import CHEST_CR, REPO, free_port, rider_files, wait_for
from tests.pipelines_for_tests import MeanIntensityPipeline
from tests.test_node_ingest import index, send, storescu


def job_rows(node) -> list[sqlite3.Row]:
    return index(node).execute(
        "SELECT id, state, attempts, reason FROM jobs ORDER BY id").fetchall()


class DiskFillsDuringFirstRun(MeanIntensityPipeline):
    """The disk fills while the first run computes: from then on no file may grow (the
    results, the SQLite WAL), as on a full disk, until the test frees it again."""

    runs = 0

    def run(self, series, models):
        findings = super().run(series, models)
        DiskFillsDuringFirstRun.runs += 1
        if DiskFillsDuringFirstRun.runs == 1:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
        return findings


def full_disk_scenario(data_dir: str) -> None:
    """Runs in its own process (the file-size limit is process-wide); prints what happened."""
    settings = Settings(data_dir=Path(data_dir), quiet_period_s=0)
    db = SQLiteDatabase(settings.db_path)
    spool, jobs = Spool(settings.spool_dir, db), JobQueue(db, max_attempts=3, retry_after_s=0.2)
    for path in rider_files(20):
        data = path.read_bytes()
        stored = spool.store(read_header(data), data, "PACS")
    series_uid = pydicom.dcmread(stored.path, stop_before_pixels=True).SeriesInstanceUID
    associations = Associations(db, "listener")
    associations.delivering("assoc", series_uid)
    associations.ended("assoc", released=True)
    worker = Worker(settings, spool, jobs, Metrics(), [DiskFillsDuringFirstRun()], write_all,
                    set)
    worker.close_complete_series()
    raised = None
    try:
        worker.run_one()  # the result write fails, and so does recording the failure
    except Exception as exc:
        raised = type(exc).__name__
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is freed again
    during = {"unrecorded": worker.unrecorded(),
              "problems": operations_health(settings.data_dir, settings.storage, [],
                                            worker.unrecorded(), {})["problems"]}
    wait_for(lambda: worker.run_one() or jobs.get(1).state in ("done", "failed"), timeout=20,
             what="the job to end")
    job = jobs.get(1)
    print(json.dumps({"raised": raised, "during": during, "state": job.state,
                      "attempts": job.attempts,
                      "results": sorted(p.name for p in (settings.results_dir / "1").glob("*/*"))}))


@pytest.mark.data
def test_full_disk_at_result_write_is_recorded_later_and_retried(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_job_failures import "
         "full_disk_scenario; full_disk_scenario(sys.argv[1])", str(tmp_path / "var")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["raised"] is None  # the worker absorbed it
    assert outcome["during"]["unrecorded"] == [1]
    assert "not written yet" in outcome["during"]["problems"][0]
    # once the disk has room the outcome ('try again later') is written, then the job runs
    assert outcome["state"] == "done" and outcome["attempts"] == 2
    assert len(outcome["results"]) == 2  # SR and SC, from the second run only


def test_database_commit_failure_leaves_no_transaction_open(tmp_path: Path):
    db = SQLiteDatabase(tmp_path / "db.sqlite")
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("INSERT INTO jobs (series_uid, state, created_at, updated_at) "
                     "VALUES ('no-such-series', 'received', 0, 0)")  # fails at COMMIT
    assert not db.connection().in_transaction
    with db.transaction() as conn:  # the next transaction on this thread works
        conn.execute("SELECT 1")


def start_expecting_crash(node) -> None:
    with pytest.raises(AssertionError, match="node exited early"):
        node.start(ready=lambda: False)
    assert node.proc.returncode == -9


@pytest.mark.data
@pytest.mark.slow
def test_series_that_crashes_the_node_is_quarantined_at_the_attempt_cap(node_factory):
    node = node_factory({"jobs": {"max_attempts": 2}},
                        env={"TEST_PIPELINE_CRASH_MODALITY": "CT"}).start()
    storescu(node.port, rider_files(20))
    node.proc.wait(30)  # attempt 1 killed the process
    assert node.proc.returncode == -9
    start_expecting_crash(node)  # attempt 2, straight after start-up
    assert [(r["state"], r["attempts"]) for r in job_rows(node)] == [("running", 2)]
    node.start()  # the cap is reached: quarantined, and the node stays up
    [job] = job_rows(node)
    assert job["state"] == "quarantined"
    assert job["reason"].startswith("quarantined after 2 attempts: the node stopped")
    listing = node.cli("jobs").stdout
    assert "quarantined" in listing and "tries=2" in listing
    # the queue is not blocked: a radiograph sent now is processed
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: [r["state"] for r in job_rows(node)] == ["quarantined", "done"],
             timeout=90, what="the radiograph's job")
    # an administrator can give it another chance once the cause is fixed
    assert node.cli("requeue", "1").stdout.strip() == "1 job(s) queued again"


def test_retried_jobs_wait_behind_fresh_ones(tmp_path: Path):
    db = SQLiteDatabase(tmp_path / "db.sqlite")
    with db.transaction() as conn:
        for uid in ("1.1", "1.2"):
            conn.execute("INSERT INTO series VALUES (?, '1', 'CT', '', '', '', '', 'A', 30, "
                         "0, 0, 0, NULL)", (uid,))
        conn.execute("INSERT INTO jobs (series_uid, state, attempts, created_at, updated_at) "
                     "VALUES ('1.1', 'queued', 1, 0, 0), ('1.2', 'queued', 0, 0, 0)")
    assert JobQueue(db).claim("w").series_uid == "1.2"


@pytest.mark.data
def test_health_reports_stuck_jobs_disk_and_outbox_backlog(node_factory):
    port = free_port()
    node = node_factory({"metrics_port": port, "jobs": {"stuck_after_s": 1}},
                        env={"TEST_PIPELINE_DELAY_S": "3"}).start()
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: [r["state"] for r in job_rows(node)] == ["running"], timeout=20,
             what="job running")

    def health() -> tuple[int, dict] | None:
        reply = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        return (reply.status_code, reply.json()) if reply.json()["stuck_jobs"] else None

    status, report = wait_for(health, timeout=10, what="stuck job reported")
    assert status == 503 and report["ok"] is False
    assert report["stuck_jobs"] == [1] and "running for too long" in report["problems"][0]
    assert report["disk"]["free_bytes"] > 0 and 0 < report["disk"]["used_percent"] < 100
    assert report["outbox_backlog"] == {"pending": 0, "oldest_pending_s": 0.0, "dead": 0}
    cli = json.loads(node.cli("health").stdout)
    assert cli["stuck_jobs"] == [1] and cli["ok"] is False
