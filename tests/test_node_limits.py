"""What one client, one disk or one second node can take from the listener, and no more."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import REPO, echo, free_port, rider_files
from tests.test_node_ingest import index, send


def _silent(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_connection_that_never_asks_is_closed_after_the_acse_timeout(node_factory):
    node = node_factory({"network": {"acse_timeout_s": 1}}).start()
    sock = _silent(node.port)
    try:
        assert _closed_by_peer(sock, within_s=5)
    finally:
        sock.close()


def test_one_peer_cannot_take_every_association_slot(node_factory):
    """20 idle connections from one address (127.0.0.2) used to fill all 16 slots; with the
    default limits (32 in all, 16 per address) they fill only that address's share, and a
    silent one gives way to a new connection: the oldest four are closed."""
    node = node_factory().start()
    hogs = [_silent(node.port, "127.0.0.2") for _ in range(20)]
    try:
        time.sleep(1)
        assert echo(node.port)  # from 127.0.0.1: still a slot
        closed = [_closed_by_peer(sock, within_s=0.2) for sock in hogs]
        assert closed == [True] * 4 + [False] * 16  # the share is 16 connections
        # a real caller from that address takes the place of its oldest silent socket
        assert echo(node.port, bind_address="127.0.0.2")
    finally:
        for sock in hogs:
            sock.close()
    assert "closed to make room: it had not finished TLS" in node.log()


def test_below_the_free_space_watermark_associations_are_refused_with_the_reason(node_factory):
    node = node_factory({"storage": {"min_free_mb": 1e12}})  # more than any test disk has
    node.start(ready=lambda: "listening as" in node.log())
    result = subprocess.run(["echoscu", "-aet", "PACS1", "-aec", "COVID_PLUGIN", "127.0.0.1",
                             str(node.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Local Limit Exceeded" in result.stdout + result.stderr
    assert "refused (A-ASSOCIATE-RJ, transient, local limit exceeded)" in node.log()
    assert "below storage.min_free_percent 10% or storage.min_free_mb" in node.log()


@pytest.mark.data
def test_an_instance_over_the_size_limit_is_refused(node_factory):
    node = node_factory({"storage": {"max_instance_mb": 0.25}}).start()
    ct = pydicom.dcmread(rider_files(1)[0])  # 512 x 512 x 2 bytes: 0.5 MB
    assert send(node.port, [ct]) == [0xA700]
    assert echo(node.port)
    assert index(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    assert "above storage.max_instance_mb" in node.log()


def test_the_called_ae_title_is_checked(node_factory):
    node = node_factory().start()
    assert not echo(node.port, called="SOMEONE_ELSE")
    assert echo(node.port, called="COVID_PLUGIN")


@pytest.mark.data
def test_a_second_node_on_the_same_data_dir_exits_and_touches_nothing(node_factory, tmp_path):
    # the first node's own heartbeat (every heartbeat_s) must not write during the check
    slow_beat = {"heartbeat_s": 60, "listener_stale_after_s": 120, "job_lease_s": 120,
                 "outbox_lease_s": 120}
    first = node_factory({"quiet_period_s": 3600, "cluster": slow_beat}).start()
    assert send(first.port, [pydicom.dcmread(f) for f in rider_files(2)]) == [0, 0]
    data_dir = Path(first.config["data_dir"])

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in data_dir.rglob("*") if p.is_file()}

    before = snapshot()
    second_config = tmp_path / "second.json"
    second_config.write_text(first.config_path.read_text().replace(
        f'"port": {first.port}', f'"port": {free_port()}'))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "covid_plugin.cli", "listen", "--config",
                             str(second_config)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert "is in use by another node (pid" in result.stderr
    assert snapshot() == before
    assert echo(first.port)
