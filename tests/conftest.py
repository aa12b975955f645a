"""Shared fixtures: real data by path, ephemeral ports, real peers started and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("COVID_PLUGIN_DATA", REPO.parent / "shared" / "data"))
RIDER_CT = DATA / "dicom" / "tcia-rider-pilot_0117_chest-ct-nsclc"
CHEST_CR = DATA / "dicom" / "nema-wg04_RG1_chest-cr" / "RG1_J2KI.dcm"
# A clone on its own has no data set: the tests marked `data` are skipped with this one reason
# (and the rest still run), instead of each failing on a missing file of its own.
DATA_MISSING = None if DATA.is_dir() else (
    f"no data set at {DATA}: set COVID_PLUGIN_DATA to the folder that holds it "
    f"(default ../shared/data beside the repository)")


def pytest_report_collectionfinish(items: list[pytest.Item]) -> str | None:
    """Say once, before any test runs, that the data set is missing and what that skips."""
    if DATA_MISSING is None:
        return None
    needing = sum(item.get_closest_marker("data") is not None for item in items)
    return f"{DATA_MISSING}; the {needing} tests marked `data` are skipped"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a `data` test before its fixtures read the data set. The skip is raised here, in
    one place, so pytest's summary folds every such skip into one line."""
    if DATA_MISSING is not None and item.get_closest_marker("data") is not None:
        pytest.skip(DATA_MISSING)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(ext), "-out", str(d / f"{name}.pem"))
    return {p.stem + p.suffix: p for p in d.iterdir()}


def tls_client_context(pki: dict[str, Path], with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return ctx


def tls_node_config(pki: dict[str, Path]) -> dict:
    """A listener that requires TLS and a client certificate signed by the test CA."""
    return {"tls": {"enabled": True, "cert_file": str(pki["server.pem"]),
                    "key_file": str(pki["server.key"]), "ca_file": str(pki["ca.pem"])}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo(port: int, called: str = "COVID_PLUGIN", calling: str = "TESTSCU",
         ssl_context: ssl.SSLContext | None = None, bind_address: str = "",
         timeout: float = 5) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    tls_args = (ssl_context, "127.0.0.1") if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args,
                         bind_address=(bind_address, 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rider_files(n: int | None = None) -> list[Path]:
    files = sorted(RIDER_CT.glob("*.dcm"))
    return files[:n] if n else files


class NodeProcess:
    """`covid-plugin listen` (or `work`, `listen --no-jobs`) as a child process with its own
    config, stopped by PID."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str] | None = None,
                 command: tuple[str, ...] = ("listen",)) -> None:
        self.workdir = workdir
        self.command = command
        self.config = {"port": free_port(), "data_dir": str(workdir / "var"),
                       "quiet_period_s": 1.0, "log_level": "INFO"} | config
        self.port = self.config["port"]
        self.config_path = workdir / "node.json"
        self.configure()
        self.log_path = workdir / "node.log"
        self.env = os.environ | {"PYTHONPATH": str(REPO)} | (env or {})
        self.proc: subprocess.Popen | None = None

    def configure(self, **changes) -> None:
        self.config |= changes
        self.config_path.write_text(json.dumps(self.config))

    def start(self, preexec_fn=None, ready=None) -> NodeProcess:
        """Start and wait until `ready()` (default: a plain C-ECHO succeeds)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "covid_plugin.cli", *self.command, "--config",
             str(self.config_path)],  # the README's form
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        ready = ready or (lambda: echo(self.port, self.config.get("ae_title", "COVID_PLUGIN")))
        wait_for(lambda: self._alive_or_raise() and ready(), timeout=60, what="node ready")
        return self

    def _alive_or_raise(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log_path.read_text()[-3000:]}")
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "covid_plugin.cli", "--config", str(self.config_path), *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60,
        )

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    nodes: list[NodeProcess] = []

    def make(config: dict | None = None, env: dict[str, str] | None = None) -> NodeProcess:
        node = NodeProcess(tmp_path, {"pipelines": "tests.pipelines_for_tests:pipelines"}
                           | (config or {}), env)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


class StoreSCP:
    """DCMTK storescp as the PACS that receives our results."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS") -> None:
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.folder), "--accept-all",
             "-uf", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: echo(self.port, self.ae_title), timeout=20, what="storescp")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator:
    peers: list[StoreSCP] = []

    def make(port: int | None = None) -> StoreSCP:
        peer = StoreSCP(tmp_path / f"pacs{len(peers)}", port)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


class Orthanc:
    """Debian's Orthanc on ephemeral ports, its storage in a temporary folder."""

    def __init__(self, workdir: Path, node_port: int, node_aet: str = "COVID_PLUGIN",
                 extra: dict | None = None) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.ae_title = "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"covid": [node_aet, "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
            "StableAge": 1,
        } | (extra or {})))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=30, what="Orthanc HTTP")
        return self

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", timeout=1).ok
        except requests.ConnectionError:
            return False

    def upload(self, path: Path) -> dict:
        reply = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
        reply.raise_for_status()
        return reply.json()

    def get(self, route: str):
        reply = requests.get(f"{self.url}{route}", timeout=30)
        reply.raise_for_status()
        return reply.json()

    def post(self, route: str, body) -> dict:
        reply = requests.post(f"{self.url}{route}", json=body, timeout=600)
        reply.raise_for_status()
        return reply.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    peers: list[Orthanc] = []

    def make(node_port: int) -> Orthanc:
        peer = Orthanc(tmp_path / f"orthanc{len(peers)}", node_port)
        peers.append(peer)
        return peer.start()

    yield make
    for peer in peers:
        peer.stop()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class DicomwebOrthanc(Orthanc):
    """Orthanc with Debian's DICOMweb plugin (orthanc-dicomweb): QIDO/WADO/STOW-RS under
    /dicom-web/, with full metadata as OHIF asks for it."""

    def __init__(self, workdir: Path, node_port: int = 104, extra: dict | None = None) -> None:
        super().__init__(workdir, node_port, extra={
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        } | (extra or {}))
        self.dicomweb_url = f"{self.url}/dicom-web"

    def _up(self) -> bool:
        try:  # any answer will do: with authentication on, it is a 401
            requests.get(f"{self.url}/system", timeout=1)
            return True
        except requests.ConnectionError:
            return False


def dicomweb_missing() -> str | None:
    """Why a DICOMweb peer cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (apt-get install orthanc)"
    if not DICOMWEB_PLUGIN.exists():
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@pytest.fixture
def dicomweb_factory(tmp_path: Path) -> Iterator:
    """DICOMweb Orthancs, made stopped (a destination that is down) and started by the test."""
    if (reason := dicomweb_missing()) is not None:
        pytest.skip(reason)
    peers: list[DicomwebOrthanc] = []

    def make(extra: dict | None = None) -> DicomwebOrthanc:
        peer = DicomwebOrthanc(tmp_path / f"orthanc-dicomweb{len(peers)}", extra=extra)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/postgres.py); skipped, saying why, only
    where the Debian postgresql binaries are not installed."""
    from tests.postgres import PostgresServer, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; scripts/setup.sh "
                    "installs it)")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The URL of a fresh, empty database of its own for this test, dropped after it."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path):
    """The store on each backend: an SQLite file, then a PostgreSQL database."""
    from covid_plugin.store.db import open_database

    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    database = open_database(url, tmp_path / "db.sqlite")
    yield database
    database.close()
