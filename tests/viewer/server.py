"""OHIF's prebuilt dist/ and Orthanc's DICOMweb behind one origin, as a hospital's reverse
proxy would serve them: the browser then needs no CORS, and Orthanc builds its bulk data
URIs from the Host header the browser sent, so they point back at this server.

Standard library only; a test starts it on an ephemeral port in a thread and shuts it down.
"""

from __future__ import annotations

import http.client
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PROXIED = ("/dicom-web/", "/wado")
# hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}


class ViewerHandler(SimpleHTTPRequestHandler):
    """Static files from dist/, our app-config.js, unknown paths to index.html (OHIF routes
    such as /viewer?StudyInstanceUIDs=... are client-side), DICOMweb to Orthanc."""

    extensions_map = SimpleHTTPRequestHandler.extensions_map | {
        ".js": "application/javascript", ".mjs": "application/javascript",
        ".wasm": "application/wasm", ".json": "application/json",
    }

    def __init__(self, *args, dist: Path, app_config: Path, orthanc: tuple[str, int],
                 **kwargs) -> None:
        self.dist = dist
        self.app_config = app_config
        self.orthanc = orthanc
        super().__init__(*args, directory=str(dist), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path.startswith(PROXIED):
            self._proxy()
        elif path == "/app-config.js":
            self._send_file(self.app_config, "application/javascript")
        elif path != "/" and Path(self.translate_path(self.path)).is_file():
            super().do_GET()
        else:
            self._send_file(self.dist / "index.html", "text/html")

    def do_POST(self) -> None:  # noqa: N802
        self._proxy()

    def end_headers(self) -> None:
        # cross-origin isolation lets cornerstone use SharedArrayBuffer for volumes
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # hundreds of requests per study; failures show in the browser's console

    def _send_file(self, path: Path, content_type: str) -> None:
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.orthanc, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        except OSError as exc:
            self.send_error(502, f"Orthanc unreachable: {exc}")
            return
        finally:
            conn.close()
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ViewerServer:
    """The proxy on 127.0.0.1 and an ephemeral port, in a daemon thread."""

    def __init__(self, dist: Path, app_config: Path, orthanc_http_port: int) -> None:
        handler = partial(ViewerHandler, dist=dist, app_config=app_config,
                          orthanc=("127.0.0.1", orthanc_http_port))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="viewer-proxy",
                                        daemon=True)

    def start(self) -> ViewerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
