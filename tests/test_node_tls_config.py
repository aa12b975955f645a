"""TLS on the listener, and the configuration's validation."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from covid_plugin.config import ConfigError, load_settings


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


def _echo(port: int, ssl_context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = (ssl_context, "127.0.0.1") if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="COVID_PLUGIN", tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = getattr(assoc.send_c_echo(), "Status", None) == 0
    assoc.release()
    return ok


def _client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return ctx


def test_tls_association_works_and_plain_one_is_refused(node_factory, pki):
    node = node_factory({"tls": {"enabled": True, "cert_file": str(pki["server.pem"]),
                                 "key_file": str(pki["server.key"]),
                                 "ca_file": str(pki["ca.pem"])}})
    node.start(ready=lambda: _echo(node.port, _client_context(pki, with_cert=True)))
    assert not _echo(node.port, None)  # plain TCP
    assert not _echo(node.port, _client_context(pki, with_cert=False))  # no client certificate
    assert _echo(node.port, _client_context(pki, with_cert=True))  # and the node is still up


def test_config_errors_name_the_bad_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('port = "eleven"\n[outbox]\nmax_attempts = 0\n')
    with pytest.raises(ConfigError) as err:
        load_settings(bad, environ={})
    assert "port:" in str(err.value) and "outbox.max_attempts:" in str(err.value)
    with pytest.raises(ConfigError, match="ae_titel: Extra inputs are not permitted"):
        load_settings(environ={"COVID_PLUGIN_AE_TITEL": "X"})


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
