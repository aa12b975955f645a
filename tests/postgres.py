"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, started with its own
data directory and port, reachable only over a Unix socket in that directory (trust auth),
stopped and removed at the end.

initdb and postgres refuse to run as root: as root, the server runs as the `postgres` user the
Debian package creates (or `nobody`), in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from tests.conftest import free_port


def postgres_bindir() -> Path | None:
    """The directory of initdb and pg_ctl: `pg_config --bindir`, else the newest Debian
    /usr/lib/postgresql/*/bin; None when PostgreSQL is not installed."""
    candidates = []
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               check=True).stdout.strip()
        candidates.append(Path(found))
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _server_user() -> str | None:
    """Who runs the server: this user, or a non-root one when this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


class PostgresServer:
    """`durable=False` (tests) turns fsync off; the ingest benchmark keeps it on."""

    def __init__(self, bindir: Path, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable
        self.user = _server_user()
        # not under pytest's tmp dir: as root that is mode 700, closed to the server's user;
        # short, because a Unix socket path has at most 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="covid-pg-"))
        self.data = self.root / "data"
        self.port = free_port()

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr[-2000:]}\n{tail}")

    def start(self) -> PostgresServer:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "-A", "trust", "--no-sync", "-E", "UTF8", "--locale", "C")
        # fsync off: a test server's durability is not under test, its speed is. Durable (the
        # benchmark): fsync on, commits not waited for, as the SQLite store's synchronous=NORMAL;
        # the spool's fsyncs and start-up recovery keep what was acknowledged
        safety = "-c synchronous_commit=off" if self.durable else (
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self.options = (f"-p {self.port} -k {self.root} -c listen_addresses='' {safety} "
                        "-c max_connections=200")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server on its existing data directory (after `halt`)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", self.options, "-w", "-t", "60", "start")

    def halt(self) -> None:
        """Stop the server as an administrator restarting it does (fast shutdown: every
        client's session is terminated), keeping its data for `resume`."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.root}&port={self.port}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                          "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
