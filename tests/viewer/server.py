"""OHIF's prebuilt dist/ and Orthanc's DICOMweb behind one origin, as a hospital's reverse
proxy would serve them: the browser then needs no CORS, and Orthanc builds its bulk data
URIs from the Host header the browser sent, so they point back at this server.
"""

from __future__ import annotations

from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from tests.reverse_proxy import Server, forward

PROXIED = ("/dicom-web/", "/wado")


class ViewerHandler(SimpleHTTPRequestHandler):
    """Static files from dist/, our app-config.js, unknown paths to index.html (OHIF routes
    such as /viewer?StudyInstanceUIDs=... are client-side), DICOMweb to Orthanc."""

    extensions_map = SimpleHTTPRequestHandler.extensions_map | {
        ".js": "application/javascript", ".mjs": "application/javascript",
        ".wasm": "application/wasm", ".json": "application/json",
    }
    dist: Path
    app_config: Path
    orthanc: tuple[str, int]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, directory=str(self.dist), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path.startswith(PROXIED):
            forward(self, self.orthanc)
        elif path == "/app-config.js":
            self._send_file(self.app_config, "application/javascript")
        elif path != "/" and Path(self.translate_path(self.path)).is_file():
            super().do_GET()
        else:
            self._send_file(self.dist / "index.html", "text/html")

    def do_POST(self) -> None:  # noqa: N802
        forward(self, self.orthanc)

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


def viewer_server(dist: Path, app_config: Path, orthanc_http_port: int) -> Server:
    """OHIF from `dist` with `app_config`, Orthanc's DICOMweb on the same origin."""
    handler = type("Viewer", (ViewerHandler,), {
        "dist": dist, "app_config": app_config, "orthanc": ("127.0.0.1", orthanc_http_port)})
    return Server(handler)
