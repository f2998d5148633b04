"""The throwaway test PKI: chains verify, usages are what OpenVPN checks, bad certs are bad."""
from __future__ import annotations

import datetime as dt
import ssl
import subprocess
import shutil
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from bsd_ovpn.errors import ValidationError
from bsd_ovpn.testbed.pki import PKI, PKIError


@pytest.fixture
def pki(tmp_path) -> PKI:  # a private one: these tests revoke and count serials
    return PKI(tmp_path / "pki")


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _verify_chain(ca: x509.Certificate, leaf: x509.Certificate) -> None:
    leaf.verify_directly_issued_by(ca)


def test_chain_verifies_and_ca_is_a_ca(pki: PKI) -> None:
    bc = pki.ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = pki.ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    for cred in (pki.server(), pki.client("alice")):
        _verify_chain(pki.ca.cert, cred.cert)
        assert cred.cert_path.read_bytes() == cred.cert_pem
        assert cred.key_path.read_bytes() == cred.key_pem
        assert cred.key_path.stat().st_mode & 0o077 == 0
        assert cred.private_key().public_key().public_numbers() == \
            cred.cert.public_key().public_numbers()
    assert pki.client("alice").common_name == "alice"


def test_usages_match_remote_cert_tls(pki: PKI) -> None:
    srv, cli = pki.server(), pki.client()
    assert _eku(srv.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _eku(cli.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for cred in (srv, cli):
        ku = cred.cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and ku.key_agreement and not ku.key_encipherment
        assert isinstance(cred.cert.public_key(), ec.EllipticCurvePublicKey)
        assert cred.cert.public_key().curve.name == "secp256r1"
    san = srv.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server"]
    none = pki.issue("plain", usage="none")
    with pytest.raises(x509.ExtensionNotFound):
        none.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_rsa_option(tmp_path) -> None:
    pki = PKI(tmp_path / "rsa", key_type="rsa", rsa_bits=2048)
    srv = pki.server()
    assert isinstance(srv.cert.public_key(), rsa.RSAPublicKey)
    ku = srv.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_agreement
    _verify_chain(pki.ca.cert, srv.cert)
    ec_cli = pki.client("mixed", key_type="ec")
    assert isinstance(ec_cli.cert.public_key(), ec.EllipticCurvePublicKey)
    _verify_chain(pki.ca.cert, ec_cli.cert)


def test_expired_and_not_yet_valid(pki: PKI) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    old = pki.client("bob", expired=True)
    assert old.cert.not_valid_after_utc < now
    assert old.cert_path.name == "bob-expired.crt"
    old_srv = pki.server(expired=True)
    assert old_srv.cert.not_valid_after_utc < now
    future = pki.issue("later", not_yet_valid=True)
    assert future.cert.not_valid_before_utc > now
    assert pki.client("bob").cert.not_valid_after_utc > now
    with pytest.raises(ValidationError):
        pki.issue("x", expired=True, not_yet_valid=True)


def test_stdlib_ssl_rejects_expired_and_accepts_valid(pki: PKI) -> None:
    """The real TLS stack (what the Python server uses) agrees with our intent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server().cert_path, pki.server().key_path)
    for cred, ok in ((pki.client("carol"), True), (pki.client("dave", expired=True), False),
                     (pki.unrelated_ca().client("mallory"), False)):
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        cctx.load_cert_chain(cred.cert_path, cred.key_path)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(pki.server().cert_path, pki.server().key_path)
        sctx.load_verify_locations(pki.ca_path)
        sctx.verify_mode = ssl.CERT_REQUIRED
        assert _handshake(cctx, sctx) is ok, cred.name


def _handshake(cctx: ssl.SSLContext, sctx: ssl.SSLContext) -> bool:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = cctx.wrap_bio(c_in, c_out, server_side=False)
    srv = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", cli), ("s", srv)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server's verdict on the client cert reaches the client late
            try:
                srv.write(b"x")
                c_in.write(s_out.read())
                return cli.read(1) == b"x"
            except ssl.SSLError:
                return False
    return False


def test_crl_lists_revoked_serial(pki: PKI) -> None:
    victim, keeper = pki.client("eve"), pki.client("frank")
    pki.revoke(victim)
    path = pki.crl()
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(pki.ca.cert.public_key())
    assert crl.issuer == pki.ca.cert.subject
    assert crl.get_revoked_certificate_by_serial_number(victim.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(keeper.serial) is None
    assert pki.revoked_serials == [victim.serial]
    assert crl.next_update_utc > dt.datetime.now(dt.timezone.utc)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    pki.revoke(keeper)
    crl2 = x509.load_pem_x509_crl(pki.crl().read_bytes())
    assert len(crl2) == 2
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    with pytest.raises(PKIError):
        pki.revoke(pki.unrelated_ca().client("z"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl program")
def test_openssl_cli_agrees(pki: PKI) -> None:
    victim = pki.client("gina")
    pki.revoke(victim)
    crl = pki.crl()
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_path),
                         str(pki.client("hank").cert_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", str(pki.ca_path),
                          "-CRLfile", str(crl), str(victim.cert_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "revoked" in (bad.stdout + bad.stderr)
    exp = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_path),
                          str(pki.client("ida", expired=True).cert_path)], capture_output=True, text=True)
    assert exp.returncode != 0 and "expired" in (exp.stdout + exp.stderr)


def test_unrelated_ca_is_unrelated(pki: PKI) -> None:
    other = pki.unrelated_ca()
    assert other is pki.unrelated_ca()
    assert other.ca.cert.subject != pki.ca.cert.subject
    mallory = other.client("mallory")
    _verify_chain(other.ca.cert, mallory.cert)
    with pytest.raises(Exception):
        _verify_chain(pki.ca.cert, mallory.cert)


def test_caching_and_unique_files(pki: PKI) -> None:
    assert pki.client("amy") is pki.client("amy")
    fresh = pki.issue("amy")
    assert fresh.serial != pki.client("amy").serial
    assert fresh.cert_path != pki.client("amy").cert_path
    assert len({pki.issue("dup").cert_path for _ in range(3)}) == 3


def test_thousand_clients_fast(pki: PKI) -> None:
    t0 = time.monotonic()
    creds = pki.clients(1000)
    elapsed = time.monotonic() - t0
    assert len({c.serial for c in creds}) == 1000
    assert len({c.key_path for c in creds}) == 1  # one shared key, as asked
    assert creds[999].common_name == "client999"
    _verify_chain(pki.ca.cert, creds[500].cert)
    assert elapsed < 10, f"1000 client certs took {elapsed:.1f} s"


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 65, "-lead"])
def test_bad_common_names_rejected(pki: PKI, bad: str) -> None:
    with pytest.raises(ValidationError, match="common name"):
        pki.issue(bad)


def test_bad_arguments_rejected(tmp_path) -> None:
    with pytest.raises(ValidationError, match="key_type"):
        PKI(tmp_path / "x", key_type="dsa")  # type: ignore[arg-type]
    pki = PKI(tmp_path / "y")
    with pytest.raises(ValidationError):
        pki.issue("a", usage="admin")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        pki.clients(-1)
    with pytest.raises(ValidationError):
        pki.crl(filename="../evil")
