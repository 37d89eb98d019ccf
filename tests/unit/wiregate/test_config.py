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
