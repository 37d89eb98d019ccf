"""wiregate.tls and the TLS settings: contexts, refusals at start, reloads, one-line errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from lab.tls import LabCA, ServerPair
from wiregate.cli.main import main
from wiregate.errors import ConfigError
from wiregate.settings import AgentSettings, GatewaySettings, load_settings
from wiregate.tls import CertReloader, client_context, server_context, tls_failure, tls_refusal


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def pair(ca: LabCA, tmp_path: Path) -> ServerPair:
    return ca.issue(tmp_path, ["127.0.0.1", "gw.example"])


def test_lab_files_are_private(ca: LabCA, pair: ServerPair) -> None:
    for path in (ca.ca_file, pair.cert, pair.key):
        assert path.stat().st_mode & 0o777 == 0o600


def test_server_context_is_tls12_or_newer(pair: ServerPair) -> None:
    ctx = server_context(pair.cert, pair.key)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_unreadable_cert_is_refused(pair: ServerPair, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read tls_cert .*missing\.pem"):
        server_context(tmp_path / "missing.pem", pair.key)


def test_key_readable_by_others_is_refused(pair: ServerPair) -> None:
    pair.key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0640; chmod 600 it\)"):
        server_context(pair.cert, pair.key)


def test_mismatched_key_is_refused(ca: LabCA, pair: ServerPair, tmp_path: Path) -> None:
    other = ca.issue(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(ConfigError, match=r"does not match tls_cert") as caught:
        server_context(pair.cert, other.key)
    assert "\n" not in caught.value.message


def test_garbage_cert_is_refused(pair: ServerPair, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^cannot load tls_cert"):
        server_context(junk, pair.key)


def test_client_context_with_a_bad_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read ca_file"):
        client_context(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    with pytest.raises(ConfigError, match=r"^ca_file .* has no usable PEM CA"):
        client_context(junk)


def test_client_context_trusts_the_ca_and_checks_names(ca: LabCA) -> None:
    ctx = client_context(ca.ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert {"commonName": ca.name} in subjects


def test_reloader_loads_on_change_and_keeps_the_last_good_pair(
    ca: LabCA, pair: ServerPair, tmp_path: Path
) -> None:
    ctx = server_context(pair.cert, pair.key)
    reloader = CertReloader(ctx, pair.cert, pair.key, interval=1.0)
    assert not reloader.check()  # nothing changed
    ca.issue(tmp_path, ["127.0.0.1"])  # the same paths, a new pair
    assert reloader.check() and reloader.loads == 1
    pair.key.write_text("broken\n")
    assert not reloader.check()
    assert reloader.last_error.startswith("cannot load tls_cert")
    assert reloader.reload() is False  # SIGHUP with a broken pair: still the old one


def test_tls_failure_reads_verification_errors() -> None:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "self-signed certificate in certificate chain"
    wrapped = ConnectionError("connect failed")
    wrapped.__cause__ = err
    assert tls_failure(wrapped) == "self-signed certificate in certificate chain"
    assert tls_refusal("https://gw:443", wrapped) == (
        "TLS with https://gw:443 failed: self-signed certificate in certificate chain"
    )
    assert tls_failure(ConnectionRefusedError(111, "refused")) is None


# -- settings ------------------------------------------------------------------------


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(GatewaySettings, None, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(GatewaySettings, None, tls_key=tmp_path / "k.pem")


def test_http_public_url_with_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="public_url must be https:// when tls_cert is set"):
        load_settings(
            GatewaySettings, None, tls_cert=tmp_path / "c", tls_key=tmp_path / "k",
            public_url="http://gw.example",
        )  # fmt: skip


def test_redirect_listener_needs_an_https_public_url() -> None:
    with pytest.raises(ConfigError, match="http_redirect_listen needs an https:// public_url"):
        load_settings(GatewaySettings, None, http_redirect_listen="0.0.0.0:80")
    with pytest.raises(ConfigError, match="http_redirect_listen"):
        load_settings(
            GatewaySettings, None, http_redirect_listen="nope", public_url="https://gw.example"
        )


def test_tls_settings_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(
        '[gateway]\ntls_cert = "/etc/wiregate/tls.pem"\ntls_key = "/etc/wiregate/tls.key"\n'
        'public_url = "https://gw.example"\nhttp_redirect_listen = "0.0.0.0:80"\n'
        '[agent]\nca_file = "/etc/wiregate/ca.pem"\n'
    )
    gw = load_settings(GatewaySettings, cfg)
    assert (gw.tls_cert, gw.tls_key) == (
        Path("/etc/wiregate/tls.pem"),
        Path("/etc/wiregate/tls.key"),
    )
    assert gw.http_redirect_listen == "0.0.0.0:80"
    assert load_settings(AgentSettings, cfg).ca_file == Path("/etc/wiregate/ca.pem")
    monkeypatch.setenv("WIREGATE_CA_FILE", "/srv/ca.pem")
    assert load_settings(AgentSettings, cfg).ca_file == Path("/srv/ca.pem")
    assert load_settings(AgentSettings, cfg, ca_file=Path("/x.pem")).ca_file == Path("/x.pem")


def test_gateway_refuses_a_key_readable_by_others_in_one_line(
    pair: ServerPair, tmp_path: Path
) -> None:
    pair.key.chmod(0o644)
    result = CliRunner().invoke(
        main,
        ["gateway", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
         "--state-dir", str(tmp_path / "state"), "--admin-socket", str(tmp_path / "gw.sock"),
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: tls_key {pair.key} is readable by others (mode 0644; chmod 600 it)"]


def test_gateway_flags_without_the_key_refused(pair: ServerPair) -> None:
    result = CliRunner().invoke(main, ["gateway", "--tls-cert", str(pair.cert)])
    assert result.exit_code != 0
    assert "tls_cert and tls_key go together" in result.output
    assert "Traceback" not in result.output
