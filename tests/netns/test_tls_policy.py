"""TLS policy directives against a stock OpenVPN 2.6 server (netns, real peer).

remote-cert-eku, tls-cipher, tls-ciphersuites, tls-groups and tls-version-max
are implemented in bsd_ovpn.proto.tls; here ``ovpnctl probe`` (our client
Session, configured only through the config file) proves they take effect in
a handshake with stock OpenVPN, and a stock client proves the spelling rule we
enforce for remote-cert-eku (OpenSSL long name or dotted OID; a short name
such as ``serverAuth`` never matches in OpenVPN either).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns.test_interop import SERVER_IP, _probe, _probe_config

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]


def _conf(tmp_path: Path, pki: Any, wrap_keys: Any, *lines: str) -> Path:
    path = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt")
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


def test_probe_tls13_suite_group_and_eku(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                         wrap_keys: Any, tmp_path: Path) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    conf = _conf(tmp_path, pki, wrap_keys, "tls-ciphersuites TLS_CHACHA20_POLY1305_SHA256",
                 "tls-groups secp384r1", 'remote-cert-eku "TLS Web Server Authentication"')
    rc, data, out = _probe(two_hosts.client, conf)
    assert rc == 0, out
    assert data["tls_version"] == "TLSv1.3"
    assert data["tls_cipher"] == "TLS_CHACHA20_POLY1305_SHA256"


def test_probe_tls_version_max_and_tls_cipher(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                              wrap_keys: Any, tmp_path: Path) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    conf = _conf(tmp_path, pki, wrap_keys, "tls-version-max 1.2",
                 "tls-cipher TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256")
    rc, data, out = _probe(two_hosts.client, conf)
    assert rc == 0, out
    assert data["tls_version"] == "TLSv1.2"
    assert data["tls_cipher"] == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_probe_remote_cert_eku_mismatch(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                        wrap_keys: Any, tmp_path: Path) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    conf = _conf(tmp_path, pki, wrap_keys, "remote-cert-eku 1.3.6.1.4.1.55555.7.1")
    rc, data, out = _probe(two_hosts.client, conf, timeout=8)
    assert rc != 0 and data["reason"] == "tls-error", out
    assert ("peer certificate's extendedKeyUsage lacks '1.3.6.1.4.1.55555.7.1' "
            "(remote-cert-eku); it has TLS Web Server Authentication (1.3.6.1.5.5.7.3.1)"
            in data["error"]), out


@pytest.mark.parametrize("eku,ok", [("TLS Web Server Authentication", True),
                                    ("1.3.6.1.5.5.7.3.1", True),
                                    ("serverAuth", False)])
def test_stock_openvpn_compares_eku_like_we_do(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                               eku: str, ok: bool) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    cli = stock_openvpn.client(two_hosts.client, remote=SERVER_IP, wrap="tls-crypt",
                               extra=(f'remote-cert-eku "{eku}"',))
    if ok:
        cli.wait_ready(30)
    else:
        cli.wait_for(r"VERIFY EKU ERROR", 30)
        # and bsd_ovpn refuses that spelling up front instead of failing every handshake
        from bsd_ovpn.config import loads
        from bsd_ovpn.errors import ConfigError
        with pytest.raises(ConfigError, match="write 'TLS Web Server Authentication'"):
            loads(f"client\ndev tun\nremote {SERVER_IP}\nca {pki.ca_path}\n"
                  f"remote-cert-eku {eku}\n", "client.conf")


# --------------------------------------------------------------------------- our server

from tests.netns.test_daemon import SERVER_VPN, daemons, server_config  # noqa: E402,F401


def test_ovpnctl_server_checks_client_eku_and_suites(two_hosts: Any, pki: Any, wrap_keys: Any,
                                                     stock_openvpn: Any, daemons: Any,
                                                     tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    two = two_hosts
    oid = "1.3.6.1.4.1.55555.7.2"
    conf = server_config(pki, wrap_keys, two, tmp_path, extra=(
        f"remote-cert-eku {oid}", "tls-ciphersuites TLS_AES_128_GCM_SHA256",
        "tls-groups secp384r1"))
    srv = daemons.ovpnctl(two.server, "srv", "server", conf, daemons.engine(two.server, "srv"))
    srv.wait_log("listening on")
    good = pki.issue("eku-carol", usage="client",
                     eku=[ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier(oid)])
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=good, name="good")
    cli.wait_ready(30)
    cli.wait_for(r"Control Channel: TLSv1\.3, cipher TLSv1\.3 TLS_AES_128_GCM_SHA256", 5)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15), srv.text()[-3000:]
    cli.stop()
    # an ordinary (otherwise valid) client certificate lacks the OID: never let in; the
    # server logs why (H20: daemon/server.py _on_event), and the stock client gets our TLS
    # alert and fails at once instead of retransmitting until its 60 s hand-window
    bad = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("eku-dave"),
                               name="bad")
    bad.wait_for(r"VERIFY OK: depth=0, CN=server", 15)     # it got as far as our certificate
    bad.wait_for(r"(?i)alert", 10)
    time.sleep(3)
    assert "Initialization Sequence Completed" not in bad.log
    deadline = time.monotonic() + 10
    while "TLS handshake failed" not in srv.text() and time.monotonic() < deadline:
        time.sleep(0.2)
    failed = [ln for ln in srv.text().splitlines() if "TLS handshake failed" in ln]
    assert failed and "remote-cert-eku" in failed[0] and "CN=eku-dave" in failed[0], \
        srv.text()[-3000:]
    assert "Initialization Sequence Completed" not in bad.log
    assert daemons.stop(srv) == 0
