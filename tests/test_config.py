"""How the configuration is assembled: file, then COVID_PLUGIN_* variables, then flags.

Validation of single values lives beside the features (test_node_tls_config.py, test_roles.py);
these tests hold the merging and the reading of the environment that pydantic-settings does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_plugin.config import ConfigError, Settings, load_settings
from covid_plugin.worker.results import destinations_for


def test_a_nested_key_takes_file_then_environment_then_flags_and_keeps_its_siblings(
        tmp_path: Path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("[network]\nacse_timeout_s = 1\nidle_timeout_s = 1\ndimse_timeout_s = 1\n")
    env = {"COVID_PLUGIN_NETWORK__IDLE_TIMEOUT_S": "2",
           "COVID_PLUGIN_NETWORK__DIMSE_TIMEOUT_S": "2"}
    network = load_settings(cfg, {"network": {"dimse_timeout_s": 3}}, environ=env).network
    assert (network.acse_timeout_s, network.idle_timeout_s, network.dimse_timeout_s) == (1, 2, 3)
    assert network.max_associations == 32  # untouched by all three: the default


@pytest.mark.parametrize(("name", "key"), [
    ("COVID_PLUGIN_AE_TITEL", "ae_titel"),
    ("COVID_PLUGIN_TLS__ENABLD", "tls.enabld"),
    ("COVID_PLUGIN_PORT__NUMBER", "port__number"),  # port holds no keys
])
def test_an_unknown_name_under_the_prefix_stops_the_node_like_an_unknown_key_in_the_file(
        name: str, key: str):
    with pytest.raises(ConfigError, match=f"{key}: Extra inputs are not permitted"):
        load_settings(environ={name: "1"})


def test_values_from_the_environment_are_read_as_before():
    settings = load_settings(environ={
        "COVID_PLUGIN_HOST": "0.0.0.0",
        "COVID_PLUGIN_ALLOWED_CALLERS": '["PACS1", "PACS2"]',
        "COVID_PLUGIN_CHECK_CALLED_AE": "false",
        "COVID_PLUGIN_QUIET_PERIOD_S": "2.5",
        "COVID_PLUGIN_METRICS_PORT": "null",
        "COVID_PLUGIN_RETENTION__SPOOL_DAYS": "null",
        "COVID_PLUGIN_OUTBOX": '{"max_attempts": 4}',
        "COVID_PLUGIN_RETURN_ADDRESSES__PACS1__AE_TITLE": "PACS1",
        "COVID_PLUGIN_RETURN_ADDRESSES__PACS1__HOST": "pacs",
        "COVID_PLUGIN_RETURN_ADDRESSES__PACS1__PORT": "104",
    })
    assert settings.allowed_callers == ["PACS1", "PACS2"]
    assert (settings.check_called_ae, settings.quiet_period_s) == (False, 2.5)
    assert settings.metrics_port is None and settings.retention.spool_days is None
    assert settings.outbox.max_attempts == 4
    # the variable's name lost the case of PACS1; its studies still find their way back
    assert [peer.port for peer in destinations_for(settings, "PACS1")] == [104]
    assert destinations_for(settings, "PACS2") == []
    with pytest.raises(ConfigError, match="more than one return address for pacs1"):
        load_settings(overrides={"return_addresses": {
            "PACS1": {"ae_title": "A", "host": "h", "port": 104},
            "pacs1": {"ae_title": "B", "host": "h", "port": 105}}})
    with pytest.raises(ConfigError, match='"allowed_callers".* JSON'):
        load_settings(environ={"COVID_PLUGIN_ALLOWED_CALLERS": "PACS1"})


def test_the_process_environment_and_the_file_it_names_are_read(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"port": 1104, "ae_title": "FROM_FILE"}))
    monkeypatch.setenv("COVID_PLUGIN_CONFIG", str(cfg))
    monkeypatch.setenv("COVID_PLUGIN_PORT", "2104")
    settings = load_settings()
    assert (settings.ae_title, settings.port) == ("FROM_FILE", 2104)
    with pytest.raises(ConfigError, match="missing.toml: not a readable file"):
        load_settings(tmp_path / "missing.toml")


def test_settings_built_in_code_ignore_the_process_environment(monkeypatch: pytest.MonkeyPatch):
    """The demo and the tests build Settings(...) directly: a COVID_PLUGIN_DATABASE_URL in the
    shell must not send them to someone's PostgreSQL."""
    monkeypatch.setenv("COVID_PLUGIN_DATABASE_URL", "postgresql://db/covid")
    monkeypatch.setenv("COVID_PLUGIN_PORT", "2104")
    settings = Settings(quiet_period_s=0)
    assert (settings.database_url, settings.port, settings.quiet_period_s) == (None, 11112, 0)
