"""Counters a Prometheus scrape reads, and the health report (HTTP and `covid-plugin health`).

The counters live in one registry per node so that tests can run several nodes in a process.
Queue depths are read from the store at scrape time: they then stay right across restarts.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from covid_plugin.config import StorageLimits
from covid_plugin.store.spool import disk_refusal

log = logging.getLogger(__name__)


class Metrics:
    """The node's counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "covid_plugin_instances_received", "Instances stored and acknowledged",
            ["modality"], registry=self.registry)
        self.duplicates = Counter(
            "covid_plugin_instances_duplicate", "Instances received again (stored once)",
            registry=self.registry)
        self.rejected = Counter(
            "covid_plugin_instances_rejected", "Instances refused with a failure status",
            ["reason"], registry=self.registry)
        self.refused_connections = Counter(
            "covid_plugin_connections_refused",
            "Connections closed or associations refused before any instance, by reason "
            "(peer_limit, evicted, tls_timeout, tls_failed, acse_timeout, disk)", ["reason"],
            registry=self.registry)
        self.discarded = Counter(
            "covid_plugin_instances_discarded", "Instances of unprocessed SOP classes discarded",
            registry=self.registry)
        self.series_rejected = Counter(
            "covid_plugin_series_rejected", "Completed series the selection rules refused",
            registry=self.registry)
        self.jobs = Counter(
            "covid_plugin_jobs", "Jobs that ended, by outcome", ["outcome"],
            registry=self.registry)
        self.exported = Counter(
            "covid_plugin_objects_exported", "Result objects delivered to a destination",
            registry=self.registry)
        self.export_failures = Counter(
            "covid_plugin_export_failures", "Failed delivery attempts", registry=self.registry)

    def add_state_gauges(self, read_counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Expose the store's current job and outbox states as gauges."""
        self.registry.register(_StateCollector(read_counts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, read_counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._read = read_counts

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        counts = self._read()
        for table, by_state in counts.items():
            family = GaugeMetricFamily(
                f"covid_plugin_{table}_by_state", f"Current {table} rows by state",
                labels=["state"])
            for state, n in sorted(by_state.items()):
                family.add_metric([state], n)
            yield family




def operations_health(data_dir: Path, storage: StorageLimits, stuck_jobs: list[int],
                      unrecorded_jobs: list[int], outbox_backlog: dict[str, Any]
                      ) -> dict[str, Any]:
    """The queue and disk part of a health report; `problems` lists what makes it unhealthy.

    The disk is a problem exactly when the listener refuses data for it (the storage
    watermark), so health never says ok while senders are being turned away.
    """
    usage = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent)
    used = 100.0 * (usage.total - usage.free) / usage.total if usage.total else 0.0
    problems = []
    if stuck_jobs:
        problems.append(f"job(s) running for too long: {', '.join(map(str, stuck_jobs))}")
    if unrecorded_jobs:
        problems.append("outcome of job(s) not written yet (is the disk full?): "
                        + ", ".join(map(str, unrecorded_jobs)))
    refusal = disk_refusal(data_dir, storage)
    if refusal is not None:
        problems.append(refusal)
    return {
        "stuck_jobs": stuck_jobs,
        "unrecorded_jobs": unrecorded_jobs,
        "disk": {"free_bytes": usage.free, "total_bytes": usage.total,
                 "used_percent": round(used, 1)},
        "outbox_backlog": outbox_backlog,
        "problems": problems,
    }


class HealthServer:
    """GET /metrics (Prometheus text format) and GET /health (JSON, 200 if healthy else 503)."""

    def __init__(self, host: str, port: int, metrics: Metrics,
                 health: Callable[[], dict[str, Any]]) -> None:
        handler = _handler_for(metrics, health)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health-http",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler_for(metrics: Metrics, health: Callable[[], dict[str, Any]]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's interface
            if self.path == "/metrics":
                body, ctype, code = metrics.exposition(), CONTENT_TYPE_LATEST, 200
            elif self.path == "/health":
                report = health()
                body = json.dumps(report).encode()
                ctype, code = "application/json", 200 if report.get("ok") else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("health http: " + fmt, *args)

    return Handler
