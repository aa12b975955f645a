"""Retention: what the node removes, and when, so that its disk use does not grow for ever.

Four kinds of things age out, each after its own number of days (None keeps it):
- spooled instances of a series none of whose jobs is still open, queued or running;
- refused instances under spool/rejected/ (they hold full patient data) and their rows;
- result files of ended jobs with nothing left to send (dead outbox items included: after
  `results_days` they can no longer be retried);
- database rows of ended jobs (their outbox and result rows, then their series).
A size cap on the files, when set, removes the oldest removable files first until the total
is under it. Nothing a job still needs is ever a candidate. The running node applies this
every `interval_s`; `covid-plugin purge [--dry-run]` applies (or previews) it on demand.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_plugin.config import Settings
from covid_plugin.store import jobs, spool
from covid_plugin.store.db import Database, now
from covid_plugin.store.states import ENDED_STATES, OPEN_STATES, sql_values

_DAY = 86400.0
_OPEN = sql_values(OPEN_STATES)
_ENDED = sql_values(ENDED_STATES)


@dataclass
class _Candidate:
    """Files that may go: `forget(conn)` removes their rows in the caller's transaction and
    says whether they may go after all; `unlink()` then removes the files."""

    kind: str  # "spool", "rejected" or "results"
    when: float
    files: int
    size: int
    forget: Callable[[Any], bool]
    unlink: Callable[[], None]


@dataclass
class PurgeReport:
    """What was (or, in a dry run, would be) removed."""

    dry_run: bool
    files: dict[str, int] = field(default_factory=lambda: {"spool": 0, "rejected": 0,
                                                           "results": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"spool": 0, "rejected": 0,
                                                           "results": 0})
    rows: dict[str, int] = field(default_factory=dict)
    kept_bytes: int = 0

    @property
    def total_files(self) -> int:
        return sum(self.files.values())

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        parts = [f"{self.files[k]} {k} file(s) ({self.bytes[k] / 1e6:.1f} MB)"
                 for k in ("spool", "rejected", "results")]
        rows = ", ".join(f"{n} {table}" for table, n in sorted(self.rows.items()) if n) or "none"
        return (f"{verb} {', '.join(parts)}; database rows: {rows}; "
                f"{self.kept_bytes / 1e6:.1f} MB kept")


def _size(paths: list[Path]) -> tuple[int, int]:
    files = size = 0
    for path in paths:
        try:
            size += path.stat().st_size
            files += 1
        except OSError:
            continue
    return files, size


def _spool_candidates(db: Database) -> list[_Candidate]:
    """Per series with no open job: its instance files and rows."""
    conn = db.connection()
    series = conn.execute(
        "SELECT series_uid, last_at FROM series s WHERE n_instances > 0 AND NOT EXISTS "
        f"(SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state IN {_OPEN})"
    ).fetchall()
    out = []
    for row in series:
        instances = conn.execute(
            "SELECT sop_instance_uid, path FROM instances WHERE series_uid = ?",
            (row["series_uid"],)).fetchall()
        paths = [Path(r["path"]) for r in instances]
        files, size = _size(paths)

        def forget(conn, uid=row["series_uid"], instances=instances) -> bool:
            uids = [r["sop_instance_uid"] for r in instances]
            still_open = conn.execute(
                f"SELECT 1 FROM jobs WHERE series_uid = ? AND state IN {_OPEN}", (uid,)
            ).fetchone()
            if still_open:  # an instance arrived meanwhile: the series is in use again
                return False
            spool.forget_instances(conn, uid, uids)
            return True

        def unlink(paths=paths) -> None:
            for path in paths:
                path.unlink(missing_ok=True)
            for folder in {p.parent for p in paths}:
                try:
                    folder.rmdir()  # only when empty
                    folder.parent.rmdir()
                except OSError:
                    pass
        out.append(_Candidate("spool", row["last_at"], files, size, forget, unlink))
    return out


def _rejected_candidates(db: Database, folder: Path) -> list[_Candidate]:
    out = []
    for path in folder.glob("*.dcm") if folder.is_dir() else []:
        try:
            stat = path.stat()
        except OSError:
            continue

        def forget(conn, path=path) -> bool:
            spool.forget_rejected(conn, path)
            return True
        out.append(_Candidate("rejected", stat.st_mtime, 1, stat.st_size, forget,
                              lambda path=path: path.unlink(missing_ok=True)))
    return out


def _results_candidates(db: Database, results_dir: Path) -> list[_Candidate]:
    """Result folders of ended jobs with no delivery pending."""
    rows = db.connection().execute(
        f"SELECT id, updated_at FROM jobs j WHERE state IN {_ENDED} AND NOT EXISTS "
        "(SELECT 1 FROM outbox o WHERE o.job_id = j.id AND o.state = 'pending')"
    ).fetchall()
    out = []
    for row in rows:
        folder = results_dir / str(row["id"])
        if not folder.is_dir():
            continue
        files, size = _size([p for p in folder.rglob("*") if p.is_file()])  # <attempt>/
        out.append(_Candidate("results", row["updated_at"], files, size, lambda conn: True,
                              lambda folder=folder: shutil.rmtree(folder, ignore_errors=True)))
    return out


class _DryRun(Exception):
    """Rolls a dry run's transaction back."""


def _delete_rows(conn, cutoff: float, counts: dict[str, int]) -> None:
    """Rows of jobs ended before `cutoff` with nothing pending, then series left empty,
    counted per table into `counts`."""
    counts.update(jobs.forget_ended(conn, cutoff))
    counts.update(spool.forget_emptied(conn, cutoff))


def purge(settings: Settings, db: Database, dry_run: bool = False,
          at: float | None = None) -> PurgeReport:
    """Apply the retention policy at time `at` (default now). Processes sharing a PostgreSQL
    database purge one at a time (the next one waits, then finds what is left)."""
    with db.exclusive("covid_plugin.purge"):
        return _purge(settings, db, dry_run, at)


def _purge(settings: Settings, db: Database, dry_run: bool, at: float | None) -> PurgeReport:
    """A dry run makes every row change of the real purge in one transaction and rolls it
    back, so that it counts what the purge would: the series rows that the removal of
    their instances leaves empty included."""
    report = PurgeReport(dry_run=dry_run)
    # files are looked at before any transaction: a long scan must not hold the store
    candidates = (_spool_candidates(db) + _rejected_candidates(db, settings.spool_dir / "rejected")
                  + _results_candidates(db, settings.results_dir))
    candidates.sort(key=lambda c: c.when)
    total = _tree_size(settings.spool_dir) + _tree_size(settings.results_dir)
    try:
        with db.transaction() if dry_run else nullcontext() as dry:
            _apply(settings, db, candidates, total, report, dry, now() if at is None else at)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    return report


def _apply(settings: Settings, db: Database, candidates: list[_Candidate], total: int,
           report: PurgeReport, dry: Any, t: float) -> None:
    """Remove (or, inside the dry run's transaction `dry`, only forget) what has expired."""
    policy = settings.retention
    days = {"spool": policy.spool_days, "rejected": policy.rejected_days,
            "results": policy.results_days}
    cap = None if policy.max_total_gb is None else policy.max_total_gb * 1e9
    for candidate in candidates:
        limit = days[candidate.kind]
        expired = limit is not None and candidate.when < t - limit * _DAY
        if not expired and (cap is None or total <= cap):
            continue
        if dry is not None:
            gone = candidate.forget(dry)
        else:
            with db.transaction() as conn:
                gone = candidate.forget(conn)
            if gone:
                candidate.unlink()
        if not gone:
            continue
        report.files[candidate.kind] += candidate.files
        report.bytes[candidate.kind] += candidate.size
        total -= candidate.size
    if policy.db_days is not None:
        cutoff = t - policy.db_days * _DAY
        if dry is not None:
            _delete_rows(dry, cutoff, report.rows)
        else:
            with db.transaction() as conn:
                _delete_rows(conn, cutoff, report.rows)
    report.kept_bytes = max(total, 0)


def _tree_size(root: Path) -> int:
    """Bytes of the files under `root`; files that vanish meanwhile count as nothing."""
    return _size([p for p in root.rglob("*") if p.is_file()])[1] if root.is_dir() else 0
