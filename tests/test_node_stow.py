"""DICOMweb out: results delivered by STOW-RS to Orthanc's DICOMweb plugin, through the same
outbox as C-STORE (retries with backoff while the server is down, dead letter, `retry`)."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from covid_plugin.config import ConfigError, DicomwebDestination, load_settings
from covid_plugin.node.stow import StowSender
from covid_plugin.store.outbox import OutboxItem
from tests.conftest import CHEST_CR, REPO, wait_for
from tests.reverse_proxy import reverse_proxy
from tests.test_node_ingest import index, send

FAST_OUTBOX = {"backoff_base_s": 0.3, "backoff_max_s": 1.0, "poll_interval_s": 0.2}


def outbox_rows(node) -> list[sqlite3.Row]:
    return index(node).execute(
        "SELECT sop_instance_uid, dest_url, state, attempts, last_error, next_attempt_at, "
        "updated_at FROM outbox ORDER BY id").fetchall()


def stored_uids(orthanc, headers: dict[str, str] | None = None) -> set[str]:
    """What the DICOMweb server holds, asked over QIDO-RS like any client would."""
    client = DICOMwebClient(orthanc.dicomweb_url, headers=headers)
    return {item["00080018"]["Value"][0] for item in client.search_for_instances()}


def dicomweb_node(node_factory, orthanc, max_attempts: int, **destination):
    return node_factory({
        "destinations": [{"kind": "dicomweb", "url": orthanc.dicomweb_url} | destination],
        "outbox": {"max_attempts": max_attempts} | FAST_OUTBOX,
    }).start()


def test_dicomweb_destination_in_toml(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[[destinations]]\nae_title = "PACS"\nhost = "pacs"\nport = 104\n\n'
                      '[[destinations]]\nkind = "dicomweb"\nurl = "https://vna/dicom-web/"\n'
                      'headers = { Authorization = "Bearer abc" }\nca_file = "/etc/ca.pem"\n')
    peer, web = load_settings(config, environ={}).destinations
    assert (peer.kind, peer.ae_title) == ("dicom", "PACS")
    assert (web.kind, web.url, web.verify_tls) == ("dicomweb", "https://vna/dicom-web", True)
    for bad, why in [('url = "ftp://vna"', "http:// or https://"),
                     ('url = "https://user:pw@vna/dicom-web"', "credentials")]:
        config.write_text(f'[[destinations]]\nkind = "dicomweb"\n{bad}\n')
        with pytest.raises(ConfigError, match=f"destinations.0.dicomweb.url: .*{why}"):
            load_settings(config, environ={})


@pytest.mark.data
def test_results_are_stored_by_stow_rs_beside_a_dicom_peer(node_factory, dicomweb_factory,
                                                           storescp_factory):
    orthanc = dicomweb_factory().start()
    pacs = storescp_factory().start()
    node = node_factory({
        "destinations": [{"kind": "dicomweb", "url": orthanc.dicomweb_url},
                         {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "outbox": {"max_attempts": 3} | FAST_OUTBOX,
    }).start()
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: (rows := outbox_rows(node)) and len(rows) == 4
             and {r["state"] for r in rows} == {"sent"}, timeout=60, what="results sent")
    web = [r for r in outbox_rows(node) if r["dest_url"]]
    assert {r["dest_url"] for r in web} == {orthanc.dicomweb_url} and len(web) == 2
    assert stored_uids(orthanc) == {r["sop_instance_uid"] for r in web}
    assert len(pacs.files()) == 2  # the same results by C-STORE to the DICOM peer
    listing = node.cli("outbox", "--state", "sent").stdout
    assert listing.count(orthanc.dicomweb_url) == 2
    assert listing.count(f"{pacs.ae_title}@127.0.0.1:{pacs.port}") == 2


def test_a_large_batch_is_posted_in_chunks(dicomweb_factory):
    """dicomweb-client sends a body over 1 MB with chunked transfer encoding; Orthanc takes it.
    The 30 slices of the CT sample (7 MB) stand in for a large SEG."""
    orthanc = dicomweb_factory().start()
    files = sorted((REPO / "dicom_samples").glob("ct-covid_*/*.dcm"))
    assert sum(f.stat().st_size for f in files) > 2_000_000
    url = orthanc.dicomweb_url
    items = [OutboxItem(id=n, job_id=None, path=f, sop_instance_uid="", dest_ae="",
                        dest_host="127.0.0.1", dest_port=orthanc.http_port, state="pending",
                        attempts=0, next_attempt_at=0.0, last_error=None, dest_url=url)
             for n, f in enumerate(files)]
    sender = StowSender([DicomwebDestination(kind="dicomweb", url=url)])
    assert set(sender.deliver(items).values()) == {None}
    assert stored_uids(orthanc) == {str(pydicom.dcmread(f, stop_before_pixels=True)
                                        .SOPInstanceUID) for f in files}


@pytest.mark.data
def test_stow_server_down_retries_with_backoff_then_delivers(node_factory, dicomweb_factory):
    orthanc = dicomweb_factory()  # not started: the server is down
    node = dicomweb_node(node_factory, orthanc, max_attempts=50)
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: (rows := outbox_rows(node)) and all(r["attempts"] >= 2 for r in rows),
             timeout=60, what="two failed attempts")
    row = outbox_rows(node)[0]
    assert row["state"] == "pending" and "ConnectionError" in row["last_error"]
    assert row["next_attempt_at"] - row["updated_at"] >= 0.3  # backoff
    orthanc.start()
    wait_for(lambda: {r["state"] for r in outbox_rows(node)} == {"sent"}, timeout=60,
             what="delivery once the server is up")
    assert stored_uids(orthanc) == {r["sop_instance_uid"] for r in outbox_rows(node)}


@pytest.mark.data
def test_stow_dead_letter_then_retry_command_delivers(node_factory, dicomweb_factory):
    orthanc = dicomweb_factory()
    node = dicomweb_node(node_factory, orthanc, max_attempts=2)
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: (rows := outbox_rows(node)) and {r["state"] for r in rows} == {"dead"},
             timeout=60, what="dead letters")
    orthanc.start()
    wait_for(lambda: stored_uids(orthanc) == set(), timeout=5, what="an empty server")
    result = node.cli("retry", "--all")
    assert result.returncode == 0 and "2 dead item(s) queued again" in result.stdout
    wait_for(lambda: {r["state"] for r in outbox_rows(node)} == {"sent"}, timeout=60,
             what="delivery after retry")
    assert stored_uids(orthanc) == {r["sop_instance_uid"] for r in outbox_rows(node)}


@pytest.mark.data
def test_stow_authorization_header_is_sent_and_a_refusal_is_recorded(
        node_factory, dicomweb_factory):
    orthanc = dicomweb_factory({"AuthenticationEnabled": True,
                                "RegisteredUsers": {"node": "right-secret"}}).start()

    def basic(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"node:{password}".encode()).decode()}

    node = dicomweb_node(node_factory, orthanc, max_attempts=1, headers=basic("wrong-secret"))
    assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
    wait_for(lambda: (rows := outbox_rows(node)) and {r["state"] for r in rows} == {"dead"},
             timeout=60, what="refused deliveries")
    assert all("HTTP 401" in r["last_error"] for r in outbox_rows(node))
    assert "wrong-secret" not in node.log() and "d3Jvbmct" not in node.log()
    node.stop()
    node.configure(destinations=[{"kind": "dicomweb", "url": orthanc.dicomweb_url,
                                  "headers": basic("right-secret")}])
    node.start()
    assert node.cli("retry", "--all").returncode == 0
    wait_for(lambda: {r["state"] for r in outbox_rows(node)} == {"sent"}, timeout=60,
             what="delivery with the right credentials")
    assert stored_uids(orthanc, basic("right-secret")) == {
        r["sop_instance_uid"] for r in outbox_rows(node)}


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (openssl): the server's PEM (key + certificate) and the
    certificate alone, which the node trusts as its CA bundle."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = folder / "server.pem"
    server.write_text(cert.read_text() + key.read_text())
    return server, cert


@pytest.mark.data
def test_stow_over_https_checks_the_server_certificate(node_factory, dicomweb_factory,
                                                       tmp_path):
    server_pem, ca = self_signed(tmp_path)
    orthanc = dicomweb_factory().start()
    front = reverse_proxy(orthanc.http_port, tls_pem=server_pem).start()
    try:
        url = f"{front.url}/dicom-web"
        node = node_factory({"destinations": [{"kind": "dicomweb", "url": url}],  # system CAs
                             "outbox": {"max_attempts": 1} | FAST_OUTBOX}).start()
        assert send(node.port, [pydicom.dcmread(CHEST_CR)]) == [0]
        wait_for(lambda: (rows := outbox_rows(node)) and {r["state"] for r in rows} == {"dead"},
                 timeout=60, what="deliveries refused for an untrusted certificate")
        assert all("SSLError" in r["last_error"] for r in outbox_rows(node))
        assert stored_uids(orthanc) == set()
        node.stop()
        node.configure(destinations=[{"kind": "dicomweb", "url": url, "ca_file": str(ca)}])
        node.start()
        assert node.cli("retry", "--all").returncode == 0
        wait_for(lambda: {r["state"] for r in outbox_rows(node)} == {"sent"}, timeout=60,
                 what="delivery once the CA is trusted")
        assert stored_uids(orthanc) == {r["sop_instance_uid"] for r in outbox_rows(node)}
    finally:
        front.stop()


def test_stow_reply_is_read_per_instance():
    """Which outbox items a STOW-RS reply (PS3.18 10.5.3) settles, and how."""
    def referenced(uid: str, failure: int | None = None) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPInstanceUID = uid
        if failure is not None:
            ds.FailureReason = failure
        return ds

    sent = {}
    for item_id, uid in enumerate(["1.1", "1.2", "1.3"]):
        sent[item_id] = Dataset()
        sent[item_id].SOPInstanceUID = uid
    reply = Dataset()
    reply.ReferencedSOPSequence = [referenced("1.1")]
    reply.FailedSOPSequence = [referenced("1.2", 0xA700)]
    url = "http://pacs/dicom-web"
    assert StowSender._outcomes(url, reply, sent, None) == {
        0: None, 1: f"{url} refused the instance (FailureReason 0xA700)",
        2: f"{url} did not confirm the instance"}
    assert StowSender._outcomes(url, reply, sent, "HTTP 409 Conflict")[2] == "HTTP 409 Conflict"
    # 200 without a body: stored; an HTTP error without a body: failed
    assert StowSender._outcomes(url, Dataset(), sent, None) == {0: None, 1: None, 2: None}
    assert set(StowSender._outcomes(url, Dataset(), sent, "HTTP 500").values()) == {"HTTP 500"}
