"""Faults the node must survive without losing a result silently: a disk that fills inside a
library's write, a destination down for hours, a database that restarts, and the health
report that must say so while any of it lasts."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covid_plugin.config import OutboxSettings, Settings
from covid_plugin.instance import read_header
from covid_plugin.observability import Metrics
from covid_plugin.outputs import write_all
from covid_plugin.store.db import SQLiteDatabase
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.outbox import Outbox
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker
from tests.conftest import REPO, rider_files, wait_for
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
