"""The running node: store, listener, worker, outbox sender and health endpoint, wired once
per process; one process may listen, work (jobs and outbox), or both."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covid_plugin.config import DicomwebDestination, Peer, Settings
from covid_plugin.findings import Findings
from covid_plugin.health import attention, problems_and_warnings
from covid_plugin.node.scp import StorageSCP
from covid_plugin.node.scu import DicomSender, OutboxSender
from covid_plugin.node.stow import StowSender
from covid_plugin.observability import HealthServer, Metrics, operations_health
from covid_plugin.outage import Outage
from covid_plugin.outputs import write_all
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import open_database
from covid_plugin.store.jobs import Job, JobQueue
from covid_plugin.store.lock import DataDirLock
from covid_plugin.store.outbox import Outbox
from covid_plugin.store.spool import Spool
from covid_plugin.worker import Worker

log = logging.getLogger(__name__)


class PipelinesNotFound(ImportError):
    """The configured `pipelines` does not name an importable attribute."""


def load_object(path: str) -> Any:
    """'package.module:attribute' -> the attribute (how the config names the pipelines)."""
    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        raise PipelinesNotFound(f"pipelines {path!r}: no module named {exc.name!r}") from exc
    except AttributeError:
        raise PipelinesNotFound(f"pipelines {path!r}: module {module} has no {attribute!r}") \
            from None


def process_name() -> str:
    """This process's name in the database (leases, heartbeats): unique per start, and
    readable enough that `covid-plugin jobs` tells an administrator which machine holds what."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Heartbeat:
    """A thread that tells the database this process is alive, every `interval_s`: the
    listener's heartbeat, the running job's lease. It is separate from the worker thread,
    which may spend minutes inside one CT."""

    def __init__(self, interval_s: float, beats: list[Callable[[], object]]) -> None:
        self.interval_s = interval_s
        self.beats = beats
        # each beat's failures are logged when they start and end, not every beat
        self._outages = [Outage(f"heartbeat ({getattr(beat, '__name__', 'beat')})", log,
                                interval_s, interval_s) for beat in beats]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        for beat, outage in zip(self.beats, self._outages, strict=True):
            try:
                beat()
                outage.succeeded()
            except Exception as exc:  # the database is away: the next beat tries again
                outage.failed(exc)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()


class Node:
    """One process of the node: a listener, a worker (jobs + outbox), or both (the default).

    Start order follows the data path backwards, so nothing is received before it can flow.
    With the embedded SQLite store the process holds the data dir alone (a second node on it
    raises DataDirInUse before it has opened the database or the spool); with a PostgreSQL
    `database_url`, listeners and workers share the data dir and the database, and find each
    other's state (open associations, job leases) there.
    """

    def __init__(self, settings: Settings,
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None,
                 listen: bool = True, work: bool = True) -> None:
        self.settings = settings
        self.listens, self.works = listen, work
        self.shared = settings.database_url is not None
        self.lock = DataDirLock(settings.data_dir, shared=self.shared).acquire()
        try:
            self._wire(on_result)
        except BaseException:
            self.lock.release()
            raise

    def _wire(self, on_result: Callable[[Job, Findings, list[Path]], None] | None) -> None:
        settings, cluster = self.settings, self.settings.cluster
        self.name = process_name()
        self.db = open_database(settings.database_url, settings.db_path)
        self.spool = Spool(settings.spool_dir, self.db)
        self.jobs = JobQueue(self.db, settings.jobs.max_attempts, settings.jobs.retry_after_s,
                             lease_s=cluster.job_lease_s)
        self.outbox = Outbox.from_settings(self.db, settings.outbox)
        self.associations = Associations(self.db, self.name, cluster.listener_stale_after_s)
        self.metrics = Metrics()
        self.metrics.add_state_gauges(self._state_counts)
        self.scp: StorageSCP | None = None
        self.worker: Worker | None = None
        self.sender: OutboxSender | None = None
        beats: list[Callable[[], object]] = []
        if self.listens:
            self.scp = StorageSCP(settings, self.spool, self.metrics, self.associations)
            beats += [self.scp.heartbeat, self.scp.record_ended]
        if self.works:
            pipelines = load_object(settings.pipelines)(settings)
            self.worker = Worker(settings, self.spool, self.jobs, self.metrics, pipelines,
                                 write_all, self.associations.active_series, on_result,
                                 owner=self.name, reap=self.associations.reap)
            beats += [self.worker.renew_lease, self._worker_beat]
            web = [d for d in settings.destinations if isinstance(d, DicomwebDestination)]
            peers = [*(d for d in settings.destinations if isinstance(d, Peer)),
                     *settings.return_addresses.values()]
            self.sender = OutboxSender(self.outbox, DicomSender(settings.ae_title, peers),
                                       self.metrics, settings.outbox.poll_interval_s,
                                       web_sender=StowSender(web), owner=self.name,
                                       lease_s=cluster.outbox_lease_s)
        self.heartbeat = Heartbeat(cluster.heartbeat_s, beats)
        self.health_server: HealthServer | None = None

    def _worker_beat(self) -> None:
        """The worker's heartbeat, only while its thread runs: health then knows when jobs
        wait and nothing will run them."""
        if self.worker is not None and self.worker.is_alive():
            self.associations.worker_heartbeat()

    def _state_counts(self) -> dict[str, dict[str, int]]:
        return {"jobs": self.jobs.counts(), "outbox": self.outbox.counts()}

    def _threads_alive(self) -> dict[str, bool]:
        threads = {"worker_alive": self.worker, "sender_alive": self.sender}
        return {key: thread.is_alive() for key, thread in threads.items() if thread is not None}

    def health(self) -> dict[str, Any]:
        try:
            counts = self._state_counts()
            operations = operations_health(
                self.settings.data_dir, self.settings.storage,
                [j.id for j in self.jobs.stuck(self.settings.jobs.stuck_after_s)],
                self.worker.unrecorded() if self.worker else [], self.outbox.backlog())
            found = attention(self.settings, self.jobs, self.outbox, self.associations)
            problems, operations["warnings"] = problems_and_warnings(self.settings, found)
            operations["problems"] += problems
            store_ok = True
        except Exception as exc:  # report, do not raise, from a health check
            counts, store_ok = {"error": str(exc)}, False
            operations = {"problems": [f"store unreadable: {exc}"]}
        alive = self._threads_alive()
        report = {
            "ok": store_ok and all(alive.values()) and not operations["problems"],
            "ae_title": self.settings.ae_title,
            "process": self.name,
            "roles": [role for role, on in (("listen", self.listens), ("work", self.works))
                      if on],
            "store": store_ok,
            **alive,
            "counts": counts,
            **operations,
        }
        return report

    def start(self) -> None:
        if self.listens:
            # on a shared spool, other listeners' transfers in progress have temp files too
            recovered = self.spool.recover(keep_parts_younger_than_s=3600 if self.shared else 0)
            if recovered:
                log.info("start-up recovery: %d spooled instances indexed", recovered)
        if self.works:
            # alone on the data dir, every 'running' job is this node's from before a crash;
            # sharing a database, some are other workers', whose leases tell
            if self.shared:
                requeued = self.jobs.expire_leases()
            else:  # and its outbox items leased to the dead sender go out now, not later
                requeued = self.jobs.requeue_interrupted()
                self.outbox.release_leases()
            if requeued:
                log.info("start-up recovery: %d jobs re-queued", requeued)
        self.heartbeat.start()
        if self.sender is not None and self.worker is not None:
            self.sender.start()
            self.worker.start()
        if self.scp is not None:
            self.scp.start()
        if self.settings.metrics_port is not None:
            self.health_server = HealthServer(self.settings.metrics_host,
                                              self.settings.metrics_port,
                                              self.metrics, self.health)
            self.health_server.start()
            log.info("metrics and health on http://%s:%d/", self.settings.metrics_host,
                     self.health_server.port)

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
            self.associations.leave()
        if self.worker is not None and self.sender is not None:
            self.worker.stop()
            self.sender.stop()
        self.heartbeat.stop()
        if self.health_server is not None:
            self.health_server.stop()
        self.db.close()
        self.lock.release()
