"""The durable job queue: one row per run of a series.

    received ----> queued ----> running ----> done | failed
       |             |            |---------> rejected     (the pipeline declines the series)
       |             |            |---------> queued       (disk full: tried again later)
       |             |            '---------> quarantined  (attempt cap reached)
       |             '--------------------->  superseded   (a newer run of the series came first)
       '----------------------------------->  rejected     (selection rules, or the sender
                                                            broke off and did not resend)

Every claim counts an attempt. A job the process died on (out of memory, a crash) is still
'running' at the next start: below the attempt cap it is queued again, at the cap it is
quarantined with its reason, so that one poisonous series cannot crash the node for ever.
`covid-plugin requeue ID` gives a quarantined or failed job fresh attempts. The move to 'done'
and the outbox rows it creates are one transaction, so a job is finished exactly once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from covid_plugin.store.db import Database, now

log = logging.getLogger(__name__)

ENDED_STATES = ("done", "failed", "rejected", "quarantined", "superseded")


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
    state: str
    attempts: int
    calling_ae: str
    modality: str
    reason: str | None = None
    updated_at: float = 0.0


@dataclass(frozen=True)
class Delivery:
    """One result file for one destination, created with the job's completion."""

    path: Path
    sop_instance_uid: str
    dest_ae: str
    dest_host: str
    dest_port: int
    dest_url: str | None = None  # a DICOMweb (STOW-RS) destination instead of a DICOM peer


@dataclass(frozen=True)
class ReportRef:
    """An SR a job sent; kept with the job so that a later run can name it as predecessor."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


_JOB_COLUMNS = ("j.id, j.series_uid, j.state, j.attempts, j.reason, j.updated_at, "
                "s.calling_ae, s.modality")


def _job(row) -> Job:
    return Job(row["id"], row["series_uid"], row["state"], row["attempts"], row["calling_ae"],
               row["modality"], row["reason"], row["updated_at"])


class JobQueue:
    def __init__(self, db: Database, max_attempts: int = 3, retry_after_s: float = 60.0) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.retry_after_s = retry_after_s

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

    def associations_ended(self, series_uids: Iterable[str], released: bool) -> None:
        """Record how an association that delivered to these series ended (listener side)."""
        column = "released_at" if released else "interrupted_at"
        uids = list(series_uids)
        if not uids:
            return
        t = now()
        with self.db.transaction() as conn:
            conn.executemany(f"UPDATE series SET {column} = ? WHERE series_uid = ?",
                             [(t, uid) for uid in uids])

    def close(self, job_id: int, reason: str | None) -> None:
        """End collection: queue the job, or reject it with `reason`.

        Queuing a newer run of a series supersedes an older run that is still waiting in the
        queue: it would only process fewer instances of the same series.
        """
        state = "queued" if reason is None else "rejected"
        t = now()
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, n_instances_at_queue = "
                "(SELECT n_instances FROM series WHERE series_uid = jobs.series_uid) "
                "WHERE id = ? AND state = 'received'",
                (state, reason, t, job_id),
            )
            if state == "queued":
                conn.execute(
                    "UPDATE jobs SET state = 'superseded', reason = ?, updated_at = ? "
                    "WHERE state = 'queued' AND id < ? "
                    "AND series_uid = (SELECT series_uid FROM jobs WHERE id = ?)",
                    (f"more instances arrived before it ran; job {job_id} runs instead",
                     t, job_id, job_id),
                )

    def claim(self) -> Job | None:
        """Take the next queued job; SKIP LOCKED's role is played by SQLite's write lock.

        Fresh jobs go before jobs already tried, so that a job that keeps failing does not
        hold up the queue; a series with a run in progress, or a newer run still collecting,
        waits for it.
        """
        t = now()
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? "
                "WHERE id = (SELECT j.id FROM jobs j WHERE j.state = 'queued' "
                "AND j.not_before <= ? AND NOT EXISTS (SELECT 1 FROM jobs o "
                "WHERE o.series_uid = j.series_uid AND o.id != j.id AND (o.state = 'running' "
                "OR (o.id > j.id AND o.state IN ('received', 'queued')))) "
                "ORDER BY j.attempts, j.id LIMIT 1) RETURNING id",
                (t, t),
            ).fetchone()
            if row is None:
                return None
            job = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s USING (series_uid) "
                "WHERE j.id = ?", (row["id"],)
            ).fetchone()
        return _job(job)

    def finish(self, job_id: int, deliveries: Iterable[Delivery], note: str | None = None,
               reports: Iterable[ReportRef] = (), supersedes: int | None = None) -> None:
        """Mark done, record its reports and queue its results for export, atomically."""
        t = now()
        kept = json.dumps([vars(r) for r in reports])
        with self.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE jobs SET state = 'done', reason = ?, updated_at = ?, supersedes = ?, "
                "reports = ? WHERE id = ? AND state = 'running'",
                (note, t, supersedes, kept, job_id),
            ).rowcount
            if not updated:
                raise RuntimeError(f"job {job_id} is not running; refusing to finish it twice")
            conn.executemany(
                "INSERT INTO outbox (job_id, path, sop_instance_uid, dest_ae, dest_host, "
                "dest_port, dest_url, state, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                [(job_id, str(d.path), d.sop_instance_uid, d.dest_ae, d.dest_host, d.dest_port,
                  d.dest_url, t, t, t) for d in deliveries],
            )

    def fail(self, job_id: int, reason: str) -> None:
        self._end(job_id, "failed", reason)

    def skip(self, job_id: int, reason: str) -> None:
        """A pipeline declined the series (a lateral film, say): rejected, with why."""
        self._end(job_id, "rejected", reason)

    def retry_later(self, job_id: int, reason: str) -> str:
        """The node, not the series, was at fault (disk full): queue it again after a pause,
        or quarantine it at the attempt cap. Returns the new state."""
        t = now()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row["attempts"] >= self.max_attempts:
                state = "quarantined"
                why = f"quarantined after {row['attempts']} attempts: {reason}"
            else:
                state, why = "queued", f"will retry: {reason}"
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, not_before = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running'",
                (state, why, t + self.retry_after_s, t, job_id),
            )
        return state

    def _end(self, job_id: int, state: str, reason: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, now(), job_id),
            )

    def requeue_interrupted(self) -> int:
        """At start: jobs a killed process left 'running' are queued again, unless they have
        had their attempts: those are quarantined. Returns how many were queued again."""
        t = now()
        with self.db.transaction() as conn:
            quarantined = conn.execute(
                "UPDATE jobs SET state = 'quarantined', updated_at = ?, reason = "
                "'quarantined after ' || attempts || ' attempts: the node stopped while "
                "running it each time (a crash or out of memory?)' "
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
