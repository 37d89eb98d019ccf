"""Settings precedence: flags > environment > TOML file > defaults; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from wiregate.errors import ConfigError
from wiregate.settings import AgentSettings, GatewaySettings, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREGATE_LISTEN", raising=False)
    s = load_settings(GatewaySettings, None)
    assert s.listen == "127.0.0.1:8080"
    assert s.effective_database_url().startswith("sqlite+aiosqlite:///")


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(
        '[gateway]\nlisten = "10.0.0.1:1"\nmetrics_listen = "10.0.0.1:2"\n'
        'ipv4_pool = "100.70.0.0/16"\n'
    )
    s = load_settings(GatewaySettings, cfg)
    assert (s.listen, s.metrics_listen, s.ipv4_pool) == (
        "10.0.0.1:1",
        "10.0.0.1:2",
        "100.70.0.0/16",
    )
    monkeypatch.setenv("WIREGATE_LISTEN", "10.0.0.2:1")
    s = load_settings(GatewaySettings, cfg)
    assert (s.listen, s.metrics_listen) == ("10.0.0.2:1", "10.0.0.1:2")
    s = load_settings(GatewaySettings, cfg, listen="10.0.0.3:1", metrics_listen=None)
    assert (s.listen, s.metrics_listen) == ("10.0.0.3:1", "10.0.0.1:2")


def test_agent_table_is_separate(tmp_path: Path) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text('[gateway]\nlisten = "x"\n[agent]\ninterface = "wg7"\nlisten_port = 5000\n')
    s = load_settings(AgentSettings, cfg)
    assert (s.interface, s.listen_port) == ("wg7", 5000)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('[gateway]\nipv4_pool = "fd00::/64"\n', "ipv4_pool"),
        ('[gateway]\nipv4_pool = "100.64.0.1/16"\n', "ipv4_pool"),
        ("[gateway]\nno_such_setting = 1\n", "no_such_setting"),
        ("[gateway\n", "not valid TOML"),
        ("gateway = 3\n", "must be a table"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_settings(GatewaySettings, cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(GatewaySettings, tmp_path / "absent.toml")


def test_bad_port_flag() -> None:
    with pytest.raises(ConfigError, match="listen_port"):
        load_settings(AgentSettings, None, listen_port=70000)


AUTH_KEY_RULE = (
    "auth_key must be file:PATH or env:VAR (a literal key leaks into process listings and files)"
)


@pytest.mark.parametrize("literal", ["wgk_" + "x" * 40, "file:", "env:", "path:/k"])
def test_agent_refuses_a_literal_auth_key_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, literal: str
) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(f'[agent]\nauth_key = "{literal}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(AgentSettings, cfg)
    assert caught.value.message == f"invalid configuration: auth_key: {AUTH_KEY_RULE}"
    monkeypatch.setenv("WIREGATE_AUTH_KEY", literal)
    with pytest.raises(ConfigError) as caught:
        load_settings(AgentSettings, None)
    assert caught.value.message == f"invalid configuration: auth_key: {AUTH_KEY_RULE}"


def test_agent_accepts_auth_key_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREGATE_AUTH_KEY", "env:ENROLL_KEY")
    assert load_settings(AgentSettings, None).auth_key == "env:ENROLL_KEY"
    monkeypatch.setenv("WIREGATE_AUTH_KEY", "file:/etc/wiregate/auth-key")
    assert load_settings(AgentSettings, None).auth_key == "file:/etc/wiregate/auth-key"
    monkeypatch.delenv("WIREGATE_AUTH_KEY")
    assert load_settings(AgentSettings, None).auth_key == ""


@pytest.mark.parametrize("literal", ["eyJhbGciOiJSUzI1NiJ9.e30.sig", "env:TOKEN", "file:"])
def test_agent_refuses_a_workload_token_that_is_not_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, literal: str
) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(f'[agent]\nworkload_token = "{literal}"\n')
    rule = r"^invalid configuration: workload_token: workload_token must be file:PATH"
    with pytest.raises(ConfigError, match=rule):
        load_settings(AgentSettings, cfg)
    monkeypatch.setenv("WIREGATE_WORKLOAD_TOKEN", literal)
    with pytest.raises(ConfigError, match="workload_token must be file:PATH"):
        load_settings(AgentSettings, None)
    monkeypatch.setenv("WIREGATE_WORKLOAD_TOKEN", "file:/var/run/token")
    assert load_settings(AgentSettings, None).workload_token == "file:/var/run/token"


SSO_AND_WORKLOAD = """[gateway]
public_url = "https://gw.example.com"
[[gateway.oidc]]
name = "corp"
issuer = "https://idp.example.com"
client_id = "{client_id}"
client_secret = "env:OIDC_SECRET"
[[gateway.workload_issuers]]
name = "ci"
issuer = "https://idp.example.com{slash}"
{audience}
"""


@pytest.mark.parametrize(
    ("client_id", "audience", "slash"),
    [
        ("wiregate", 'audience = "wiregate"', ""),
        ("wiregate", 'audience = "wiregate"', "/"),
        ("https://gw.example.com", "", ""),  # the default audience is public_url
    ],
)
def test_gateway_refuses_a_workload_audience_equal_to_an_sso_client_id(
    tmp_path: Path, client_id: str, audience: str, slash: str
) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(SSO_AND_WORKLOAD.format(client_id=client_id, audience=audience, slash=slash))
    with pytest.raises(ConfigError) as caught:
        load_settings(GatewaySettings, cfg)
    message = caught.value.message
    assert "\n" not in message
    assert "workload_issuers 'ci'" in message and "oidc 'corp'" in message
    assert f"the audience {client_id!r}" in message


def test_gateway_accepts_distinct_sso_and_workload_audiences(tmp_path: Path) -> None:
    cfg = tmp_path / "wiregate.toml"
    text = SSO_AND_WORKLOAD.format(client_id="wiregate-web", audience='audience = "wg"', slash="")
    cfg.write_text(text)
    settings = load_settings(GatewaySettings, cfg)
    assert settings.workload_issuers[0].audience == "wg"
    other = text.replace('"https://idp.example.com"', '"https://sso.example"', 1)
    cfg.write_text(other.replace('audience = "wg"', 'audience = "wiregate-web"'))
    assert load_settings(GatewaySettings, cfg).oidc[0].issuer == "https://sso.example"
