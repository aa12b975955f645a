"""The running node: store, listener, worker, outbox sender and health endpoint, wired once."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covid_plugin.config import DicomwebDestination, Peer, Settings
from covid_plugin.findings import Findings
from covid_plugin.node.scp import StorageSCP
from covid_plugin.node.scu import DicomSender, OutboxSender
from covid_plugin.node.stow import StowSender
from covid_plugin.observability import HealthServer, Metrics, operations_health
from covid_plugin.outputs import write_all
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


class Node:
    """Start order follows the data path backwards, so nothing is received before it can flow.

    The data dir lock comes first of all: a second node on the same data dir raises
    DataDirInUse before it has opened the database or the spool.
    """

    def __init__(self, settings: Settings,
                 on_result: Callable[[Job, Findings, list[Path]], None] | None = None) -> None:
        self.settings = settings
        self.lock = DataDirLock(settings.data_dir).acquire()
        try:
            self._wire(on_result)
        except BaseException:
            self.lock.release()
            raise

    def _wire(self, on_result: Callable[[Job, Findings, list[Path]], None] | None) -> None:
        settings = self.settings
        self.db = open_database(None, settings.db_path)
        self.spool = Spool(settings.spool_dir, self.db)
        self.jobs = JobQueue(self.db, settings.jobs.max_attempts, settings.jobs.retry_after_s)
        self.outbox = Outbox(self.db, settings.outbox.max_attempts,
                             settings.outbox.backoff_base_s, settings.outbox.backoff_max_s)
        self.metrics = Metrics()
        self.metrics.add_state_gauges(self._state_counts)
        self.scp = StorageSCP(settings, self.spool, self.metrics)
        pipelines = load_object(settings.pipelines)(settings)
        self.worker = Worker(settings, self.spool, self.jobs, self.metrics, pipelines,
                             write_all, self.scp.active_series, on_result)
        web = [d for d in settings.destinations if isinstance(d, DicomwebDestination)]
        peers = [*(d for d in settings.destinations if isinstance(d, Peer)),
                 *settings.return_addresses.values()]
        self.sender = OutboxSender(self.outbox, DicomSender(settings.ae_title, peers),
                                   self.metrics, settings.outbox.poll_interval_s,
                                   web_sender=StowSender(web))
        self.health_server: HealthServer | None = None

    def _state_counts(self) -> dict[str, dict[str, int]]:
        return {"jobs": self.jobs.counts(), "outbox": self.outbox.counts()}

    def health(self) -> dict[str, Any]:
        try:
            counts = self._state_counts()
            operations = operations_health(
                self.settings.data_dir, self.settings.storage,
                [j.id for j in self.jobs.stuck(self.settings.jobs.stuck_after_s)],
                self.worker.unrecorded(), self.outbox.backlog())
            store_ok = True
        except Exception as exc:  # report, do not raise, from a health check
            counts, store_ok = {"error": str(exc)}, False
            operations = {"problems": [f"store unreadable: {exc}"]}
        report = {
            "ok": (store_ok and self.worker.is_alive() and self.sender.is_alive()
                   and not operations["problems"]),
            "ae_title": self.settings.ae_title,
            "store": store_ok,
            "worker_alive": self.worker.is_alive(),
            "sender_alive": self.sender.is_alive(),
            "counts": counts,
            **operations,
        }
        return report

    def start(self) -> None:
        recovered = self.spool.recover()
        requeued = self.jobs.requeue_interrupted()
        self.outbox.release_leases()
        if recovered or requeued:
            log.info("start-up recovery: %d instances indexed, %d jobs re-queued",
                     recovered, requeued)
        self.sender.start()
        self.worker.start()
        self.scp.start()
        if self.settings.metrics_port is not None:
            self.health_server = HealthServer(self.settings.metrics_host,
                                              self.settings.metrics_port,
                                              self.metrics, self.health)
            self.health_server.start()
            log.info("metrics and health on http://%s:%d/", self.settings.metrics_host,
                     self.health_server.port)

    def stop(self) -> None:
        self.scp.stop()
        self.worker.stop()
        self.sender.stop()
        if self.health_server is not None:
            self.health_server.stop()
        self.lock.release()
