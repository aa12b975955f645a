"""The durable job queue: one row per run of a series.

    received ----> queued ----> running ----> done | failed
       |             |            |---------> rejected     (the pipeline declines the series)
       |             |            |---------> queued       (disk full: tried again later)
       |             |            '---------> quarantined  (attempt cap reached)
       |             '--------------------->  superseded   (a newer run of the series came first)
       '----------------------------------->  rejected     (selection rules, or the sender
                                                            broke off and did not resend)

Every claim counts an attempt and leases the job to its worker (`lease_s`, renewed while it
runs). A job whose worker died (out of memory, a crash, kill -9, a lost machine) keeps its
lease until it expires; then `expire_leases` queues it again below the attempt cap and
quarantines it at the cap, with its reason, so that one poisonous series cannot crash the
workers for ever. (The embedded single-process node instead calls `requeue_interrupted` at
start: every 'running' job is then its own.) `covid-plugin requeue ID` gives a quarantined or
failed job fresh attempts. The move to 'done' and the outbox rows it creates are one
transaction that only the lease holder can make, so a job is finished exactly once even when a
worker thought dead comes back: its `finish` raises LeaseLost and sends nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from covid_plugin.store import outbox
from covid_plugin.store.db import Database, now
from covid_plugin.store.outbox import Delivery
from covid_plugin.store.states import ENDED_STATES, JobState, sql_values

log = logging.getLogger(__name__)

class LeaseLost(RuntimeError):
    """The job's lease expired and the job went back to the queue (or to another worker):
    this worker's outcome is not recorded, and the results it made are not sent."""


@dataclass(frozen=True)
class SeriesRecord:
    """A series as the tracker and the selection rules see it.

    `released_at` is when an association that delivered to the series was last released
    normally, `interrupted_at` when one was last aborted or lost: a series whose last instance
    came after its last clean release may be partial.
    """

    job_id: int
    series_uid: str
    study_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    description: str
    image_type: str
    calling_ae: str
    n_instances: int
    last_at: float
    released_at: float | None = None
    interrupted_at: float | None = None


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    state: JobState
    attempts: int
    calling_ae: str
    modality: str
    reason: str | None = None
    updated_at: float = 0.0
    lease_owner: str | None = None  # the worker (host:pid:tag) that claimed it last


@dataclass(frozen=True)
class ReportRef:
    """An SR a job sent; kept with the job so that a later run can name it as predecessor."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


_JOB_COLUMNS = ("j.id, j.series_uid, j.state, j.attempts, j.reason, j.updated_at, "
                "j.lease_owner, s.calling_ae, s.modality")


def _holding(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """SQL condition and argument: `owner` holds the job's lease (nothing when None)."""
    return ("", ()) if owner is None else (" AND lease_owner = ?", (owner,))


def _job(row) -> Job:
    return Job(row["id"], row["series_uid"], JobState(row["state"]), row["attempts"],
               row["calling_ae"], row["modality"], row["reason"], row["updated_at"],
               row["lease_owner"])


def _busy(job: str) -> str:
    """SQL: the series of job `job` has a run in progress, or a newer run still to come (a
    queued run would only process fewer instances than it)."""
    return (f"EXISTS (SELECT 1 FROM jobs o WHERE o.series_uid = {job}.series_uid "
            f"AND o.id != {job}.id AND (o.state = 'running' "
            f"OR (o.id > {job}.id AND o.state IN ('received', 'queued'))))")


def open_run(conn: Any, series_uid: str, at: float) -> None:
    """Open a run ('received' job) of a series that has none, in the caller's transaction:
    the spool opens it with the instance it indexes.

    One open run per series; instances arriving after a series was queued open a new run,
    so late slices are not silently ignored. On PostgreSQL the spool's upsert of the series
    row holds that row until the commit, so two listeners storing to one series get here one
    after the other and open one run.
    """
    conn.execute(
        "INSERT INTO jobs (series_uid, state, created_at, updated_at) "
        "SELECT ?, 'received', ?, ? WHERE NOT EXISTS "
        "(SELECT 1 FROM jobs WHERE series_uid = ? AND state = 'received')",
        (series_uid, at, at, series_uid),
    )


def latest_run_incomplete(conn: Any, series_uid: str) -> bool:
    """The series' latest run was rejected as incomplete (its sender broke off)."""
    latest = conn.execute(
        "SELECT state, incomplete FROM jobs WHERE series_uid = ? ORDER BY id DESC LIMIT 1",
        (series_uid,),
    ).fetchone()
    return latest is not None and latest["state"] == JobState.REJECTED \
        and bool(latest["incomplete"])


def reopen_if_incomplete(conn: Any, series_uid: str, at: float) -> bool:
    """Open a new run of a series whose latest run was rejected as incomplete, in the
    caller's transaction; False when its latest run is anything else."""
    if not latest_run_incomplete(conn, series_uid):
        return False
    open_run(conn, series_uid, at)
    return True


def forget_ended(conn: Any, cutoff: float) -> dict[str, int]:
    """Delete the jobs that ended before `cutoff` with no result pending, and their outbox
    rows, in the caller's transaction (retention); returns the rows deleted per table."""
    expired = (f"SELECT id FROM jobs j WHERE state IN {sql_values(ENDED_STATES)} "
               "AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o "
               "WHERE o.job_id = j.id AND o.state = 'pending')")
    return {"outbox": outbox.forget_jobs(conn, expired, (cutoff,)),
            "jobs": conn.execute(f"DELETE FROM jobs WHERE id IN ({expired})", (cutoff,)).rowcount}


class JobQueue:
    def __init__(self, db: Database, max_attempts: int = 3, retry_after_s: float = 60.0,
                 lease_s: float = 60.0) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.retry_after_s = retry_after_s
        self.lease_s = lease_s

    def open_series(self) -> list[SeriesRecord]:
        """Series with a job still collecting instances."""
        rows = self.db.connection().execute(
            "SELECT j.id AS job_id, s.* FROM jobs j JOIN series s USING (series_uid) "
            "WHERE j.state = 'received' ORDER BY s.last_at"
        ).fetchall()
        return [
            SeriesRecord(
                job_id=r["job_id"], series_uid=r["series_uid"], study_uid=r["study_uid"],
                modality=r["modality"], sop_class_uid=r["sop_class_uid"],
                body_part=r["body_part"], description=r["description"],
                image_type=r["image_type"], calling_ae=r["calling_ae"],
                n_instances=r["n_instances"], last_at=r["last_at"],
                released_at=r["released_at"], interrupted_at=r["interrupted_at"],
            )
            for r in rows
        ]

    def close(self, job_id: int, reason: str | None, incomplete: bool = False) -> bool:
        """End collection: queue the job, or reject it with `reason`. False when another
        worker closed it first (every worker decides completion from the same rows).

        `incomplete`: rejected because the sender broke off and did not resend; a resend of
        the series then opens a new job even when every instance was already held (Spool).

        Queuing a newer run of a series supersedes an older run that is still waiting in the
        queue: it would only process fewer instances of the same series.
        """
        state = JobState.QUEUED if reason is None else JobState.REJECTED
        t = now()
        with self.db.transaction() as conn:
            closed = conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, incomplete = ?, updated_at = ?, "
                "n_instances_at_queue = "
                "(SELECT n_instances FROM series WHERE series_uid = jobs.series_uid) "
                "WHERE id = ? AND state = 'received'",
                (state, reason, incomplete, t, job_id),
            ).rowcount
            if closed and state == JobState.QUEUED:
                conn.execute(
                    "UPDATE jobs SET state = 'superseded', reason = ?, updated_at = ? "
                    "WHERE state = 'queued' AND id < ? "
                    "AND series_uid = (SELECT series_uid FROM jobs WHERE id = ?)",
                    (f"more instances arrived before it ran; job {job_id} runs instead",
                     t, job_id, job_id),
                )
        return bool(closed)

    def claim(self, owner: str) -> Job | None:
        """Take the next queued job and lease it to `owner` for `lease_s`.

        Fresh jobs go before jobs already tried, so that a job that keeps failing does not
        hold up the queue; a series with a run in progress, or a newer run still collecting,
        waits for it. On SQLite the write lock makes claims one at a time. On PostgreSQL
        concurrent claimers skip each other's candidate rows (SKIP LOCKED), and a candidate
        is only taken under its series' advisory lock, after re-checking that no other run
        of the series is running: two claims that picked two runs of one series from the
        same snapshot cannot both start theirs.
        """
        t = now()
        tried: list[int] = []
        with self.db.transaction() as conn:
            while True:
                skip = f"AND j.id NOT IN ({','.join('?' * len(tried))}) " if tried else ""
                candidate = conn.execute(
                    "SELECT j.id, j.series_uid FROM jobs j WHERE j.state = 'queued' "
                    f"AND j.not_before <= ? AND NOT {_busy('j')} {skip}"
                    f"ORDER BY j.attempts, j.id LIMIT 1{self.db.skip_locked}",
                    (t, *tried),
                ).fetchone()
                if candidate is None:
                    return None
                tried.append(candidate["id"])
                if not self.db.try_lock(conn, f"series {candidate['series_uid']}"):
                    continue  # another claim is deciding about this series right now
                row = conn.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?, "
                    "lease_owner = ?, lease_expires_at = ? "
                    f"WHERE id = ? AND state = 'queued' AND NOT {_busy('jobs')} RETURNING id",
                    (t, owner, t + self.lease_s, candidate["id"]),
                ).fetchone()
                if row is not None:
                    break
            job = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) "
                "WHERE j.id = ?", (row["id"],)
            ).fetchone()
        return _job(job)

    def renew(self, job_id: int, owner: str) -> bool:
        """Extend `owner`'s lease on a running job by `lease_s` from now; False when the
        owner no longer holds it (it expired and the job was queued again or taken over):
        the worker should then stop working on it."""
        t = now()
        with self.db.transaction() as conn:
            return conn.execute(
                "UPDATE jobs SET lease_expires_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (t + self.lease_s, job_id, owner),
            ).rowcount > 0

    def finish(self, job_id: int, deliveries: Iterable[Delivery], note: str | None = None,
               reports: Iterable[ReportRef] = (), supersedes: int | None = None,
               owner: str | None = None, declined: bool = False) -> None:
        """Mark done, record its reports and queue its results for export, atomically.

        `declined`: the pipeline declined the whole series; the job is 'rejected' with the
        reason in `note`, and its results (the "not analysed" report) are sent all the same.
        With `owner`, only while that owner still holds the job's lease (an expired lease
        not yet taken by anyone still counts: nobody else ran the job); otherwise raises
        LeaseLost and creates no outbox row.
        """
        t = now()
        kept = json.dumps([vars(r) for r in reports])
        held, args = _holding(owner)
        state = JobState.REJECTED if declined else JobState.DONE
        with self.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, supersedes = ?, "
                f"reports = ? WHERE id = ? AND state = 'running'{held}",
                (state, note, t, supersedes, kept, job_id, *args),
            ).rowcount
            if not updated:
                if owner is not None:
                    raise LeaseLost(f"job {job_id}: {owner} no longer holds its lease; "
                                    "its results are not sent")
                raise RuntimeError(f"job {job_id} is not running; refusing to finish it twice")
            outbox.add(conn, job_id, deliveries, t)

    def fail(self, job_id: int, reason: str, owner: str | None = None) -> bool:
        """Returns False (and changes nothing) when `owner` no longer holds the lease."""
        return self._end(job_id, JobState.FAILED, reason, owner)

    def skip(self, job_id: int, reason: str, owner: str | None = None) -> bool:
        """A pipeline declined the series (a lateral film, say): rejected, with why."""
        return self._end(job_id, JobState.REJECTED, reason, owner)

    def retry_later(self, job_id: int, reason: str,
                    owner: str | None = None) -> JobState | None:
        """The node, not the series, was at fault (disk full): queue it again after a pause,
        or quarantine it at the attempt cap. Returns the new state, or None when `owner` no
        longer holds the lease (nothing changed)."""
        t = now()
        held, args = _holding(owner)
        guard = f" AND state = 'running'{held}" if owner is not None else ""
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT attempts FROM jobs WHERE id = ?{guard}",
                               (job_id, *args)).fetchone()
            if row is None:
                return None
            if row["attempts"] >= self.max_attempts:
                state = JobState.QUARANTINED
                why = f"quarantined after {row['attempts']} attempts: {reason}"
            else:
                state, why = JobState.QUEUED, f"will retry: {reason}"
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, not_before = ?, updated_at = ? "
                f"WHERE id = ? AND state = 'running'{held}",
                (state, why, t + self.retry_after_s, t, job_id, *args),
            )
        return state

    def _end(self, job_id: int, state: JobState, reason: str, owner: str | None) -> bool:
        held, args = _holding(owner)
        guard = f" AND state = 'running'{held}" if owner is not None else ""
        with self.db.transaction() as conn:
            return conn.execute(
                f"UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?{guard}",
                (state, reason, now(), job_id, *args),
            ).rowcount > 0

    def expire_leases(self) -> int:
        """Running jobs whose lease expired (their worker stopped, was killed or lost its
        machine): queued again, or quarantined at the attempt cap. Any worker may call it,
        every round. Returns how many were queued again."""
        t = now()
        with self.db.transaction() as conn:
            quarantined = conn.execute(
                "UPDATE jobs SET state = 'quarantined', updated_at = ?, reason = "
                "'quarantined after ' || CAST(attempts AS TEXT) || ' attempts: the worker "
                "running it stopped or was lost each time (its lease expired; a crash or out "
                "of memory?)' WHERE state = 'running' AND lease_expires_at < ? "
                "AND attempts >= ? RETURNING id, series_uid, lease_owner",
                (t, t, self.max_attempts),
            ).fetchall()
            requeued = conn.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ?, reason = "
                "'the lease of ' || lease_owner || ' expired (the worker stopped or was lost); "
                "queued again' WHERE state = 'running' AND lease_expires_at < ? "
                "RETURNING id, series_uid, lease_owner",
                (t, t),
            ).fetchall()
        for row in quarantined:
            log.error("job %d (series %s) quarantined: its worker (last %s) was lost while "
                      "running it %d times", row["id"], row["series_uid"], row["lease_owner"],
                      self.max_attempts)
        for row in requeued:
            log.warning("job %d (series %s) queued again: the lease of %s expired", row["id"],
                        row["series_uid"], row["lease_owner"])
        return len(requeued)

    def requeue_interrupted(self) -> int:
        """At the start of the embedded single-process node: jobs a killed process left
        'running' are queued again, unless they have had their attempts: those are
        quarantined. Returns how many were queued again. Not for a worker sharing the queue
        with others (it would take their running jobs): those rely on `expire_leases`."""
        t = now()
        with self.db.transaction() as conn:
            quarantined = conn.execute(
                "UPDATE jobs SET state = 'quarantined', updated_at = ?, reason = "
                "'quarantined after ' || CAST(attempts AS TEXT) || ' attempts: the node stopped "
                "while running it each time (a crash or out of memory?)' "
                "WHERE state = 'running' AND attempts >= ? RETURNING id, series_uid",
                (t, self.max_attempts),
            ).fetchall()
            requeued = conn.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'running'", (t,)
            ).rowcount
        for row in quarantined:
            log.error("job %d (series %s) quarantined: the node stopped while running it "
                      "%d times", row["id"], row["series_uid"], self.max_attempts)
        return requeued

    def requeue(self, job_ids: list[int]) -> int:
        """An administrator's second chance for quarantined or failed jobs: fresh attempts."""
        marks = ",".join("?" * len(job_ids))
        t = now()
        with self.db.transaction() as conn:
            return conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, reason = NULL, "
                f"updated_at = ? WHERE state IN ('quarantined', 'failed') AND id IN ({marks})",
                (t, *job_ids),
            ).rowcount

    def previous_run(self, job: Job) -> tuple[int | None, int, list[ReportRef]]:
        """The latest earlier finished run of the same series: (its id, how many instances it
        saw, the reports it sent), or (None, 0, []) when this is the first run."""
        row = self.db.connection().execute(
            "SELECT id, n_instances_at_queue, reports FROM jobs WHERE series_uid = ? AND id < ? "
            "AND state = 'done' ORDER BY id DESC LIMIT 1", (job.series_uid, job.id)
        ).fetchone()
        if row is None:
            return None, 0, []
        reports = [ReportRef(**r) for r in json.loads(row["reports"] or "[]")]
        return row["id"], row["n_instances_at_queue"] or 0, reports

    def stuck(self, older_than_s: float) -> list[Job]:
        """Jobs 'running' for longer than a job should take."""
        rows = self.db.connection().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) "
            "WHERE j.state = 'running' AND j.updated_at < ? ORDER BY j.id",
            (now() - older_than_s,),
        ).fetchall()
        return [_job(r) for r in rows]

    def in_state(self, state: JobState) -> list[Job]:
        rows = self.db.connection().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) "
            "WHERE j.state = ? ORDER BY j.id", (state,)
        ).fetchall()
        return [_job(r) for r in rows]

    def due(self) -> int:
        """Queued jobs a worker could claim now."""
        return self.db.connection().execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND not_before <= ?", (now(),)
        ).fetchone()[0]

    def incomplete_series(self) -> list[str]:
        """Series recorded incomplete (the sender broke off and did not resend) whose latest
        run is that rejection: nothing of them was processed."""
        rows = self.db.connection().execute(
            "SELECT j.series_uid FROM jobs j WHERE j.state = 'rejected' AND j.incomplete "
            "AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.series_uid = j.series_uid "
            "AND o.id > j.id) ORDER BY j.id"
        ).fetchall()
        return [r["series_uid"] for r in rows]

    def get(self, job_id: int) -> Job | None:
        row = self.db.connection().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) "
            "WHERE j.id = ?", (job_id,),
        ).fetchone()
        return None if row is None else _job(row)

    def all(self) -> list[Job]:
        rows = self.db.connection().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) ORDER BY j.id"
        ).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.connection().execute(
            "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"
        ).fetchall()
        return {r["state"]: r["n"] for r in rows}
