"""Export: result files from the outbox to their destinations by C-STORE.

One association per destination per round; each file is sent as written (no re-encoding).
Failures go back to the outbox, which decides the backoff and the dead letter. The STOW-RS
sender (node/stow.py) has the same `deliver` method; an item with a URL goes to it.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pynetdicom import AE

from covid_plugin.config import Peer, PeerTls
from covid_plugin.observability import Metrics
from covid_plugin.outage import Outage
from covid_plugin.store.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)

OnResult = Callable[[int, str | None], None]  # an outbox item's id, and None or the error


def _context_of(path: Path) -> tuple[str, str]:
    meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def client_context(tls: PeerTls) -> ssl.SSLContext:
    """Verify the destination's certificate; present ours when one is configured."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


class DicomSender:
    """Sends files to one DICOM peer; returns, per outbox item, None on success or the error.

    An outbox row names its destination by AE title, host and port; the configured peer with
    that address says whether to use TLS and with which certificates.
    """

    def __init__(self, calling_ae: str, peers: list[Peer] | None = None,
                 timeout_s: float = 30.0) -> None:
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self._tls = {(p.ae_title, p.host, p.port): p.tls for p in peers or [] if p.tls}

    def _tls_args(self, item: OutboxItem) -> tuple[ssl.SSLContext, str] | None:
        tls = self._tls.get((item.dest_ae, item.dest_host, item.dest_port))
        if tls is None:
            return None
        return client_context(tls), tls.server_name or item.dest_host

    def deliver(self, items: list[OutboxItem], on_result: OnResult | None = None
                ) -> dict[int, str | None]:
        """`on_result(item id, error)` hears of each C-STORE's answer as it comes."""
        first = items[0]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        contexts: dict[str, set[str]] = defaultdict(set)
        results: dict[int, str | None] = {}
        sendable: list[OutboxItem] = []
        for item in items:
            try:
                sop_class, syntax = _context_of(item.path)
            except (OSError, ValueError, AttributeError) as exc:
                results[item.id] = f"result file unreadable: {exc}"
                continue
            contexts[sop_class].add(syntax)
            sendable.append(item)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        if not sendable:
            return results
        try:
            tls_args = self._tls_args(first)
        except (OSError, ValueError) as exc:  # certificate files unreadable since start
            error = f"TLS set-up for {first.dest_ae} failed: {exc}"
            return results | {item.id: error for item in sendable}
        assoc = ae.associate(first.dest_host, first.dest_port, ae_title=first.dest_ae,
                             tls_args=tls_args)
        if not assoc.is_established:
            error = (f"association with {first.dest_ae}@{first.dest_host}:{first.dest_port}"
                     f"{' (TLS)' if tls_args else ''} failed")
            return results | {item.id: error for item in sendable}
        try:
            for item in sendable:
                if not assoc.is_established:
                    results[item.id] = "association ended before this file was sent"
                    continue
                status = assoc.send_c_store(item.path)
                code = getattr(status, "Status", None)
                if code is None:
                    results[item.id] = "no response from destination"
                elif code in (0x0000, 0xB000, 0xB007, 0xB006):
                    results[item.id] = None
                else:
                    comment = getattr(status, "ErrorComment", "")
                    results[item.id] = f"destination answered 0x{code:04X} {comment}".strip()
                if on_result is not None:
                    on_result(item.id, results[item.id])
        finally:
            if assoc.is_established:
                assoc.release()
        return results


class Sender(Protocol):
    def deliver(self, items: list[OutboxItem], on_result: OnResult | None = None
                ) -> dict[int, str | None]: ...


class OutboxSender:
    """A thread that drains the outbox: due items, grouped by destination.

    Items are claimed under a lease named `owner`, so that senders in several worker
    processes never send the same item at once, and one whose sender died is sent by another
    after `lease_s`. A sender killed after the peer stored an item but before the item was
    marked sent makes it be sent twice (same SOP Instance UID, which a PACS keeps once): the
    at-least-once window.
    """

    def __init__(self, outbox: Outbox, sender: Sender, metrics: Metrics,
                 poll_interval_s: float, web_sender: Sender | None = None,
                 owner: str = "sender", lease_s: float = 120.0) -> None:
        self.outbox = outbox
        self.owner = owner
        self.lease_s = lease_s
        self.sender = sender
        self.web_sender = web_sender  # for DICOMweb (STOW-RS) destinations
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def send_due(self) -> int:
        """One round; returns how many items were delivered. Each item is recorded as soon
        as the destination answers for it, so that a sender killed mid-batch sends again
        only what had not been acknowledged."""
        groups: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in self.outbox.claim(self.owner, lease_s=self.lease_s):
            groups[item.destination].append(item)
        delivered = 0
        for destination, items in groups.items():
            recorded: dict[int, str | None] = {}

            def record(item_id: int, error: str | None, destination: str = destination,
                       recorded: dict[int, str | None] = recorded) -> None:
                recorded[item_id] = error
                self._record(item_id, error, destination)
            for item_id, error in self._deliver(items, record).items():
                if item_id not in recorded:
                    record(item_id, error)
            delivered += sum(error is None for error in recorded.values())
        return delivered

    def _record(self, item_id: int, error: str | None, destination: str) -> None:
        if error is None:
            self.outbox.mark_sent(item_id, owner=self.owner)
            self.metrics.exported.inc()
            return
        self.metrics.export_failures.inc()
        state = self.outbox.mark_failed(item_id, error, owner=self.owner)
        log.warning("export of outbox item %d to %s failed (%s): %s",
                    item_id, destination, state, error)

    def _deliver(self, items: list[OutboxItem], on_result: OnResult) -> dict[int, str | None]:
        if items[0].dest_url is None:
            return self.sender.deliver(items, on_result)
        if self.web_sender is None:
            return {item.id: "this node has no DICOMweb sender" for item in items}
        return self.web_sender.deliver(items)

    def _run(self) -> None:
        outage = Outage("outbox round", log, base_s=self.poll_interval_s)
        while not self._stop.is_set():
            try:
                self.send_due()
                delay = outage.succeeded()
            except Exception as exc:  # keep exporting whatever one round's problem was
                delay = outage.failed(exc)
            self._stop.wait(delay)
