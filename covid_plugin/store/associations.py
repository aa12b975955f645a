"""Open associations, kept in the database so that series completion does not depend on one
listener's memory.

A series is complete when no association is still delivering to it and it has been quiet for
the quiet period (series.py decides). With several listeners (two behind one address, or a
study sent over two associations to two listeners) only the database sees every open
association. Each listener records the associations delivering to a series and how each
ended (`series.released_at`, `series.interrupted_at`), and keeps a heartbeat. A listener that
stops without saying so (kill -9, a lost machine) stops its heartbeat; after `stale_after_s`
any process's `reap` ends its associations as interrupted, so their series are neither held
open for ever nor taken as complete.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from covid_plugin.store.db import Database, now

log = logging.getLogger(__name__)

# workers keep their heartbeat in the same table as listeners (a table of its own would push
# the SQLite schema past the 64 KiB a new database writes at once), under this prefix; they
# never have open associations, so reaping a dead worker's row only forgets it
WORKER = "worker "


class Associations:
    """The open associations of one listener (`listener`: a name unique among the listeners
    sharing the database, e.g. host:pid), and the view of all of them that workers need."""

    def __init__(self, db: Database, listener: str, stale_after_s: float = 30.0) -> None:
        self.db = db
        self.listener = listener
        self.stale_after_s = stale_after_s

    def heartbeat(self) -> bool:
        """This listener is alive (call it every few seconds, well within stale_after_s).

        False when its row was missing: the first beat, or the listener was taken for dead
        (paused or cut off past stale_after_s) and reaped, its open associations with it.
        The caller then registers its open associations again (`delivering`).
        """
        t = now()
        with self.db.transaction() as conn:
            if conn.execute("UPDATE listeners SET heartbeat_at = ? WHERE listener = ?",
                            (t, self.listener)).rowcount:
                return True
            conn.execute("INSERT INTO listeners (listener, heartbeat_at) VALUES (?, ?) "
                         "ON CONFLICT (listener) DO NOTHING", (self.listener, t))
        return False

    def delivering(self, assoc: str, series_uid: str) -> None:
        """Association `assoc` (unique among this listener's associations, e.g. a UUID)
        delivers to `series_uid`: call it before the first instance of the series on that
        association is stored, so that the series cannot look complete in between."""
        t = now()
        with self.db.transaction() as conn:
            # an open association always has its listener's row, so that reap finds it
            conn.execute("INSERT INTO listeners (listener, heartbeat_at) VALUES (?, ?) "
                         "ON CONFLICT (listener) DO NOTHING", (self.listener, t))
            conn.execute(
                "INSERT INTO open_associations (assoc, series_uid, listener, opened_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (assoc, series_uid) DO NOTHING",
                (assoc, series_uid, self.listener, t),
            )

    def ended(self, assoc: str, released: bool, series: Collection[str] = (),
              refused: Collection[str] = ()) -> None:
        """Association `assoc` ended: released normally, or aborted or lost. Its series
        (its rows, and `series`, what the listener knows it delivered to: the rows are gone
        when the listener was reaped while the association was still alive) record when (a
        series whose last instance came after its last clean release may be partial) and it
        is forgotten, in one transaction. The `refused` series, of which the listener refused
        an instance (0xA700: the store was away, the disk full), end as interrupted even on
        a release: they lack what the sender must send again."""
        column = "released_at" if released else "interrupted_at"
        named = f" OR series_uid IN ({','.join('?' * len(series))})" if series else ""
        held = f"({','.join('?' * len(refused))})"
        kept = f" AND series_uid NOT IN {held}" if refused else ""
        t = now()
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE series SET {column} = ? WHERE (series_uid IN (SELECT series_uid FROM "
                f"open_associations WHERE assoc = ? AND listener = ?){named}){kept}",
                (t, assoc, self.listener, *series, *refused),
            )
            if refused:
                conn.execute(f"UPDATE series SET interrupted_at = ? WHERE series_uid IN {held}",
                             (t, *refused))
            conn.execute("DELETE FROM open_associations WHERE assoc = ? AND listener = ?",
                         (assoc, self.listener))

    def worker_heartbeat(self) -> None:
        """This process's worker thread is alive: health says when none is while jobs wait."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO listeners (listener, heartbeat_at) VALUES (?, ?) "
                "ON CONFLICT (listener) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (WORKER + self.listener, now()),
            )

    def live_workers(self) -> int:
        """Workers whose heartbeat is younger than stale_after_s."""
        return self.db.connection().execute(
            "SELECT COUNT(*) FROM listeners WHERE listener LIKE ? AND heartbeat_at >= ?",
            (WORKER + "%", now() - self.stale_after_s),
        ).fetchone()[0]

    def active_series(self) -> set[str]:
        """Series an open association on a live listener is delivering to."""
        rows = self.db.connection().execute(
            "SELECT DISTINCT o.series_uid FROM open_associations o "
            "JOIN listeners l ON l.listener = o.listener WHERE l.heartbeat_at >= ?",
            (now() - self.stale_after_s,),
        ).fetchall()
        return {r["series_uid"] for r in rows}

    def reap(self) -> int:
        """Listeners silent for longer than stale_after_s were killed or lost: their open
        associations end as interrupted at the listener's last heartbeat, and the listener
        is forgotten. Any process may call it; returns how many associations it ended."""
        with self.db.transaction() as conn:
            stale = conn.execute(
                "SELECT listener, heartbeat_at FROM listeners WHERE heartbeat_at < ?"
                f"{self.db.skip_locked}",
                (now() - self.stale_after_s,),
            ).fetchall()
            ended = 0
            for row in stale:
                ended += self._end_all(conn, row["listener"], row["heartbeat_at"])
        for row in stale:
            log.warning("%s silent since %.0f s: taken for dead, its open associations (if "
                        "any) ended as interrupted", row["listener"],
                        now() - row["heartbeat_at"])
        return ended

    def leave(self) -> None:
        """A clean stop of this listener: associations still open end as interrupted."""
        with self.db.transaction() as conn:
            self._end_all(conn, self.listener, now())

    @staticmethod
    def _end_all(conn, listener: str, at: float) -> int:
        # never moves an interruption back: a later one must keep the series from looking
        # delivered cleanly
        conn.execute(
            "UPDATE series SET interrupted_at = CASE WHEN interrupted_at > ? THEN "
            "interrupted_at ELSE ? END WHERE series_uid IN "
            "(SELECT series_uid FROM open_associations WHERE listener = ?)",
            (at, at, listener),
        )
        ended = conn.execute(
            "SELECT COUNT(DISTINCT assoc) FROM open_associations WHERE listener = ?",
            (listener,),
        ).fetchone()[0]
        conn.execute("DELETE FROM open_associations WHERE listener = ?", (listener,))
        conn.execute("DELETE FROM listeners WHERE listener = ?", (listener,))
        return ended
