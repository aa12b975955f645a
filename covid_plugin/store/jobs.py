"""The durable job queue: one row per series, received > queued > running > done | failed.

A series whose selection rules say no ends as 'rejected' with the reason. After a crash,
'running' jobs go back to 'queued' so that every job is finished exactly once: the move to
'done' and the outbox rows it creates are one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from covid_plugin.store.db import Database, now


@dataclass(frozen=True)
class SeriesRecord:
    """A series as the tracker and the selection rules see it."""

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


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    state: str
    attempts: int
    calling_ae: str
    modality: str
    reason: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One result file for one destination, created with the job's completion."""

    path: Path
    sop_instance_uid: str
    dest_ae: str
    dest_host: str
    dest_port: int
    dest_url: str | None = None  # a DICOMweb (STOW-RS) destination instead of a DICOM peer


class JobQueue:
    def __init__(self, db: Database) -> None:
        self.db = db

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
            )
            for r in rows
        ]

    def close(self, job_id: int, reason: str | None) -> None:
        """End collection: queue the job, or reject it with `reason`."""
        state = "queued" if reason is None else "rejected"
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, n_instances_at_queue = "
                "(SELECT n_instances FROM series WHERE series_uid = jobs.series_uid) "
                "WHERE id = ? AND state = 'received'",
                (state, reason, now(), job_id),
            )

    def claim(self) -> Job | None:
        """Take the oldest queued job; SKIP LOCKED's role is played by SQLite's write lock."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1) "
                "RETURNING id, series_uid, state, attempts",
                (now(),),
            ).fetchone()
            if row is None:
                return None
            series = conn.execute(
                "SELECT calling_ae, modality FROM series WHERE series_uid = ?", (row["series_uid"],)
            ).fetchone()
        return Job(row["id"], row["series_uid"], row["state"], row["attempts"],
                   series["calling_ae"], series["modality"])

    def finish(self, job_id: int, deliveries: Iterable[Delivery], note: str | None = None) -> None:
        """Mark done and queue the results for export, atomically."""
        t = now()
        with self.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE jobs SET state = 'done', reason = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running'",
                (note, t, job_id),
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

    def _end(self, job_id: int, state: str, reason: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, now(), job_id),
            )

    def requeue_interrupted(self) -> int:
        """At start: jobs a killed worker left 'running' are queued again."""
        with self.db.transaction() as conn:
            return conn.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'running'", (now(),)
            ).rowcount

    def get(self, job_id: int) -> Job | None:
        row = self.db.connection().execute(
            "SELECT j.id, j.series_uid, j.state, j.attempts, j.reason, s.calling_ae, s.modality "
            "FROM jobs j JOIN series s USING (series_uid) WHERE j.id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        return Job(row["id"], row["series_uid"], row["state"], row["attempts"],
                   row["calling_ae"], row["modality"], row["reason"])

    def all(self) -> list[Job]:
        rows = self.db.connection().execute(
            "SELECT j.id, j.series_uid, j.state, j.attempts, j.reason, s.calling_ae, s.modality "
            "FROM jobs j JOIN series s USING (series_uid) ORDER BY j.id"
        ).fetchall()
        return [Job(r["id"], r["series_uid"], r["state"], r["attempts"], r["calling_ae"],
                    r["modality"], r["reason"]) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.connection().execute(
            "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"
        ).fetchall()
        return {r["state"]: r["n"] for r in rows}
