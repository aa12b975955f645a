"""The listening socket: bounded TLS handshakes, per-peer limits and refusals before ACSE.

pynetdicom's server does the TLS handshake in its accept loop, without a timeout: one client
that connects and sends nothing blocks every later connection. Here the accept loop only
counts and hands over; the handshake runs on the connection's own thread under a timeout.
A peer address may hold only `max_associations_per_peer` connections, so that one client
cannot take every slot. A connection is held here, where it can be evicted, until it has
finished TLS and sent the first bytes of its association request: when the address is at its
limit, a new connection closes the oldest such one (a silent socket) rather than being turned
away, so idle sockets cannot lock out a real caller from the same address. Only when every
connection of the address is past that point are connections past the limit closed at once.
When the node must not take data (disk below its watermark), an association request is
answered with A-ASSOCIATE-RJ (transient, local limit exceeded): a PACS retries later.
"""

from __future__ import annotations

import logging
import select
import socket
import socketserver
import ssl
import struct
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import ThreadedAssociationServer

from covid_plugin.config import NetworkSettings

log = logging.getLogger(__name__)

_PDU_ASSOCIATE_RQ = 0x01
_MAX_RQ_LENGTH = 1 << 20  # an A-ASSOCIATE-RQ is a few kB; anything bigger is not one


def _associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ encoded by pynetdicom's own PDU classes."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


# transient, service provider (presentation related), local limit exceeded: "try again later"
REJECT_LOCAL_LIMIT = _associate_rj(0x02, 0x03, 0x02)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with bounded handshakes and per-peer limits.

    `refusal()` returns why the node cannot take data now (or None); it is asked once per
    connection, after TLS and before pynetdicom sees the association request.
    """

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list,
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list | None = None,
                 *, limits: NetworkSettings, refusal: Callable[[], str | None],
                 on_refused: Callable[[str], None] | None = None) -> None:
        # the handshake happens in finish_request, on the connection's thread, not in
        # pynetdicom's get_request on the accept loop: the parent gets no context
        self.tls_context = ssl_context
        self.limits = limits
        self.refusal = refusal
        self.on_refused = on_refused or (lambda reason: None)
        self._guard = threading.Lock()
        # connections accepted and not yet handed to pynetdicom: address -> client ports
        self._pending: defaultdict[str, set[int]] = defaultdict(set)
        # of those, the ones still in TLS or silent, oldest first: address -> port -> socket
        self._evictable: defaultdict[str, dict[int, socket.socket]] = defaultdict(dict)
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers)

    # socketserver's listen() backlog is 5: a burst of PACS connections beyond that waits
    # for SYN retries (a second or more) while the accept loop is busy
    request_queue_size = 128

    def server_bind(self) -> None:
        """With `reuse_port`, several listener processes on this machine bind the same port
        and the kernel spreads new connections over them (SO_REUSEPORT): two listeners behind
        one address without a balancer. pynetdicom's own bind then sets SO_REUSEADDR."""
        if self.limits.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def connections_from(self, host: str) -> int:
        """Connections this address holds: in handshake, plus live associations (by client
        port, so that one being handed over is not counted twice)."""
        live = {a.requestor.port for a in self.active_associations if a.requestor.address == host}
        return len(self._pending.get(host, set()) | live)

    # --- accept loop (one thread): count and hand over, never block ---

    def process_request(self, request: Any, client_address: Any) -> None:
        host, port = client_address[0], client_address[1]
        evicted: socket.socket | None = None
        with self._guard:
            held = self.connections_from(host)
            refused = False
            if held >= self.limits.max_associations_per_peer:
                evicted = self._take_oldest_evictable(host)
                refused = evicted is None
            if not refused:
                self._pending[host].add(port)
                self._evictable[host][port] = request
        if evicted is not None:
            log.warning("connection from %s closed to make room: it had not finished TLS and "
                        "its association request (network.max_associations_per_peer)", host)
            self.on_refused("evicted")
            try:  # its own thread then closes it. The plain socket's shutdown even for a
                # TLS one: SSLSocket.shutdown drops the SSL object another thread may be using
                socket.socket.shutdown(evicted, socket.SHUT_RDWR)
            except OSError:
                pass  # it closed meanwhile
        if refused:
            log.warning("connection from %s closed: it already holds %d connections "
                        "(network.max_associations_per_peer)", host, held)
            self.on_refused("peer_limit")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _take_oldest_evictable(self, host: str) -> socket.socket | None:
        """Under the guard: forget and return the oldest connection of `host` that has not
        finished TLS and begun its association request, if any."""
        waiting = self._evictable.get(host)
        if not waiting:
            return None
        port, sock = next(iter(waiting.items()))
        del waiting[port]
        self._pending[host].discard(port)
        return sock

    def _still_evictable(self, host: str, port: int) -> bool:
        with self._guard:
            return port in self._evictable.get(host, {})

    # --- the connection's own thread ---

    def finish_request(self, request: Any, client_address: Any) -> None:
        host, port = client_address[0], client_address[1]
        try:
            if self.tls_context is not None:
                request = self._handshake(request, host, port)
                if request is None:
                    return
            if not self._association_requested(request, host, port):
                return
            reason = self.refusal()
            if reason is not None:
                self._reject(request, host, reason)
                return
            super().finish_request(request, client_address)
        finally:
            with self._guard:
                self._pending[host].discard(port)
                self._evictable[host].pop(port, None)
                if not self._pending[host]:
                    del self._pending[host]
                if not self._evictable[host]:
                    del self._evictable[host]

    def _association_requested(self, request: socket.socket, host: str, port: int) -> bool:
        """Wait (up to acse_timeout_s) for the first bytes of the association request, then
        the connection is no longer evictable; False (closed) when it sent nothing or was
        evicted meanwhile."""
        pending = isinstance(request, ssl.SSLSocket) and request.pending()
        sent = pending or bool(select.select([request], [], [], self.limits.acse_timeout_s)[0])
        with self._guard:
            evicted = port not in self._evictable.get(host, {})
            self._evictable[host].pop(port, None)
        if sent and not evicted:
            return True
        if not evicted:
            log.warning("connection from %s closed: no association request within %.0f s "
                        "(network.acse_timeout_s)", host, self.limits.acse_timeout_s)
            self.on_refused("acse_timeout")
        request.close()
        return False

    def _handshake(self, request: socket.socket, host: str, port: int) -> ssl.SSLSocket | None:
        assert self.tls_context is not None
        request.settimeout(self.limits.tls_handshake_timeout_s)
        with self._guard:  # from here eviction shuts the TLS socket down
            if port not in self._evictable.get(host, {}):
                request.close()
                return None
            wrapped = self.tls_context.wrap_socket(request, server_side=True,
                                                   do_handshake_on_connect=False)
            self._evictable[host][port] = wrapped
        try:
            wrapped.do_handshake()
        except (OSError, ValueError) as exc:
            if not self._still_evictable(host, port):
                wrapped.close()  # evicted: said when it was
                return None
            self._handshake_failed(wrapped, host, exc)
            return None
        wrapped.settimeout(None)  # pynetdicom's socket layer expects a blocking socket
        return wrapped

    def _handshake_failed(self, request: socket.socket, host: str, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            log.warning("TLS handshake with %s timed out after %.0f s "
                        "(network.tls_handshake_timeout_s); connection closed", host,
                        self.limits.tls_handshake_timeout_s)
            self.on_refused("tls_timeout")
        else:  # ssl.SSLError is an OSError
            log.warning("TLS handshake with %s failed: %s", host, exc)
            self.on_refused("tls_failed")
        request.close()

    def _reject(self, request: socket.socket, host: str, reason: str) -> None:
        """Read the association request, answer A-ASSOCIATE-RJ, close."""
        log.warning("association from %s refused (A-ASSOCIATE-RJ, transient, local limit "
                    "exceeded): %s", host, reason)
        self.on_refused("disk")
        request.settimeout(self.limits.acse_timeout_s)
        try:
            header = _recv_exactly(request, 6)
            pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
            if pdu_type == _PDU_ASSOCIATE_RQ and length <= _MAX_RQ_LENGTH:
                _recv_exactly(request, length)
                request.sendall(REJECT_LOCAL_LIMIT)
                while request.recv(4096):  # let the requestor close first (PS3.8 9.1.4)
                    pass
        except OSError:  # the peer went away or timed out: nothing more to tell it
            pass
        finally:
            request.close()

    def shutdown(self) -> None:
        """Stop serving and close; the server was made with `make_server`, so the AE does not
        list it among the servers `AE.shutdown` knows."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def serve(server: GuardedAssociationServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
    thread.start()
    return thread
