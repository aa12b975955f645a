"""TLS on the listener, and the configuration's validation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from covid_plugin.config import ConfigError, load_settings
from tests.conftest import (
    REPO,
    echo,
    free_port,
    rider_files,
    tls_client_context,
    tls_node_config,
    wait_for,
)


def test_tls_association_works_and_plain_one_is_refused(node_factory, pki):
    node = node_factory(tls_node_config(pki))
    node.start(ready=lambda: echo(node.port, ssl_context=tls_client_context(pki)))
    assert not echo(node.port)  # plain TCP
    assert not echo(node.port, ssl_context=tls_client_context(pki, with_cert=False))
    assert echo(node.port, ssl_context=tls_client_context(pki))  # and the node is still up


def test_config_errors_name_the_bad_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('port = "eleven"\n[outbox]\nmax_attempts = 0\n')
    with pytest.raises(ConfigError) as err:
        load_settings(bad, environ={})
    assert "port:" in str(err.value) and "outbox.max_attempts:" in str(err.value)
    with pytest.raises(ConfigError, match="ae_titel: Extra inputs are not permitted"):
        load_settings(environ={"COVID_PLUGIN_AE_TITEL": "X"})


def test_the_data_set_location_is_not_read_as_a_setting():
    """COVID_PLUGIN_DATA points the tests at the shared data; a node started by those tests
    inherits it and must not stop with 'data: Extra inputs are not permitted'."""
    assert load_settings(environ={"COVID_PLUGIN_DATA": "/elsewhere"}).port == 11112


def test_config_precedence_file_then_environment_then_flags(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('ae_title = "FROM_FILE"\nport = 1104\nquiet_period_s = 5\n')
    env = {"COVID_PLUGIN_PORT": "2104", "COVID_PLUGIN_SELECTION__MIN_CT_SLICES": "40"}
    settings = load_settings(cfg, overrides={"port": 3104}, environ=env)
    assert (settings.ae_title, settings.port, settings.quiet_period_s) == ("FROM_FILE", 3104, 5)
    assert settings.selection.min_ct_slices == 40
    assert load_settings(cfg, environ=env).port == 2104


def test_cli_reports_bad_config_and_exits_2(tmp_path: Path):
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "covid_plugin.cli", "listen", "--port",
                             "70000"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port: Input should be less than or equal to 65535" in result.stderr


def test_node_refuses_to_start_with_weights_that_do_not_match_their_spec(tmp_path: Path):
    import json
    import shutil
    import sys

    from tests.conftest import REPO

    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models)
    spec_path = models / "ct-lesion" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["weights_sha256"] = "0" * 64
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, "-m", "covid_plugin.cli", "listen", "--port", "0", "--data-dir",
         str(tmp_path / "var")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"COVID_PLUGIN_MODELS_DIR": str(models), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "does not match spec.json" in result.stderr and "refusing to load" in result.stderr


def test_a_silent_connection_does_not_block_a_tls_node(node_factory, pki):
    """A socket that connects and sends nothing used to hold pynetdicom's accept loop in the
    TLS handshake: no other association got through while it stayed open. Default settings."""
    node = node_factory(tls_node_config(pki))
    node.start(ready=lambda: echo(node.port, ssl_context=tls_client_context(pki)))
    silent = socket.create_connection(("127.0.0.1", node.port))
    try:
        time.sleep(0.5)  # the node has accepted it and is waiting for a ClientHello
        started = time.monotonic()
        assert echo(node.port, ssl_context=tls_client_context(pki))
        assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_a_silent_tls_connection_is_closed_after_the_handshake_timeout(node_factory, pki):
    node = node_factory(tls_node_config(pki) | {"network": {"tls_handshake_timeout_s": 1}})
    node.start(ready=lambda: echo(node.port, ssl_context=tls_client_context(pki)))
    silent = socket.create_connection(("127.0.0.1", node.port))
    try:
        silent.settimeout(5)
        assert silent.recv(1) == b""
    finally:
        silent.close()
    wait_for(lambda: "TLS handshake with 127.0.0.1 timed out" in node.log(), timeout=5,
             what="the handshake timeout logged")


@pytest.mark.data
def test_health_echoes_over_tls_past_the_allow_list(node_factory, pki):
    """`covid-plugin health` used to echo in plain text as an AE not on the list."""
    node = node_factory(tls_node_config(pki) | {"allowed_callers": ["PACS1"]})
    node.start(ready=lambda: echo(node.port, calling="PACS1",
                                  ssl_context=tls_client_context(pki)))
    result = node.cli("health")
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["echo"] is True and report["tls"] is True
    # the health check's AE title may echo, never store
    ds = pydicom.dcmread(rider_files(1)[0])
    from pynetdicom import AE

    ae = AE(ae_title="COVID_HEALTH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COVID_PLUGIN",
                         tls_args=(tls_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0124
    assoc.release()


def _tls_storescp(folder: Path, pki: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    """DCMTK storescp over TLS, requiring a client certificate signed by the test CA."""
    port = free_port()
    folder.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(folder), "+tls", str(pki["server.key"]),
         str(pki["server.pem"]), "+cf", str(pki["ca.pem"]), "--require-peer-cert", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: echo(port, "PACS", ssl_context=tls_client_context(pki)), timeout=20,
             what="storescp over TLS")
    return proc, port


@pytest.mark.data
def test_results_go_to_a_tls_destination_with_a_client_certificate(node_factory, pki, tmp_path):
    received = tmp_path / "received"
    pacs, port = _tls_storescp(received, pki)
    try:
        node = node_factory({"selection": {"min_ct_slices": 2}, "destinations": [{
            "ae_title": "PACS", "host": "127.0.0.1", "port": port,
            "tls": {"ca_file": str(pki["ca.pem"]), "cert_file": str(pki["client.pem"]),
                    "key_file": str(pki["client.key"])}}]}).start()
        files = rider_files(3)
        sent = subprocess.run(["storescu", "-aet", "CT", "-aec", "COVID_PLUGIN", "127.0.0.1",
                               str(node.port), *map(str, files)], capture_output=True)
        assert sent.returncode == 0
        got = wait_for(lambda: list(received.iterdir()), timeout=30, what="results over TLS")
        modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in got}
        assert "SR" in modalities
        assert "dead" not in node.cli("outbox").stdout
    finally:
        pacs.terminate()
        pacs.wait(10)


def test_settings_that_used_to_crash_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="log_level: Input should be 'DEBUG'"):
        load_settings(environ={"COVID_PLUGIN_LOG_LEVEL": "LOUD"})
    assert load_settings(environ={"COVID_PLUGIN_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="tls: Value error, enabled = true needs cert_file"):
        load_settings(environ={"COVID_PLUGIN_TLS__ENABLED": "true"})
    with pytest.raises(ConfigError, match="tls: Value error, cert_file .* not a readable file"):
        load_settings(overrides={"tls": {"enabled": True, "cert_file": str(tmp_path / "x.pem"),
                                         "key_file": str(tmp_path / "x.key")}}, environ={})
    with pytest.raises(ConfigError, match="pipelines: String should match pattern"):
        load_settings(environ={"COVID_PLUGIN_PIPELINES": "not a path"})
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        load_settings(overrides={"destinations": [{"ae_title": "P", "host": "h", "port": 104,
                                                   "tls": {"cert_file": str(tmp_path)}}]},
                      environ={})


def test_listening_beyond_loopback_needs_a_caller_list_or_an_explicit_choice():
    with pytest.raises(ConfigError, match="allowed_callers is empty"):
        load_settings(overrides={"host": "0.0.0.0"}, environ={})
    assert load_settings(overrides={"host": "0.0.0.0", "allowed_callers": ["PACS1"]},
                         environ={}).allowed_callers == ["PACS1"]
    assert load_settings(overrides={"host": "0.0.0.0", "accept_any_caller": True}, environ={})
    assert load_settings(environ={}).host == "127.0.0.1"


@pytest.mark.parametrize("config, message", [
    ({"log_level": "LOUD"}, "log_level: Input should be"),
    ({"pipelines": "no_such_module:pipelines"}, "no module named 'no_such_module'"),
    ({"pipelines": "tests.pipelines_for_tests:nothing"}, "has no 'nothing'"),
])
def test_cli_reports_bad_settings_without_a_traceback(tmp_path: Path, config, message):
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"port": 0, "data_dir": str(tmp_path / "var")} | config))
    result = subprocess.run([sys.executable, "-m", "covid_plugin.cli", "listen", "--config",
                             str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
