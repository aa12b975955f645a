"""The store on both backends: leases on jobs and outbox items, completion decided from the
database (open associations, listener heartbeats), the spool's index, migrations.

`db` runs each test on SQLite and on a real PostgreSQL server (tests/postgres.py); the
concurrency that only PostgreSQL allows is in test_store_concurrency.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from covid_plugin.instance import read_header
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import Database, head_revision, open_database
from covid_plugin.store.jobs import JobQueue, LeaseLost
from covid_plugin.store.outbox import Delivery, Outbox
from covid_plugin.store.spool import Spool
from tests.conftest import rider_files


def add_series(db: Database, uid: str, last_at: float = 0.0) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO series VALUES (?, '1', 'CT', '', '', '', '', 'A', 30, "
                     "0, ?, NULL, NULL)", (uid, last_at))


def add_jobs(db: Database, uid: str, *states: str) -> None:
    with db.transaction() as conn:
        conn.executemany("INSERT INTO jobs (series_uid, state, created_at, updated_at) "
                         "VALUES (?, ?, 0, 0)", [(uid, state) for state in states])


def delivery(n: int) -> Delivery:
    return Delivery(Path(f"r{n}.dcm"), f"9.{n}", "PACS", "127.0.0.1", 104)


def outbox_rows(db: Database) -> int:
    return db.connection().execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def test_a_new_store_has_the_current_schema(db: Database):
    conn = db.connection()
    for table in ("listeners", "open_associations"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    conn.execute("SELECT lease_owner, lease_expires_at FROM jobs")
    conn.execute("SELECT lease_owner, lease_expires_at FROM outbox")
    version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert version == head_revision()


def test_times_keep_sub_second_precision(db: Database):
    """PostgreSQL's REAL is 4 bytes: epoch seconds in it are off by up to a minute."""
    add_series(db, "1.1", last_at=1_790_000_000.25)
    assert db.connection().execute("SELECT last_at FROM series").fetchone()[0] == 1_790_000_000.25


def test_claim_leases_the_job_to_its_owner(db: Database):
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db, lease_s=30.0)
    before = time.time()
    job = queue.claim("worker-a")
    row = db.connection().execute(
        "SELECT state, attempts, lease_owner, lease_expires_at FROM jobs").fetchone()
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("running", 1, "worker-a")
    assert before + 30.0 <= row["lease_expires_at"] <= time.time() + 30.0
    assert queue.claim("worker-b") is None  # taken
    assert queue.renew(job.id, "worker-a") and not queue.renew(job.id, "worker-b")


def test_an_expired_lease_moves_the_job_and_the_first_owner_cannot_finish_it(db: Database):
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db, lease_s=0.05)
    first = queue.claim("worker-a")
    assert queue.expire_leases() == 0  # still leased
    time.sleep(0.1)  # worker-a hangs (or was killed) past its lease
    assert queue.expire_leases() == 1
    assert queue.get(first.id).state == "queued"
    assert "worker-a expired" in queue.get(first.id).reason
    assert not queue.renew(first.id, "worker-a")
    second = queue.claim("worker-b")
    assert second.id == first.id and second.attempts == 2
    with pytest.raises(LeaseLost):
        queue.finish(first.id, [delivery(1)], owner="worker-a")
    assert outbox_rows(db) == 0  # nothing of worker-a's run is sent
    # the other outcomes of a lost lease change nothing either
    assert not queue.fail(first.id, "late failure", owner="worker-a")
    assert not queue.skip(first.id, "late decline", owner="worker-a")
    assert queue.retry_later(first.id, "late disk full", owner="worker-a") is None
    assert queue.get(first.id).state == "running"
    queue.finish(second.id, [delivery(1)], owner="worker-b")
    assert queue.get(first.id).state == "done" and outbox_rows(db) == 1


def test_a_job_whose_workers_keep_dying_is_quarantined_at_the_cap(db: Database):
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db, max_attempts=2, lease_s=0.01)
    for owner in ("worker-a", "worker-b"):
        assert queue.claim(owner) is not None
        time.sleep(0.05)
        queue.expire_leases()
    job = queue.get(1)
    assert job.state == "quarantined" and job.attempts == 2
    assert job.reason.startswith("quarantined after 2 attempts: the worker running it stopped")
    assert queue.claim("worker-c") is None


def test_one_run_of_a_series_at_a_time(db: Database):
    """A newer run queued while an older one runs waits for it, on both backends."""
    add_series(db, "1.1")
    add_series(db, "1.2")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db)
    assert queue.claim("a").id == 1
    add_jobs(db, "1.1", "received")
    queue.close(2, None)
    add_jobs(db, "1.2", "queued")
    assert queue.claim("b").series_uid == "1.2"  # not job 2: its series is running
    assert queue.claim("b") is None
    queue.finish(1, [], owner="a")
    assert queue.claim("b").id == 2


def test_outbox_items_are_leased_to_one_sender(db: Database):
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db)
    queue.finish(queue.claim("w").id, [delivery(n) for n in range(5)], owner="w")
    outbox = Outbox(db, max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)
    first = outbox.claim("sender-a", limit=3, lease_s=0.05)
    assert [i.sop_instance_uid for i in first] == ["9.0", "9.1", "9.2"]
    second = outbox.claim("sender-b", lease_s=0.05)
    assert [i.sop_instance_uid for i in second] == ["9.3", "9.4"]
    assert outbox.claim("sender-c") == []  # all under live leases
    outbox.mark_sent(first[0].id, "sender-a")
    time.sleep(0.1)  # sender-a dies; its leases expire
    again = outbox.claim("sender-c")
    assert [i.id for i in again] == [i.id for i in first[1:] + second]  # not the sent one
    assert outbox.mark_failed(first[1].id, "too late", owner="sender-a") is None
    assert outbox.mark_failed(first[1].id, "peer down", owner="sender-c") == "pending"
    assert outbox.counts() == {"sent": 1, "pending": 4}
    # the embedded node restarts after a kill: its items go out at once, not after the lease
    assert outbox.release_leases() == 3  # sender-c's (the failed item's lease is gone)
    assert len(outbox.claim("node-pid-2")) == 4


def test_completion_is_decided_from_the_database(db: Database):
    for uid in ("1.1", "1.2", "1.3"):
        add_series(db, uid)
    live = Associations(db, "listener-a", stale_after_s=0.2)
    killed = Associations(db, "listener-b", stale_after_s=0.2)
    live.heartbeat()
    killed.heartbeat()
    live.delivering("a1", "1.1")
    killed.delivering("b1", "1.2")
    killed.delivering("b2", "1.3")
    killed.ended("b2", released=True)
    killed.ended("b2", released=True)  # a second call changes nothing
    assert live.active_series() == {"1.1", "1.2"}
    last_beat = db.connection().execute(
        "SELECT heartbeat_at FROM listeners WHERE listener = 'listener-b'").fetchone()[0]
    time.sleep(0.3)  # listener-b is killed: no more heartbeats
    live.heartbeat()
    assert live.active_series() == {"1.1"}  # a silent listener holds nothing open
    assert live.reap() == 1
    assert live.reap() == 0
    rows = {r["series_uid"]: (r["released_at"], r["interrupted_at"]) for r in
            db.connection().execute("SELECT series_uid, released_at, interrupted_at FROM series")}
    assert rows["1.2"] == (None, last_beat)  # interrupted when it was last known alive
    assert rows["1.3"][0] is not None and rows["1.3"][1] is None
    assert rows["1.1"] == (None, None)
    listeners = db.connection().execute("SELECT listener FROM listeners").fetchall()
    assert [r["listener"] for r in listeners] == ["listener-a"]
    live.leave()  # a clean stop: what is still open ends as interrupted
    assert db.connection().execute(
        "SELECT interrupted_at FROM series WHERE series_uid = '1.1'").fetchone()[0] is not None
    assert live.active_series() == set()
    assert db.connection().execute("SELECT COUNT(*) FROM open_associations").fetchone()[0] == 0


@pytest.mark.data
def test_an_instance_is_indexed_once(db: Database, tmp_path: Path):
    spool = Spool(tmp_path / "spool", db)
    files = rider_files(2)
    stored = []
    for path in (files[0], files[1], files[0]):
        data = path.read_bytes()
        stored.append(spool.store(read_header(data), data, "PACS"))
    assert [s.is_new for s in stored] == [True, True, False]
    conn = db.connection()
    assert conn.execute("SELECT n_instances FROM series").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    assert stored[2].path.read_bytes() == files[0].read_bytes()


def test_unknown_database_url_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="postgresql://"):
        open_database("mysql://x", tmp_path / "db.sqlite")


@pytest.mark.data
def test_an_instance_resent_under_another_series_leaves_no_second_file(db: Database,
                                                                       tmp_path: Path):
    """Recovery and retention know files by their index rows: a copy the index does not hold
    would stay on disk for ever."""
    spool = Spool(tmp_path / "spool", db)
    data = rider_files(1)[0].read_bytes()
    header = read_header(data)
    assert spool.store(header, data, "PACS").is_new
    moved = dataclasses.replace(header, series_uid=header.series_uid + ".9")
    assert not spool.store(moved, data, "PACS").is_new
    assert len(list((tmp_path / "spool").glob("*/*/*.dcm"))) == 1


@pytest.mark.data
def test_a_full_resend_of_a_series_recorded_incomplete_opens_a_new_job(db: Database,
                                                                        tmp_path: Path):
    """The sender stored every instance, then aborted; the series was recorded incomplete.
    Its resend brings only instances already held: it must still be processed, once."""
    spool = Spool(tmp_path / "spool", db)
    files = [p.read_bytes() for p in rider_files(3)]
    for data in files:
        spool.store(read_header(data), data, "PACS")
    JobQueue(db).close(1, "incomplete: the transfer broke off after 3 instance(s) ...",
                       incomplete=True)
    for data in files + files:  # resent, twice
        spool.store(read_header(data), data, "PACS")
    assert [(j.state, j.id) for j in JobQueue(db).all()] == [("rejected", 1), ("received", 2)]


@pytest.mark.data
def test_a_resend_of_a_processed_series_is_not_run_again(db: Database, tmp_path: Path):
    spool = Spool(tmp_path / "spool", db)
    data = rider_files(1)[0].read_bytes()
    spool.store(read_header(data), data, "PACS")
    JobQueue(db).close(1, "not a chest study (body part KNEE, ...)")
    spool.store(read_header(data), data, "PACS")
    assert [j.state for j in JobQueue(db).all()] == ["rejected"]
