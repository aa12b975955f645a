"""The persisted outbox: result files waiting for a destination, with retries and a dead letter.

Backoff doubles after each failed attempt (capped at `backoff_max_s`); an item that fails
once it is `dead_after_s` old (or after `max_attempts` tries, when set) is 'dead' until
someone runs `covid-plugin retry`, so a destination that is down for hours loses nothing and
does not make the node hammer it.

Senders `claim` due items under a lease, so that several sender processes never send one item
at the same time (SKIP LOCKED on PostgreSQL). Delivery is at least once: a sender killed after
the peer stored an item but before `mark_sent` leaves it pending, and once its lease expires
another sender sends it again. The peer then receives the same object twice, with the same
SOP Instance UID, which a PACS stores once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_plugin.config import OutboxSettings
from covid_plugin.store.db import Database, now
from covid_plugin.store.states import OutboxState

log = logging.getLogger(__name__)


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
class OutboxItem:
    id: int
    job_id: int | None
    path: Path
    sop_instance_uid: str
    dest_ae: str
    dest_host: str
    dest_port: int
    state: OutboxState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    dest_url: str | None = None  # set for a DICOMweb (STOW-RS) destination

    @property
    def destination(self) -> str:
        """Where the item goes, for grouping and for people: a URL or AE@host:port."""
        return self.dest_url or f"{self.dest_ae}@{self.dest_host}:{self.dest_port}"


def _item(row) -> OutboxItem:
    return OutboxItem(
        id=row["id"], job_id=row["job_id"], path=Path(row["path"]),
        sop_instance_uid=row["sop_instance_uid"], dest_ae=row["dest_ae"],
        dest_host=row["dest_host"], dest_port=row["dest_port"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"], next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"], dest_url=row["dest_url"],
    )


def add(conn: Any, job_id: int, deliveries: Iterable[Delivery], at: float) -> None:
    """Queue a finished job's results, on the connection of the transaction that finishes
    it (JobQueue.finish): the job is done if and only if its results are queued."""
    conn.executemany(
        "INSERT INTO outbox (job_id, path, sop_instance_uid, dest_ae, dest_host, "
        "dest_port, dest_url, state, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        [(job_id, str(d.path), d.sop_instance_uid, d.dest_ae, d.dest_host, d.dest_port,
          d.dest_url, at, at, at) for d in deliveries],
    )


def forget_jobs(conn: Any, job_ids: str, args: tuple[Any, ...]) -> int:
    """Delete the rows of the jobs that the SQL query `job_ids` selects, in the caller's
    transaction (retention removes a job and its results together); returns how many."""
    return conn.execute(f"DELETE FROM outbox WHERE job_id IN ({job_ids})", args).rowcount


class Outbox:
    def __init__(self, db: Database, max_attempts: int | None, backoff_base_s: float,
                 backoff_max_s: float, dead_after_s: float = 86400.0) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.dead_after_s = dead_after_s

    @classmethod
    def from_settings(cls, db: Database, settings: OutboxSettings) -> Outbox:
        """The outbox as the node and the command line configure it."""
        return cls(db, settings.max_attempts, settings.backoff_base_s, settings.backoff_max_s,
                   settings.dead_after_s)

    def claim(self, owner: str, limit: int = 100, lease_s: float = 120.0) -> list[OutboxItem]:
        """Up to `limit` due pending items no other sender holds, leased to `owner` for
        `lease_s` (longer than one delivery round may take), oldest first."""
        t = now()
        with self.db.transaction() as conn:
            rows = conn.execute(
                "UPDATE outbox SET lease_owner = ?, lease_expires_at = ? WHERE id IN "
                "(SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
                "AND (lease_expires_at IS NULL OR lease_expires_at < ?) "
                f"ORDER BY id LIMIT ?{self.db.skip_locked}) RETURNING *",
                (owner, t + lease_s, t, t, limit),
            ).fetchall()
        return sorted((_item(r) for r in rows), key=lambda item: item.id)

    def release_leases(self) -> int:
        """At the start of the embedded single-process node: the leases its killed
        predecessor held are dropped, so that those items go out now rather than when the
        leases expire. Not for a sender sharing the outbox with others."""
        with self.db.transaction() as conn:
            return conn.execute(
                "UPDATE outbox SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE lease_owner IS NOT NULL AND state = 'pending'"
            ).rowcount

    def mark_sent(self, item_id: int, owner: str | None = None) -> None:
        """The peer has it: recorded whoever holds the lease now (it is true either way);
        when `owner` lost its lease meanwhile, another sender may be sending it again."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT lease_owner FROM outbox WHERE id = ?",
                               (item_id,)).fetchone()
            conn.execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = NULL, "
                "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                (now(), item_id),
            )
        if owner is not None and row is not None and row["lease_owner"] not in (owner, None):
            log.warning("outbox item %d was sent by %s after its lease passed to %s: it may "
                        "be sent twice", item_id, owner, row["lease_owner"])

    def mark_failed(self, item_id: int, error: str,
                    owner: str | None = None) -> OutboxState | None:
        """Record a failed attempt; returns the new state ('pending' or 'dead'), or None when
        `owner` no longer holds the item's lease (another sender's attempt counts instead)."""
        t = now()
        held = "" if owner is None else " AND lease_owner = ?"
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT attempts, created_at FROM outbox WHERE id = ?{held}",
                               (item_id, *(() if owner is None else (owner,)))).fetchone()
            if row is None:
                return None
            attempts = row["attempts"] + 1
            capped = self.max_attempts is not None and attempts >= self.max_attempts
            too_old = t - row["created_at"] >= self.dead_after_s
            state = OutboxState.DEAD if capped or too_old else OutboxState.PENDING
            delay = min(self.backoff_base_s * 2 ** (attempts - 1), self.backoff_max_s)
            conn.execute(
                "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, next_attempt_at = ?, "
                "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                (state, attempts, error[:500], t + delay, t, item_id),
            )
        return state

    def list(self, state: str | None = None) -> list[OutboxItem]:
        sql, args = "SELECT * FROM outbox", ()
        if state:
            sql, args = sql + " WHERE state = ?", (state,)
        rows = self.db.connection().execute(sql + " ORDER BY id", args).fetchall()
        return [_item(r) for r in rows]

    def retry(self, item_ids: list[int] | None = None) -> int:
        """Send dead items again (all of them, or those named), with a fresh attempt count
        and a fresh age (`dead_after_s` counts from now)."""
        t = now()
        with self.db.transaction() as conn:
            if item_ids:
                marks = ",".join("?" * len(item_ids))
                return conn.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                    f"created_at = ?, updated_at = ? WHERE state = 'dead' AND id IN ({marks})",
                    (t, t, t, *item_ids),
                ).rowcount
            return conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "created_at = ?, updated_at = ? WHERE state = 'dead'",
                (t, t, t),
            ).rowcount

    def backlog(self) -> dict[str, float | int]:
        """How much waits to be sent, and for how long the oldest item has waited."""
        row = self.db.connection().execute(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE state = 'pending'"
        ).fetchone()
        dead = self.db.connection().execute(
            "SELECT COUNT(*) FROM outbox WHERE state = 'dead'").fetchone()[0]
        waited = round(now() - row["oldest"], 1) if row["oldest"] is not None else 0.0
        return {"pending": row["n"], "oldest_pending_s": waited, "dead": dead}

    def dead_series(self) -> list[str]:
        """The source series whose results are dead (not delivered, no longer tried)."""
        rows = self.db.connection().execute(
            "SELECT DISTINCT j.series_uid FROM outbox o JOIN jobs j ON j.id = o.job_id "
            "WHERE o.state = 'dead' ORDER BY j.series_uid"
        ).fetchall()
        return [r["series_uid"] for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.connection().execute(
            "SELECT state, COUNT(*) AS n FROM outbox GROUP BY state"
        ).fetchall()
        return {r["state"]: r["n"] for r in rows}
