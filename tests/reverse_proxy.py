"""A small reverse proxy in front of a test peer, as hospitals put one in front of a PACS.

Two uses: the viewer test serves OHIF and Orthanc's DICOMweb from one origin
(tests/viewer/server.py), and the STOW-RS test puts TLS in front of Orthanc, whose Debian
build cannot serve HTTPS itself. Standard library only, on 127.0.0.1 and an ephemeral port.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}


def read_body(handler: BaseHTTPRequestHandler) -> bytes | None:
    """The request body, plain or chunked (dicomweb-client chunks large STOW-RS posts)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return bytes(body)
            body += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else None


def forward(handler: BaseHTTPRequestHandler, upstream: tuple[str, int]) -> None:
    """Send the handler's request to the upstream HTTP server and its answer back.

    The Host header goes through unchanged, so that Orthanc builds the URLs it returns
    (bulk data URIs) from the address the client used.
    """
    body = read_body(handler)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
    if body is not None:
        headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection(*upstream, timeout=120)
    try:
        conn.request(handler.command, handler.path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
    except OSError as exc:
        handler.send_error(502, f"upstream unreachable: {exc}")
        return
    finally:
        conn.close()
    handler.send_response(reply.status, reply.reason)
    for key, value in reply.getheaders():
        if key.lower() not in HOP_BY_HOP | {"content-length"}:
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _ForwardAll(BaseHTTPRequestHandler):
    upstream: tuple[str, int]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        forward(self, self.upstream)

    do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 and an ephemeral port, in a daemon thread."""

    def __init__(self, handler, tls_pem: Path | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls_pem is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_pem)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="test-proxy",
                                        daemon=True)

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


def reverse_proxy(upstream_port: int, tls_pem: Path | None = None) -> Server:
    """Everything to http://127.0.0.1:upstream_port; HTTPS when a PEM (key + chain) is given."""
    handler = type("ForwardAll", (_ForwardAll,), {"upstream": ("127.0.0.1", upstream_port)})
    return Server(handler, tls_pem)
