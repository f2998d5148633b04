"""Stock OpenVPN config generation (no root; key generation needs the openvpn program)."""
from __future__ import annotations

import shutil

import pytest

from bsd_ovpn.errors import ValidationError
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys, genkey, unique_dev_name


@pytest.fixture
def pki(tmp_path) -> PKI:
    return PKI(tmp_path / "pki")


def _lines(cfg: OvpnConfig) -> list[str]:
    return cfg.render().splitlines()


def test_server_config_matches_spec_shape(pki: PKI, tmp_path) -> None:
    tc = tmp_path / "tc.key"
    cfg = OvpnConfig.server(pki, None, wrap="tls-crypt", wrap_key=tc,
                            subnet6="2001:db8:100::/64", local="192.0.2.1", reneg_sec=60)
    lines = _lines(cfg)
    for want in ("port 1194", "proto udp", "dev-type tun", "topology subnet",
                 "server 198.51.100.0 255.255.255.0", "server-ipv6 2001:db8:100::/64",
                 "dh none", f"tls-crypt {tc}", "keepalive 10 60", "reneg-sec 60",
                 "disable-dco", "local 192.0.2.1",
                 "data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
                 f"ca {pki.ca_path}", f"cert {pki.server().cert_path}"):
        assert want in lines, want
    assert f"dev {cfg.dev}" in lines and len(cfg.dev) <= 15
    assert not any(line.startswith("remote-cert-tls") for line in lines)


def test_client_config_and_wrap_directions(pki: PKI, tmp_path) -> None:
    ta = tmp_path / "ta.key"
    cli = OvpnConfig.client(pki, None, remote="192.0.2.1", wrap="tls-auth", wrap_key=ta,
                            auth="SHA256", extra=("hand-window 10",))
    lines = _lines(cli)
    for want in ("client", "nobind", "remote 192.0.2.1 1194", "remote-cert-tls server",
                 f"tls-auth {ta} 1", "auth SHA256", "data-ciphers AES-256-GCM",
                 "hand-window 10", f"cert {pki.client().cert_path}"):
        assert want in lines, want
    srv = OvpnConfig.server(pki, None, wrap="tls-auth", wrap_key=ta)
    assert f"tls-auth {ta} 0" in _lines(srv)
    none = OvpnConfig.server(pki, None, wrap="none")
    assert not any(k in none.render() for k in ("tls-auth", "tls-crypt"))
    assert unique_dev_name() != unique_dev_name()


@pytest.mark.parametrize("change, match", [
    ({"wrap": "tls-magic"}, "wrap"),
    ({"port": 70000}, "port"),
    ({"subnet": "198.51.100.1/24"}, "host bits"),
    ({"subnet6": "198.51.100.0/24"}, "IPv6"),
    ({"extra": ("a\nb",)}, "single lines"),
    ({"dev": "tun 0"}, "dev"),
    ({"proto": "sctp"}, "proto"),
])
def test_bad_config_values_rejected(pki: PKI, tmp_path, change, match) -> None:
    cfg = OvpnConfig.server(pki, None, wrap="tls-crypt", wrap_key=tmp_path / "k").with_(**change)
    with pytest.raises(ValueError, match=match):
        cfg.render()


def test_wrap_without_key_rejected(pki: PKI) -> None:
    with pytest.raises(ValidationError, match="needs a key file"):
        OvpnConfig.server(pki, None, wrap="tls-crypt").render()
    with pytest.raises(ValidationError, match="remote"):
        OvpnConfig.client(pki, None, remote="", wrap="none").render()


def test_genkey_argument_checks(tmp_path) -> None:
    with pytest.raises(ValidationError, match="kind"):
        genkey("tls-magic", tmp_path / "x")
    with pytest.raises(ValidationError, match="server key"):
        genkey("tls-crypt-v2-client", tmp_path / "x")


@pytest.mark.openvpn
@pytest.mark.skipif(shutil.which("openvpn") is None, reason="needs openvpn")
def test_wrap_keys_made_by_openvpn(tmp_path) -> None:
    keys = WrapKeys(tmp_path / "keys")
    assert "-----BEGIN OpenVPN Static key V1-----" in keys.tls_crypt.read_text()
    assert "-----BEGIN OpenVPN Static key V1-----" in keys.tls_auth.read_text()
    assert "BEGIN OpenVPN tls-crypt-v2 server key" in keys.tls_crypt_v2_server.read_text()
    cli = keys.tls_crypt_v2_client("alice")
    assert "BEGIN OpenVPN tls-crypt-v2 client key" in cli.read_text()
    assert keys.tls_crypt_v2_client("alice") == cli
    assert keys.key_for("tls-crypt-v2", "server") == keys.tls_crypt_v2_server
