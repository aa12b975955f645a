"""The worker's periodic chores between jobs: taking back what dead peers held, and the
retention policy.

Both run on the worker's thread, each on its own schedule: leases in every round, so a dead
worker's job is taken back soon after its lease expires; retention only in a round that found
no job to run, so a purge never delays a waiting study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from covid_plugin.config import Settings
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.retention import purge
from covid_plugin.store.spool import Spool

log = logging.getLogger(__name__)


class Housekeeping:
    """Lease reaping every heartbeat, retention every `retention.interval_s`."""

    def __init__(self, settings: Settings, spool: Spool, jobs: JobQueue,
                 reap: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.reap = reap  # ends the associations of listeners that stopped answering
        self._next_reap = 0.0
        self._next_purge = 0.0  # due at once, unless held

    def hold_purge_until(self, t: float) -> None:
        """No purge before `t` (at start, one quiet period: jobs waiting since before the
        start run first)."""
        self._next_purge = t

    def reap_if_due(self) -> None:
        """Every heartbeat: end the associations of dead listeners, and take back the jobs of
        dead workers (queued again, or quarantined at the attempt cap)."""
        t = time.time()
        if t < self._next_reap:
            return
        self._next_reap = t + self.settings.cluster.heartbeat_s
        if self.reap is not None:
            self.reap()  # both log what they took back
        self.jobs.expire_leases()

    def purge_if_due(self) -> None:
        """Apply the retention policy every `retention.interval_s`."""
        t = time.time()
        if t < self._next_purge:
            return
        self._next_purge = t + self.settings.retention.interval_s
        report = purge(self.settings, self.spool.db, dry_run=False)
        if report.total_files or report.total_rows:
            log.info("retention: %s", report.summary())
