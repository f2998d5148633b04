"""TLS over memory BIOs: handshake, EKM agreement, records, and clear verify failures."""
from __future__ import annotations

from pathlib import Path

import pytest

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError
from bsd_ovpn.proto.keys import EKM_LABEL
from bsd_ovpn.proto.tls import (TLSChannel, TLSConfig, TLSConfigError, TLSError,
                                VerifyX509Name, format_subject)
from bsd_ovpn.testbed.pki import PKI, Credential


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def _cfg(pki: PKI, cred: Credential | None, **kw: object) -> TLSConfig:
    return TLSConfig(ca=pki.ca_pem, cert=cred.cert_pem if cred else None,
                     key=cred.key_pem if cred else None, **kw)  # type: ignore[arg-type]


def _pump(srv: TLSChannel, cli: TLSChannel, rounds: int = 8) -> list[bytes]:
    """Shuttle bytes both ways; read records so post-handshake alerts surface.

    Returns the records the server read, one entry per record.
    """
    got = []
    for _ in range(rounds):
        a = cli.outgoing()
        srv.receive(a)
        while rec := srv.read_record():
            got.append(rec)
        b = srv.outgoing()
        cli.receive(b)
        cli.read()
        if not a and not b and srv.handshake_complete and cli.handshake_complete:
            break
    return got


def _connect(srv_cfg: TLSConfig, cli_cfg: TLSConfig) -> tuple[TLSChannel, TLSChannel]:
    srv = TLSChannel(srv_cfg, server=True)
    cli = TLSChannel(cli_cfg, server=False)
    _pump(srv, cli)
    return srv, cli


def _failure(srv_cfg: TLSConfig, cli_cfg: TLSConfig) -> tuple[str, TLSChannel, TLSChannel]:
    """Run a handshake that must fail; return the first side's message, keep going."""
    srv = TLSChannel(srv_cfg, server=True)
    cli = TLSChannel(cli_cfg, server=False)
    with pytest.raises(TLSError) as exc:
        _pump(srv, cli)
    assert isinstance(exc.value, RemoteProtocolError)
    return str(exc.value), srv, cli


def test_handshake_ekm_and_records(pki: PKI) -> None:
    srv_cfg = _cfg(pki, pki.server(), remote_cert_tls="client")
    cli_cfg = _cfg(pki, pki.client("alice"), remote_cert_tls="server",
                   verify_x509_name=("server", "name"))
    srv = TLSChannel(srv_cfg, server=True)
    cli = TLSChannel(cli_cfg, server=False)
    hello = cli.outgoing()
    assert hello[:1] == b"\x16"  # ClientHello produced at construction
    cli.write(b"KM2 before handshake\x00")  # buffered until the handshake completes
    cli.write(b"second message\x00")
    srv.receive(hello)
    got = _pump(srv, cli)
    assert got == [b"KM2 before handshake\x00", b"second message\x00"]  # one record each
    assert srv.handshake_complete and cli.handshake_complete
    assert srv.version == cli.version == "TLSv1.3"
    assert srv.cipher_name == cli.cipher_name
    assert srv.peer_common_name == "alice" and cli.peer_common_name == "server"
    assert cli.peer_certificate is not None and format_subject(
        cli.peer_certificate.subject) == "CN=server"
    k_srv = srv.export_keying_material(EKM_LABEL, 256)
    k_cli = cli.export_keying_material(EKM_LABEL, 256)
    assert k_srv == k_cli and len(k_srv) == 256
    assert srv.export_keying_material(b"EXPORTER-OpenVPN-other", 256) != k_srv
    # Each write is one record: two reads of one record each.
    cli.write(b"PUSH_REQUEST\x00")
    cli.write(b"EXIT\x00")
    srv.receive(cli.outgoing())
    assert srv.read_record() == b"PUSH_REQUEST\x00"
    assert srv.read_record() == b"EXIT\x00"
    assert srv.read_record() == b""
    srv.write(b"A" * 2048)
    srv.write(b"B\x00")
    cli.receive(srv.outgoing())
    assert cli.read() == b"A" * 2048 + b"B\x00"
    with pytest.raises(LocalProtocolError, match="2049 bytes exceeds"):
        srv.write(b"x" * 2049)
    # Contexts are built once per config and role.
    assert TLSChannel(srv_cfg, server=True)._conn.get_context() is srv_cfg.context(True)


def test_ekm_not_before_handshake(pki: PKI) -> None:
    cli = TLSChannel(_cfg(pki, pki.client()), server=False)
    with pytest.raises(LocalProtocolError, match="after the handshake"):
        cli.export_keying_material(EKM_LABEL, 256)


def test_tls12_handshake_and_ekm(pki: PKI) -> None:
    from OpenSSL import SSL
    srv_cfg = _cfg(pki, pki.server())
    cli_cfg = _cfg(pki, pki.client())
    cli_cfg.context(False).set_max_proto_version(SSL.TLS1_2_VERSION)
    srv, cli = _connect(srv_cfg, cli_cfg)
    assert srv.version == "TLSv1.2" and "ECDHE" in (srv.cipher_name or "")
    assert srv.export_keying_material(EKM_LABEL, 256) == cli.export_keying_material(
        EKM_LABEL, 256)


def test_tls12_with_rsa_certificates_uses_ecdhe_rsa(pki: PKI) -> None:
    from OpenSSL import SSL
    srv_cfg = _cfg(pki, pki.server("rsa-server", key_type="rsa"))
    cli_cfg = _cfg(pki, pki.client("rsa-client", key_type="rsa"))
    cli_cfg.context(False).set_max_proto_version(SSL.TLS1_2_VERSION)
    srv, cli = _connect(srv_cfg, cli_cfg)
    assert srv.version == "TLSv1.2" and (srv.cipher_name or "").startswith("ECDHE-RSA-")
    assert srv.peer_common_name == "rsa-client"


def test_tls13_min_version_refuses_tls12_peer(pki: PKI) -> None:
    from OpenSSL import SSL
    cli_cfg = _cfg(pki, pki.client())
    cli_cfg.context(False).set_max_proto_version(SSL.TLS1_2_VERSION)
    msg, _, _ = _failure(_cfg(pki, pki.server(), tls_version_min="1.3"), cli_cfg)
    assert "TLS" in msg


def test_wrong_ca_both_sides_explain(pki: PKI) -> None:
    evil = pki.unrelated_ca().client("mallory")
    srv = TLSChannel(_cfg(pki, pki.server()), server=True)
    cli = TLSChannel(_cfg(pki, evil), server=False)
    with pytest.raises(TLSError) as exc:
        _pump(srv, cli)
    assert str(exc.value) == ("certificate verify failed: unable to get local issuer "
                              "certificate (depth 0, subject CN=mallory)")
    # The server's alert reaches the client, which says it was rejected.
    with pytest.raises(TLSError, match="the server rejected us .*unknown ca"):
        cli.receive(srv.outgoing())
        cli.read()
    # A failed channel stays failed.
    with pytest.raises(TLSError, match="already failed"):
        srv.receive(b"")


def test_client_rejects_server_from_other_ca(pki: PKI) -> None:
    other = pki.unrelated_ca().server("server")
    msg, _, _ = _failure(_cfg(pki, other), _cfg(pki, pki.client()))
    assert msg.startswith("certificate verify failed: unable to get local issuer certificate")
    assert "CN=server" in msg


def test_expired_certificate(pki: PKI) -> None:
    msg, _, _ = _failure(_cfg(pki, pki.server(expired=True)), _cfg(pki, pki.client()))
    assert "certificate has expired" in msg and "depth 0" in msg


def test_revoked_certificate_via_crl(pki: PKI, tmp_path: Path) -> None:
    victim = pki.issue("revoked-client", usage="client")
    pki.revoke(victim)
    crl = Path(pki.crl()).read_bytes()
    srv_cfg = _cfg(pki, pki.server(), crl=[crl])
    msg, _, _ = _failure(srv_cfg, _cfg(pki, victim))
    assert msg == ("certificate verify failed: certificate revoked "
                   "(depth 0, subject CN=revoked-client)")
    # A non-revoked client passes with the same CRL-checking config.
    srv, cli = _connect(srv_cfg, _cfg(pki, pki.client("fine")))
    assert srv.peer_common_name == "fine"


def test_remote_cert_tls_server_needs_server_eku(pki: PKI) -> None:
    no_eku = pki.issue("plain", usage="none")
    msg, _, _ = _failure(_cfg(pki, no_eku), _cfg(pki, pki.client(), remote_cert_tls="server"))
    assert msg == ("peer certificate lacks extendedKeyUsage serverAuth (remote-cert-tls server); "
                   "subject CN=plain")
    # Without remote-cert-tls the same certificate is accepted (no EKU = any purpose).
    srv, cli = _connect(_cfg(pki, no_eku), _cfg(pki, pki.client()))
    assert cli.peer_common_name == "plain"
    # A clientAuth-only certificate already fails OpenSSL's purpose check (as in OpenVPN).
    not_a_server = pki.issue("sneaky", usage="client")
    msg, _, _ = _failure(_cfg(pki, not_a_server),
                         _cfg(pki, pki.client(), remote_cert_tls="server"))
    assert msg == ("certificate verify failed: unsuitable certificate purpose (depth 0, "
                   "subject CN=sneaky): its extendedKeyUsage does not allow use as a TLS "
                   "server certificate")


def test_remote_cert_tls_client_on_server(pki: PKI) -> None:
    msg, _, _ = _failure(_cfg(pki, pki.server(), remote_cert_tls="client"),
                         _cfg(pki, pki.issue("no-eku-client", usage="none")))
    assert "lacks extendedKeyUsage clientAuth (remote-cert-tls client)" in msg
    msg, _, _ = _failure(_cfg(pki, pki.server(), remote_cert_tls="client"),
                         _cfg(pki, pki.issue("srv-as-client", usage="server")))
    assert "does not allow use as a TLS client certificate" in msg


def test_leaf_verdicts_are_cached_per_certificate_and_policy(pki: PKI,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A rekeying client's certificate is parsed once; the verdict, the CN and the
    messages stay the same, a policy change forgets old verdicts, the cache is bounded."""
    import bsd_ovpn.proto.tls as tls_mod
    srv_cfg = _cfg(pki, pki.server(), remote_cert_tls="client")
    alice = _cfg(pki, pki.client("alice"))
    bad = _cfg(pki, pki.issue("no-eku-client2", usage="none"))
    first, _ = _connect(srv_cfg, alice)
    second, _ = _connect(srv_cfg, alice)
    assert first.peer_common_name == second.peer_common_name == "alice"
    assert len(srv_cfg._leaf_cache) == 1
    # both sessions hold the one cached copy of the DER, which is the real certificate
    assert first._peer is not None and second._peer is not None
    assert first._peer[0] is second._peer[0]
    assert second.peer_certificate is not None and \
        second.peer_certificate.subject.rfc4514_string() == "CN=alice"
    msgs = [_failure(srv_cfg, bad)[0] for _ in range(2)]
    assert msgs[0] == msgs[1] and "lacks extendedKeyUsage clientAuth" in msgs[0]
    assert len(srv_cfg._leaf_cache) == 2
    # a new policy is not answered from verdicts made under the old one
    srv_cfg.verify_x509_name = VerifyX509Name("bob", "name")
    msg, _, _ = _failure(srv_cfg, alice)
    assert msg == "verify-x509-name mismatch: peer CN 'alice' is not 'bob'"
    assert len(srv_cfg._leaf_cache) == 1
    # bounded: the oldest verdict goes first
    monkeypatch.setattr(tls_mod, "_LEAF_CACHE_SIZE", 2)
    srv_cfg.verify_x509_name = None
    for name in ("c1", "c2", "c3"):
        _connect(srv_cfg, _cfg(pki, pki.client(name)))
    assert len(srv_cfg._leaf_cache) == 2
    assert sorted(v[1] for v in srv_cfg._leaf_cache.values()) == ["c2", "c3"]


def test_cached_certificate_is_still_checked_against_the_crl(pki: PKI) -> None:
    """The cache holds only our leaf checks: OpenSSL's chain and CRL checks run every time."""
    victim = pki.issue("later-revoked", usage="client")
    srv_cfg = _cfg(pki, pki.server(), remote_cert_tls="client")
    _connect(srv_cfg, _cfg(pki, victim))            # its verdict is now cached
    pki.revoke(victim)
    srv_cfg.crl = [Path(pki.crl()).read_bytes()]
    srv_cfg._contexts.clear()                       # a reloaded CRL means a new context
    msg, _, _ = _failure(srv_cfg, _cfg(pki, victim))
    assert msg == ("certificate verify failed: certificate revoked "
                   "(depth 0, subject CN=later-revoked)")


@pytest.mark.parametrize("vxn,ok", [
    (VerifyX509Name("CN=server"), True),
    (VerifyX509Name("CN=serverX"), False),
    (("server", "name"), True),
    (("serv", "name"), False),
    (("serv", "name-prefix"), True),
    (("name-prefix", "x"), False),   # (type, name) order accepted too
    ("CN=server", True),
])
def test_verify_x509_name(pki: PKI, vxn: object, ok: bool) -> None:
    cli_cfg = _cfg(pki, pki.client(), verify_x509_name=vxn)
    if ok:
        srv, cli = _connect(_cfg(pki, pki.server()), cli_cfg)
        assert cli.handshake_complete
    else:
        msg, _, _ = _failure(_cfg(pki, pki.server()), cli_cfg)
        assert msg.startswith("verify-x509-name mismatch: peer")
        assert "server" in msg


def test_client_certificate_modes(pki: PKI) -> None:
    anon = TLSConfig(ca=pki.ca_pem)
    msg, _, _ = _failure(_cfg(pki, pki.server()), anon)
    assert msg == ("TLS handshake failed: the client presented no certificate "
                   "(verify-client-cert require)")
    srv, cli = _connect(_cfg(pki, pki.server(), verify_client_cert="optional"), anon)
    assert srv.handshake_complete and srv.peer_certificate is None
    srv, cli = _connect(_cfg(pki, pki.server(), verify_client_cert="none"),
                        _cfg(pki, pki.client()))
    assert srv.handshake_complete and srv.peer_common_name is None


def test_config_errors(pki: PKI) -> None:
    with pytest.raises(TLSConfigError, match="remote-cert-tls"):
        TLSConfig(ca=pki.ca_pem, remote_cert_tls="peer")
    with pytest.raises(TLSConfigError, match="tls-version-min"):
        TLSConfig(ca=pki.ca_pem, tls_version_min="1.0")
    with pytest.raises(TLSConfigError, match="verify-client-cert"):
        TLSConfig(ca=pki.ca_pem, verify_client_cert="maybe")
    with pytest.raises(TLSConfigError, match="together"):
        TLSConfig(ca=pki.ca_pem, cert=pki.server().cert_pem)
    with pytest.raises(TLSConfigError, match="verify-x509-name type"):
        TLSConfig(ca=pki.ca_pem, verify_x509_name=("x", "cn"))
    with pytest.raises(TLSConfigError, match="ca: not a PEM"):
        TLSConfig(ca=b"garbage").context(False)
    with pytest.raises(TLSConfigError, match="does not match"):
        TLSConfig(ca=pki.ca_pem, cert=pki.server().cert_pem,
                  key=pki.client().key_pem).context(True)
    with pytest.raises(TLSConfigError, match="needs cert and key"):
        TLSConfig(ca=pki.ca_pem).context(True)


def test_garbage_from_peer_is_tls_error(pki: PKI) -> None:
    srv = TLSChannel(_cfg(pki, pki.server()), server=True)
    with pytest.raises(TLSError, match="TLS failed"):
        srv.receive(b"\x16\x03\x01\x00\x05hello-not-tls" * 3)


# --------------------------------------------------------------------------- remote-cert-eku

_CUSTOM_EKU = "1.3.6.1.4.1.55555.7.1"


def test_remote_cert_eku_numeric_oid(pki: PKI) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    special = pki.issue("eku-server", usage="server",
                        eku=[ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier(_CUSTOM_EKU)])
    srv, cli = _connect(_cfg(pki, special), _cfg(pki, pki.client(), remote_cert_eku=_CUSTOM_EKU))
    assert cli.peer_common_name == "eku-server"
    # A server certificate without that OID is refused, and the message lists what it has.
    msg, _, _ = _failure(_cfg(pki, pki.server()),
                         _cfg(pki, pki.client(), remote_cert_eku=_CUSTOM_EKU))
    assert msg == (f"peer certificate's extendedKeyUsage lacks '{_CUSTOM_EKU}' "
                   f"(remote-cert-eku); it has TLS Web Server Authentication "
                   f"(1.3.6.1.5.5.7.3.1); subject CN=server")


def test_remote_cert_eku_long_name_as_openvpn_compares(pki: PKI) -> None:
    srv, cli = _connect(_cfg(pki, pki.server()),
                        _cfg(pki, pki.client(), remote_cert_eku="TLS Web Server Authentication"))
    assert cli.handshake_complete
    # the dotted form of the same OID matches too
    _connect(_cfg(pki, pki.server()), _cfg(pki, pki.client(), remote_cert_eku="1.3.6.1.5.5.7.3.1"))
    msg, _, _ = _failure(_cfg(pki, pki.server()),
                         _cfg(pki, pki.client(), remote_cert_eku="TLS Web Client Authentication"))
    assert "lacks 'TLS Web Client Authentication' (remote-cert-eku)" in msg


def test_remote_cert_eku_needs_the_extension(pki: PKI) -> None:
    no_eku = pki.issue("plain-eku", usage="none")
    msg, _, _ = _failure(_cfg(pki, no_eku),
                         _cfg(pki, pki.client(), remote_cert_eku="TLS Web Server Authentication"))
    assert msg == ("peer certificate has no extendedKeyUsage extension (remote-cert-eku "
                   "'TLS Web Server Authentication'); subject CN=plain-eku")


def test_remote_cert_eku_on_the_server_checks_clients(pki: PKI) -> None:
    srv_cfg = _cfg(pki, pki.server(), remote_cert_eku="TLS Web Client Authentication")
    srv, _ = _connect(srv_cfg, _cfg(pki, pki.client("eku-alice")))
    assert srv.peer_common_name == "eku-alice"
    msg, _, _ = _failure(srv_cfg, _cfg(pki, pki.issue("eku-none", usage="none")))
    assert msg.startswith("peer certificate has no extendedKeyUsage extension")


@pytest.mark.parametrize("value,match", [
    ("serverAuth", "write 'TLS Web Server Authentication' or the dotted OID"),
    ("Web Server Thing", "neither a dotted OID nor an OpenSSL object name"),
    ("", "needs an OID"),
])
def test_remote_cert_eku_bad_values(pki: PKI, value: str, match: str) -> None:
    with pytest.raises(TLSConfigError, match=match):
        TLSConfig(ca=pki.ca_pem, remote_cert_eku=value)


# ------------------------------------------------------------------- versions, suites, groups

def test_tls_version_max_caps_the_handshake(pki: PKI) -> None:
    srv, cli = _connect(_cfg(pki, pki.server()), _cfg(pki, pki.client(), tls_version_max="1.2"))
    assert srv.version == cli.version == "TLSv1.2"
    srv, cli = _connect(_cfg(pki, pki.server(), tls_version_max="1.3"), _cfg(pki, pki.client()))
    assert srv.version == "TLSv1.3"


def test_tls_version_max_below_peer_min_fails_clearly(pki: PKI) -> None:
    msg, _, _ = _failure(_cfg(pki, pki.server(), tls_version_min="1.3"),
                         _cfg(pki, pki.client(), tls_version_max="1.2"))
    assert msg.startswith("TLS handshake failed: no common TLS version with the client")


@pytest.mark.parametrize("kw,match", [
    ({"tls_version_min": "1.3", "tls_version_max": "1.2"},
     "tls-version-max 1.2 is below tls-version-min 1.3: no TLS version is left"),
    ({"tls_version_max": "1.1"}, "tls-version-max 1.1 is below TLS 1.2"),
    ({"tls_version_max": "2.0"}, "tls-version-max must be one of"),
])
def test_tls_version_max_errors(pki: PKI, kw: dict[str, str], match: str) -> None:
    with pytest.raises(TLSConfigError, match=match):
        TLSConfig(ca=pki.ca_pem, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("spelling", ["TLS_CHACHA20_POLY1305_SHA256",
                                      "TLS-CHACHA20-POLY1305-SHA256"])
def test_tls_ciphersuites_restricts_tls13(pki: PKI, spelling: str) -> None:
    srv, cli = _connect(_cfg(pki, pki.server(), tls_ciphersuites=spelling),
                        _cfg(pki, pki.client()))
    assert srv.version == "TLSv1.3"
    assert srv.cipher_name == cli.cipher_name == "TLS_CHACHA20_POLY1305_SHA256"


def test_tls_ciphersuites_without_overlap_fails(pki: PKI) -> None:
    msg, _, _ = _failure(_cfg(pki, pki.server(), tls_ciphersuites="TLS_AES_128_GCM_SHA256"),
                         _cfg(pki, pki.client(), tls_ciphersuites="TLS_AES_256_GCM_SHA384"))
    assert "no shared cipher" in msg


@pytest.mark.parametrize("spelling,expect", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
])
def test_tls_cipher_restricts_tls12(pki: PKI, spelling: str, expect: str) -> None:
    srv, cli = _connect(_cfg(pki, pki.server(), tls_cipher=spelling),
                        _cfg(pki, pki.client(), tls_version_max="1.2"))
    assert srv.version == "TLSv1.2" and srv.cipher_name == cli.cipher_name == expect


@pytest.mark.parametrize("kw,match", [
    ({"tls_cipher": "BOGUS:ECDHE-ECDSA-AES128-GCM-SHA256"}, "'BOGUS' matches no cipher suite"),
    ({"tls_cipher": "TLS-RSA-WITH-AES-128-CBC-SHA"}, "cannot translate"),
    ({"tls_cipher": "TLS_AES_128_GCM_SHA256"}, "cannot translate"),
    ({"tls_ciphersuites": "TLS_AES_128_GCM_SHA256:TLS_BOGUS"}, "unknown TLS 1.3 suite 'TLS_BOGUS'"),
    ({"tls_groups": "X25519:bogus"}, "unknown group 'bogus'"),
    ({"tls_groups": ""}, "empty list"),
    ({"tls_cipher": "ECDHE\x00X"}, "printable ASCII"),       # a NUL would cut the C string
    ({"tls_groups": " "}, "printable ASCII"),
    ({"remote_cert_eku": "1.2.3\x00"}, "printable ASCII"),
])
def test_tls_policy_string_errors(pki: PKI, kw: dict[str, str], match: str) -> None:
    with pytest.raises(TLSConfigError, match=match):
        TLSConfig(ca=pki.ca_pem, **kw)  # type: ignore[arg-type]


def test_tls_groups_pick_the_key_exchange(pki: PKI) -> None:
    srv, cli = _connect(_cfg(pki, pki.server(), tls_groups="secp384r1:X25519"),
                        _cfg(pki, pki.client(), tls_groups="secp384r1"))
    assert srv.group_name == cli.group_name == "secp384r1"
    msg, _, _ = _failure(_cfg(pki, pki.server(), tls_groups="X25519"),
                         _cfg(pki, pki.client(), tls_groups="secp384r1"))
    assert msg == ("TLS handshake failed: no shared cipher or group with the client "
                   "(no suitable key share)")


def test_failed_lookups_leave_no_openssl_error_behind(pki: PKI) -> None:
    """OBJ_txt2nid / set1_curves_list failures must not poison the next pyOpenSSL call."""
    from OpenSSL._util import lib
    for kw in ({"remote_cert_eku": "Web Server Thing"}, {"tls_groups": "bogus"}):
        with pytest.raises(TLSConfigError):
            TLSConfig(ca=pki.ca_pem, **kw)  # type: ignore[arg-type]
        assert lib.ERR_peek_error() == 0
    # an EKU OID OpenSSL has no name for is looked up during verification too
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    oid = "1.3.6.1.4.1.55555.9"
    odd = pki.issue("odd-eku", usage="server",
                    eku=[ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier(oid)])
    srv, cli = _connect(_cfg(pki, odd), _cfg(pki, pki.client(), remote_cert_eku=oid))
    assert cli.handshake_complete and lib.ERR_peek_error() == 0
    cli.write(b"after\x00")
    assert _pump(srv, cli) == [b"after\x00"]


def _cert_with_subject(attrs: list) -> object:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(attrs)
    now = datetime.datetime(2026, 1, 1)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.mark.parametrize("attrs", [
    [("O", "Org", None), ("CN", "alice", None)],
    [("CN", "first", None), ("CN", "last wins", None)],       # OpenVPN takes the last CN
    [("CN", "zoë-ünïcode", None)],
    [("CN", "bmp name", "BMPString")],
    [("CN", "printable", "PrintableString")],
    [("O", "no common name", None)],
])
def test_common_name_from_openssl_matches_cryptography(attrs: list) -> None:
    """The peer's CN read from OpenSSL's parsed certificate (the cheap path taken at
    every handshake) is exactly what the cryptography parse says."""
    from cryptography import x509
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    from bsd_ovpn.proto.tls import _common_name, _openssl_common_name

    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    cert = _cert_with_subject([
        x509.NameAttribute(oids[k], v, _type=getattr(_ASN1Type, t)) if t
        else x509.NameAttribute(oids[k], v) for k, v, t in attrs])
    known, cn = _openssl_common_name(crypto.X509.from_cryptography(cert))  # type: ignore[arg-type]
    assert known
    assert cn == _common_name(cert)  # type: ignore[arg-type]
