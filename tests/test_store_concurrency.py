"""Several workers and senders on one PostgreSQL database at once: every job and every outbox
item goes to exactly one of them, no claim waits for another, and two runs of one series never
run together. Threads with a connection each stand in for processes (tests/postgres.py starts
the real server)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from covid_plugin.store.db import PostgresDatabase, head_revision, open_database
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.outbox import Delivery, Outbox
from tests.test_store_backends import add_jobs, add_series


def run_together(n: int, target) -> list:
    """`target(i)` on n threads started at once; their results, or the first exception."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except Exception as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_three_workers_claim_twenty_jobs_each_exactly_once(postgres_url: str, tmp_path: Path):
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    for i in range(20):
        add_series(db, f"1.{i}")
        add_jobs(db, f"1.{i}", "queued")
    queue = JobQueue(db)

    def work(i: int) -> list[int]:
        owner, taken = f"worker-{i}", []
        while (job := queue.claim(owner)) is not None:
            taken.append(job.id)
            queue.finish(job.id, [Delivery(Path(f"{job.id}.dcm"), f"9.{job.id}", "P", "h", 1)],
                         owner=owner)
        return taken

    taken = run_together(3, work)
    claims = Counter(job_id for ids in taken for job_id in ids)
    assert sorted(claims) == list(range(1, 21)) and set(claims.values()) == {1}
    assert queue.counts() == {"done": 20}
    assert db.connection().execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 20
    rows = db.connection().execute("SELECT attempts, lease_owner FROM jobs").fetchall()
    assert {r["attempts"] for r in rows} == {1}
    assert {r["lease_owner"] for r in rows} <= {"worker-0", "worker-1", "worker-2"}


class PausingConnection:
    """A connection that stops after its first statement containing `marker` until told to
    go on: a worker preempted in the middle of its claim."""

    def __init__(self, conn, marker: str) -> None:
        self.conn, self.marker = conn, marker
        self.paused, self.resume = threading.Event(), threading.Event()

    @property
    def raw(self):
        return self.conn.raw

    def execute(self, sql: str, params=()):
        cursor = self.conn.execute(sql, params)
        if self.marker in sql and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(20)
        return cursor

    def executemany(self, sql: str, rows):
        return self.conn.executemany(sql, rows)


def test_two_runs_of_one_series_never_run_together(postgres_url: str, tmp_path: Path):
    """Worker A picks the older run of a series and is preempted; meanwhile an administrator
    requeues a newer run and worker B takes it (without waiting for A's row lock). When A
    goes on it must see B's run and not start its own."""
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued", "quarantined")
    slow = PostgresDatabase(postgres_url)
    paused = PausingConnection(slow.connection(), "FOR UPDATE SKIP LOCKED")
    slow.connection = lambda: paused  # this instance's connection, for worker A's thread
    outcome: dict[str, object] = {}
    worker_a = threading.Thread(target=lambda: outcome.update(a=JobQueue(slow).claim("a")))
    worker_a.start()
    assert paused.paused.wait(20)  # A has picked job 1 and holds its row
    queue = JobQueue(db)
    assert queue.requeue([2]) == 1
    worker_b = threading.Thread(target=lambda: outcome.update(b=queue.claim("b")))
    worker_b.start()
    worker_b.join(10)
    assert not worker_b.is_alive(), "worker B waited for worker A's claim"
    assert outcome["b"].id == 2
    paused.resume.set()
    worker_a.join(20)
    assert outcome["a"] is None
    states = [j.state for j in queue.all()]
    assert states == ["queued", "running"]


def test_senders_claim_disjoint_outbox_items(postgres_url: str, tmp_path: Path):
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    add_series(db, "1.1")
    add_jobs(db, "1.1", "queued")
    queue = JobQueue(db)
    queue.finish(queue.claim("w").id,
                 [Delivery(Path(f"{n}.dcm"), f"9.{n}", "P", "h", 1) for n in range(30)])
    outbox = Outbox(db, max_attempts=3, backoff_base_s=1.0, backoff_max_s=1.0)

    def send(i: int) -> list[int]:
        taken = []
        while items := outbox.claim(f"sender-{i}", limit=4):
            taken += [item.id for item in items]
            for item in items:
                outbox.mark_sent(item.id, f"sender-{i}")
        return taken

    taken = run_together(3, send)
    claims = Counter(item_id for ids in taken for item_id in ids)
    assert len(claims) == 30 and set(claims.values()) == {1}
    assert outbox.counts() == {"sent": 30}


def test_processes_starting_together_migrate_once(postgres_url: str, tmp_path: Path):
    run_together(5, lambda i: open_database(postgres_url, tmp_path / "unused.sqlite").close())
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    rows = db.connection().execute("SELECT version_num FROM alembic_version").fetchall()
    assert [r["version_num"] for r in rows] == [head_revision()]


def test_one_process_purges_at_a_time(postgres_url: str, tmp_path: Path):
    from covid_plugin.config import Settings
    from covid_plugin.store.retention import purge

    settings = Settings(data_dir=tmp_path / "var")
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    other = PostgresDatabase(postgres_url)  # another node's purge, in progress
    with other.exclusive("covid_plugin.purge"):
        second = threading.Thread(target=purge, args=(settings, db))
        second.start()
        second.join(0.5)
        assert second.is_alive()  # waits for the first
    second.join(10)
    assert not second.is_alive()
