"""The spool: received instances as files, each durable before the sender hears success.

Write order: bytes to a temporary file, fsync, rename into place, fsync the directory, then one
transaction that indexes the instance, updates its series and opens a job. Only after that
commit does the listener acknowledge. A crash between rename and commit leaves a file the
sender will send again (it got no success) and that start-up recovery indexes anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_plugin.config import StorageLimits
from covid_plugin.instance import InstanceHeader, InvalidInstance, read_header
from covid_plugin.store import jobs
from covid_plugin.store.db import Database, now

log = logging.getLogger(__name__)

UNKNOWN_SENDER = "RECOVERED"  # a file spooled before the sender's AE title was kept with it


def forget_instances(conn: Any, series_uid: str, uids: list[str]) -> None:
    """Drop the index rows of a series' instances whose files retention removes, in its
    transaction; the series row stays (with its count lowered) while runs refer to it."""
    conn.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(u,) for u in uids])
    conn.execute("UPDATE series SET n_instances = CASE WHEN n_instances > ? "
                 "THEN n_instances - ? ELSE 0 END WHERE series_uid = ?",
                 (len(uids), len(uids), series_uid))


def forget_rejected(conn: Any, path: Path) -> None:
    """Drop the record of a refused dataset whose kept file retention removes."""
    conn.execute("DELETE FROM rejected_instances WHERE path = ?", (str(path),))


def forget_emptied(conn: Any, cutoff: float) -> dict[str, int]:
    """Drop the series rows left with no instance and no run, and the records of refusals
    before `cutoff` that kept no file, in retention's transaction; the rows deleted."""
    return {
        "series": conn.execute(
            "DELETE FROM series WHERE n_instances = 0 AND NOT EXISTS "
            "(SELECT 1 FROM jobs j WHERE j.series_uid = series.series_uid) AND NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)"
        ).rowcount,
        "rejected_instances": conn.execute(
            "DELETE FROM rejected_instances WHERE received_at < ? AND path IS NULL", (cutoff,)
        ).rowcount,
    }


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    path: Path
    is_new: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(folder: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory created, so that the new study and
    series directories themselves survive a power cut, not only the file inside them."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_dir(created.parent)


def disk_refusal(data_dir: Path, limits: StorageLimits) -> str | None:
    """Why the data dir's file system cannot take more instances now, or None.

    Checked per association and per instance: refusing while there is still room leaves
    space for the results, the database and the jobs already queued.
    """
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError as exc:
        return f"free space of {data_dir} unknown: {exc.strerror}"
    free_mb = usage.free / (1024 * 1024)
    free_percent = 100.0 * usage.free / usage.total if usage.total else 0.0
    if free_percent < limits.min_free_percent or free_mb < limits.min_free_mb:
        return (f"free space on the data dir's file system is {free_percent:.1f}% "
                f"({free_mb:.0f} MB), below storage.min_free_percent {limits.min_free_percent:g}% "
                f"or storage.min_free_mb {limits.min_free_mb:g} MB")
    return None


class Spool:
    """Files under `root`, indexed in `db`."""

    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db
        self._tmp = root / "tmp"
        self._rejected = root / "rejected"
        for folder in (self.root, self._tmp, self._rejected):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, header: InstanceHeader) -> Path:
        return self.root / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.dcm"

    def _write_durably(self, data: bytes, final: Path) -> None:
        _make_dirs_durably(final.parent)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def contains(self, sop_instance_uid: str) -> bool:
        row = self.db.connection().execute(
            "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return row is not None

    def store(self, header: InstanceHeader, data: bytes, calling_ae: str) -> StoredInstance:
        """Make one instance durable and indexed; a SOP Instance UID already held is kept once.

        The look-up comes before the write: a resend is not written again (a whole study
        resent would cost a durable write per instance), and one resent under another series
        would leave a second file that no index row, recovery or retention knows. Two copies
        arriving at once are both written; the insert's conflict indexes one.

        Raises OSError when the disk cannot take it (the caller answers 'out of resources').
        """
        final = self.path_for(header)
        if self.contains(header.sop_instance_uid):
            self._reopen_if_broken_off(header.series_uid)
            return StoredInstance(header.sop_instance_uid, final, is_new=False)
        self._write_durably(data, final)
        is_new = self._index(header, final, len(data), calling_ae)
        return StoredInstance(header.sop_instance_uid, final, is_new)

    def _index(self, header: InstanceHeader, path: Path, size: int, calling_ae: str) -> bool:
        t = now()
        with self.db.transaction() as conn:
            inserted = conn.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, "
                "study_uid, transfer_syntax, path, size, calling_ae, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (header.sop_instance_uid, header.sop_class_uid, header.series_uid,
                 header.study_uid, header.transfer_syntax, str(path), size, calling_ae, t),
            ).rowcount
            if not inserted:
                return False
            conn.execute(
                "INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, body_part, "
                "description, image_type, calling_ae, n_instances, first_at, last_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) "
                "ON CONFLICT (series_uid) DO UPDATE SET n_instances = series.n_instances + 1, "
                "last_at = excluded.last_at",
                (header.series_uid, header.study_uid, header.modality, header.sop_class_uid,
                 header.body_part,
                 header.description, header.image_type, calling_ae, t, t),
            )
            jobs.open_run(conn, header.series_uid, t)
        return True

    def _reopen_if_broken_off(self, series_uid: str) -> None:
        """A series recorded as incomplete (its sender broke off) that the sender now sends
        again: when the first transfer had in fact stored every instance, the resend brings
        only instances already held, and without a new job the complete series would never
        be processed. The quiet period counts from the resend."""
        if not jobs.latest_run_incomplete(self.db.connection(), series_uid):
            return  # the usual resend: no write lock taken per instance already held
        t = now()
        with self.db.transaction() as conn:  # checked again under the lock
            if jobs.reopen_if_incomplete(conn, series_uid, t):
                conn.execute("UPDATE series SET last_at = ? WHERE series_uid = ?",
                             (t, series_uid))

    def reject(self, data: bytes, reason: str, calling_ae: str, sop_uid: str | None) -> Path | None:
        """Keep a refused dataset for inspection and record why; never raises."""
        path: Path | None = self._rejected / f"{uuid.uuid4().hex}.dcm"
        try:
            path.write_bytes(data)
        except OSError:
            path = None
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO rejected_instances (sop_instance_uid, calling_ae, reason, path, "
                    "received_at) VALUES (?, ?, ?, ?, ?)",
                    (sop_uid, calling_ae, reason, str(path) if path else None, now()),
                )
        except Exception:  # the rejection is already logged by the caller; stay up
            log.exception("could not record rejected instance %s", sop_uid)
        return path

    def recover(self, keep_parts_younger_than_s: float = 0.0) -> int:
        """At start: drop partial temp files and index spooled files the index lacks.

        On a spool that several listeners share, the temp files of the others' transfers in
        progress are kept: only those older than `keep_parts_younger_than_s` are leftovers.
        """
        cutoff = time.time() - keep_parts_younger_than_s
        for part in self._tmp.glob("*.part"):
            try:
                if keep_parts_younger_than_s <= 0 or part.stat().st_mtime < cutoff:
                    part.unlink(missing_ok=True)
            except FileNotFoundError:  # its listener has just renamed it into place
                continue
        recovered = 0
        for path in self.root.glob("*/*/*.dcm"):
            if self.contains(path.stem):
                continue
            data = path.read_bytes()
            try:
                header = read_header(data)
            except InvalidInstance as exc:
                log.warning("spooled file %s unreadable at recovery: %s", path.name, exc.reason)
                continue
            sender = header.source_ae or UNKNOWN_SENDER
            if self._index(header, path, len(data), calling_ae=sender):
                recovered += 1
        if recovered:
            log.info("recovered %d spooled instances missing from the index", recovered)
        return recovered

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self.db.connection().execute(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at",
            (series_uid,),
        ).fetchall()
        return [Path(r["path"]) for r in rows]
