"""The listener: a pynetdicom AE answering C-ECHO and C-STORE for chest CR/DX/CT.

Network threads only parse headers, write bytes and rows; they acknowledge an instance only
after the spool says it is durable and indexed. Everything heavy runs on the worker.
Which associations are open, and to which series they deliver, is written to the database
(store/associations.py), not kept in this process: a worker in another process, or on another
machine, decides from there when a series is complete.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid

from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

from covid_plugin.config import Settings, TlsSettings
from covid_plugin.instance import InvalidInstance, loggable_uid, read_header
from covid_plugin.node.server import GuardedAssociationServer, serve
from covid_plugin.observability import Metrics
from covid_plugin.store.associations import Associations
from covid_plugin.store.db import STORE_ERRORS
from covid_plugin.store.spool import Spool, disk_refusal

log = logging.getLogger(__name__)

PROCESSED_SOP_CLASSES = [
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
]

# accepted as received: we store the sender's bytes and decode later, on the worker
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_AUTHORIZED = 0x0124
_MB = 1024 * 1024


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:
        ctx.load_verify_locations(str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageSCP:
    """The AE, its handlers, and the record of which series are still being delivered."""

    def __init__(self, settings: Settings, spool: Spool, metrics: Metrics,
                 associations: Associations) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.associations = associations
        # association id -> (its name in the database, the series it has delivered to)
        self._active: dict[int, tuple[str, set[str]]] = {}
        self._release_requested: set[int] = set()  # associations whose sender asked to release
        # association id -> series of which this listener refused an instance (0xA700)
        self._refused: dict[int, set[str]] = {}
        # ends the database did not take: (association, released, its series, refused ones)
        self._unrecorded_ends: list[tuple[str, bool, set[str], set[str]]] = []
        self._lock = threading.Lock()
        # (calling AE, refused SOP classes) already logged at INFO
        self._refusals_logged: set[tuple[str, tuple[str, ...]]] = set()
        self._server: GuardedAssociationServer | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        net = self.settings.network
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.network_timeout = net.idle_timeout_s  # an association silent this long is aborted
        ae.acse_timeout = net.acse_timeout_s  # a connection that never asks is closed
        ae.dimse_timeout = net.dimse_timeout_s
        ae.maximum_associations = net.max_associations
        ae.require_called_aet = self.settings.check_called_ae
        ae.add_supported_context(Verification)
        processed = set(PROCESSED_SOP_CLASSES)
        for sop_class in PROCESSED_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        if self.settings.unsupported_sop_classes == "discard":
            for cx in AllStoragePresentationContexts:
                if cx.abstract_syntax not in processed:
                    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        if self.settings.allowed_callers:
            # `covid-plugin health` echoes as health_ae_title; it may echo, never store
            ae.require_calling_aet = [*self.settings.allowed_callers,
                                      self.settings.health_ae_title]
        return ae

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_interrupted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        ssl_context = _ssl_context(self.settings.tls) if self.settings.tls.enabled else None
        self._server = self.ae.make_server(
            (self.settings.host, self.settings.port), evt_handlers=handlers,
            ssl_context=ssl_context, server_class=GuardedAssociationServer,
            limits=self.settings.network, refusal=self._refusal,
            on_refused=lambda why: self.metrics.refused_connections.labels(reason=why).inc(),
        )
        serve(self._server)
        log.info("listening as %s on %s:%d%s", self.settings.ae_title, self.settings.host,
                 self.port, " (TLS)" if ssl_context else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _refusal(self) -> str | None:
        """Why the node cannot take data now, or None."""
        return disk_refusal(self.settings.data_dir, self.settings.storage)

    # --- event handlers (pynetdicom threads) ---

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        log.info("association from %s (%s:%s) accepted", assoc.requestor.ae_title,
                 assoc.requestor.address, assoc.requestor.port)
        refused = tuple(sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}))
        if refused:
            # A PACS proposes the same long list on every association: said once per caller
            # (and list), so that a bounced result stands out; the repeats at DEBUG.
            caller = str(assoc.requestor.ae_title)
            with self._lock:
                first = (caller, refused) not in self._refusals_logged
                self._refusals_logged.add((caller, refused))
            log.log(logging.INFO if first else logging.DEBUG,
                    "refused %d presentation context(s) from %s, SOP class not processed%s: %s",
                    len(refused), caller, "" if first else " (again)", ", ".join(refused))

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    def _on_pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_RELEASE_RQ):
            with self._lock:
                self._release_requested.add(id(event.assoc))

    def _on_released(self, event: evt.Event) -> None:
        self._ended(event.assoc, released=True)

    def _on_interrupted(self, event: evt.Event) -> None:
        self._ended(event.assoc, released=False)

    def _on_conn_close(self, event: evt.Event) -> None:
        """The connection closed: a normal end if the sender had asked to release.

        EVT_RELEASED fires on the association's thread after the A-RELEASE-RP is sent, while
        the sender's close of the connection fires EVT_CONN_CLOSE on the DUL thread, so on a
        loaded machine the close can come first. The A-RELEASE-RQ is received on that same
        DUL thread before the close, so it decides; without it the sender broke off.
        """
        with self._lock:
            released = id(event.assoc) in self._release_requested
        self._ended(event.assoc, released=released)

    def _ended(self, assoc: Association, released: bool) -> None:
        """Record how the association ended for the series it delivered to, then forget it.

        One transaction ends it in the database: the series' release or abort time is written
        as its open-association rows go, so a worker never sees the series finished before its
        abort. An aborted or lost association leaves its series incomplete until the sender
        sends it again (series.py decides). If this write fails, the heartbeat writes it later
        (`record_ended`): until then the series still counts as being delivered.
        """
        with self._lock:  # EVT_ABORTED and EVT_CONN_CLOSE both come: the first one ends it
            name, series = self._active.pop(id(assoc), ("", set()))
            refused = self._refused.pop(id(assoc), set())
            self._release_requested.discard(id(assoc))
        if series or refused:
            if not released:
                log.warning("association from %s ended without release; %d series held as "
                            "possibly incomplete", assoc.requestor.ae_title, len(series))
            if refused:
                log.warning("association from %s ended; %d series held for the resend of the "
                            "instances refused", assoc.requestor.ae_title, len(refused))
            try:
                self.associations.ended(name, released, series, refused)
            except Exception:  # the store is unwritable for a moment
                log.exception("could not record the end of an association from %s; will "
                              "retry", assoc.requestor.ae_title)
                with self._lock:
                    self._unrecorded_ends.append((name, released, series, refused))

    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling = event.assoc.requestor.ae_title
        received_uid = str(event.request.AffectedSOPInstanceUID)
        sop_uid = loggable_uid(received_uid)  # what log lines show
        sop_class = event.request.AffectedSOPClassUID
        if self.settings.allowed_callers and calling == self.settings.health_ae_title:
            log.warning("refused instance %s: %s is the health check's AE title, which may "
                        "only echo", sop_uid, calling)
            return _status(STATUS_NOT_AUTHORIZED, "calling AE title may not store")
        if sop_class not in PROCESSED_SOP_CLASSES:
            self.metrics.discarded.inc()
            log.info("discarded %s from %s: SOP class %s is not processed", sop_uid, calling,
                     getattr(sop_class, "name", sop_class))
            return 0x0000
        refusal = self._refuse_for_resources(event, sop_uid, calling)
        if refusal is not None:
            self._held_for_resend(event, calling, received_uid)
            return refusal
        data = _with_source_ae(event, calling)
        try:
            header = read_header(data, received_uid)
        except InvalidInstance as exc:
            self.metrics.rejected.labels(reason="invalid").inc()
            log.warning("refused instance %s from %s: %s", sop_uid, calling, exc.reason)
            self.spool.reject(data, exc.reason, calling, received_uid)
            return _status(exc.status, exc.reason)
        try:
            self._delivering(event.assoc, header.series_uid)
            stored = self.spool.store(header, data, calling)
        except (OSError, *STORE_ERRORS) as exc:  # disk full, write error, index unwritable
            self.metrics.rejected.labels(reason="out_of_resources").inc()
            log.error("could not store %s from %s: %s", sop_uid, calling, exc)
            with self._lock:
                self._refused.setdefault(id(event.assoc), set()).add(header.series_uid)
            detail = getattr(exc, "strerror", None) or str(exc)
            return _status(STATUS_OUT_OF_RESOURCES, f"out of resources: {detail}")
        if stored.is_new:
            self.metrics.received.labels(modality=header.modality or "unknown").inc()
            log.debug("stored %s (series %s) from %s", sop_uid, header.series_uid, calling)
        else:
            self.metrics.duplicates.inc()
            log.info("instance %s from %s already held; kept once", sop_uid, calling)
        return 0x0000

    def _held_for_resend(self, event: evt.Event, calling: str, sop_uid: str) -> None:
        """An instance refused for want of resources leaves its series short of it: the series
        is held at the association's end, as a broken-off transfer, until the sender sends it
        again (the header is read for its series only here, off the usual path)."""
        try:
            series_uid = read_header(_with_source_ae(event, calling), sop_uid).series_uid
        except InvalidInstance:
            return  # not an instance the node could have kept: nothing of it to wait for
        with self._lock:
            self._refused.setdefault(id(event.assoc), set()).add(series_uid)

    def heartbeat(self) -> None:
        """The listener's heartbeat. When it finds the listener was taken for dead (paused
        past listener_stale_after_s: its open associations were ended as interrupted), the
        associations still open here are registered again, so that their series count as
        being delivered once more and complete when the sender releases."""
        if self.associations.heartbeat():
            return
        with self._lock:
            open_now = [(name, set(series)) for name, series in self._active.values()]
        for name, series in open_now:
            for series_uid in series:
                self.associations.delivering(name, series_uid)
        if open_now:
            log.warning("this listener was taken for dead (no heartbeat for %g s); %d open "
                        "association(s) registered again", self.associations.stale_after_s,
                        len(open_now))

    def record_ended(self) -> None:
        """Write the association ends the database refused before (the heartbeat calls it)."""
        with self._lock:
            pending, self._unrecorded_ends = self._unrecorded_ends, []
        for i, (name, released, series, refused) in enumerate(pending):
            try:
                self.associations.ended(name, released, series, refused)
            except Exception:
                with self._lock:
                    self._unrecorded_ends.extend(pending[i:])
                raise

    def _delivering(self, assoc: Association, series_uid: str) -> None:
        """Before an association's first instance of a series is stored, record that it
        delivers to that series: from then on no worker closes the series while it is open."""
        with self._lock:
            name, series = self._active.setdefault(id(assoc), (uuid.uuid4().hex, set()))
            if series_uid in series:
                return
        self.associations.delivering(name, series_uid)
        with self._lock:
            series.add(series_uid)

    def _refuse_for_resources(self, event: evt.Event, sop_uid: str, calling: str) -> Dataset | None:
        """0xA700 for an instance over the size limit, or while the disk is below its mark."""
        with event.request.DataSet.getbuffer() as view:  # the size, without copying the bytes
            size = view.nbytes
        limit_mb = self.settings.storage.max_instance_mb
        if size > limit_mb * _MB:
            self.metrics.rejected.labels(reason="too_large").inc()
            log.warning("refused instance %s from %s: %.0f MB, above storage.max_instance_mb "
                        "(%.0f MB)", sop_uid, calling, size / _MB, limit_mb)
            return _status(STATUS_OUT_OF_RESOURCES,
                           f"instance {size / _MB:.0f} MB over the {limit_mb:.0f} MB limit")
        refusal = self._refusal()
        if refusal is not None:
            self.metrics.rejected.labels(reason="out_of_resources").inc()
            log.error("refused instance %s from %s: %s", sop_uid, calling, refusal)
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: disk below watermark")
        return None


def _with_source_ae(event: evt.Event, calling: str) -> bytes:
    """The instance in file format, with the sender's AE title in the file meta (0002,0016).

    The return address then travels with the file: start-up recovery re-indexes a spooled
    file under the AE title that sent it, and its results still go back there.
    """
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta),
                     event.encoded_dataset(include_meta=False)))
