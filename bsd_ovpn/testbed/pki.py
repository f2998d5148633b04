"""A throwaway X.509 PKI for tests, built with the ``cryptography`` package.

Interop tests need certificates that stock OpenVPN 2.6 accepts
(``remote-cert-tls server|client`` checks key usage and EKU) and also
deliberately bad ones: expired certificates, certificates from an unrelated
CA, revoked certificates listed in a CRL.  Generating them in-process with
ECDSA P-256 takes well under a millisecond per certificate, so a session
fixture can create whatever a test asks for on demand instead of shipping
fixed files that expire.

Usage::

    pki = PKI(tmp_dir)
    srv = pki.server()                  # Credential: cert_path, key_path, cert_pem, key_pem
    cli = pki.client("alice")
    old = pki.client("bob", expired=True)
    pki.revoke(cli); crl_path = pki.crl()
    evil = pki.unrelated_ca().client("mallory")
    many = pki.clients(1000)            # one shared key, fast
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bsd_ovpn.errors import OvpnError, ValidationError

KeyType = Literal["ec", "rsa"]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
Usage = Literal["server", "client", "ca", "none"]

_CN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
VALID_DAYS = 365


class PKIError(OvpnError):
    """The test PKI was asked for something it cannot make."""


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key, on disk and in memory."""

    name: str
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    key_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def common_name(self) -> str:
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    def private_key(self) -> PrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
        return key


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def new_key(key_type: KeyType = "ec", rsa_bits: int = 2048) -> PrivateKey:
    """A fresh private key: ECDSA P-256 (fast, default) or RSA."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits < 1024 or rsa_bits > 8192:
            raise ValidationError(f"rsa_bits must be 1024..8192, got {rsa_bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise ValidationError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class PKI:
    """A CA plus the certificates, CRL and unrelated CA tests ask for.

    Files go to ``directory``: ``ca.crt``, ``<stem>.crt``/``<stem>.key`` per
    credential, ``crl.pem``.  ``server()``/``client()`` cache by their
    arguments, so a session-wide PKI hands every test the same default
    certificates; ``issue()`` always makes a new one.
    """

    def __init__(self, directory: str | os.PathLike[str], *, key_type: KeyType = "ec",
                 rsa_bits: int = 2048, ca_name: str = "bsd_ovpn test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_type: KeyType = key_type
        self.rsa_bits = rsa_bits
        self._cache: dict[tuple[object, ...], Credential] = {}
        self._shared_keys: dict[str, tuple[PrivateKey, Path, bytes]] = {}
        self._stems: set[str] = set()
        self._revoked: dict[int, tuple[_dt.datetime, x509.ReasonFlags | None]] = {}
        self._unrelated: PKI | None = None
        self._crl_number = 0
        self._ca_key = new_key(key_type, rsa_bits)
        now = _utcnow()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bsd_ovpn tests")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(self._ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(days=1))
                .not_valid_after(now + _dt.timedelta(days=10 * VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(self._ca_key, hashes.SHA256()))
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        key_pem = _key_pem(self._ca_key)
        ca_crt, ca_key = self.directory / "ca.crt", self.directory / "ca.key"
        self.ca = Credential("ca", cert, ca_crt, ca_key, key_pem)
        _write(ca_crt, self.ca.cert_pem)
        _write(ca_key, key_pem, 0o600)

    # -- accessors -----------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    # -- issuing ---------------------------------------------------------------

    def server(self, cn: str = "server", *, expired: bool = False,
               key_type: KeyType | None = None, reuse_key: bool = False) -> Credential:
        """Server certificate (EKU serverAuth, SAN DNS:cn); cached per arguments."""
        return self._cached("server", cn, expired, key_type, reuse_key)

    def client(self, cn: str = "client", *, expired: bool = False,
               key_type: KeyType | None = None, reuse_key: bool = False) -> Credential:
        """Client certificate (EKU clientAuth); cached per arguments."""
        return self._cached("client", cn, expired, key_type, reuse_key)

    def clients(self, n: int, *, prefix: str = "client", reuse_key: bool = True,
                key_type: KeyType | None = None) -> list[Credential]:
        """``n`` client certificates ``<prefix>0..n-1``; one shared key by default (fast)."""
        if not 0 <= n <= 100_000:
            raise ValidationError(f"clients(n): n must be 0..100000, got {n}")
        return [self.client(f"{prefix}{i}", reuse_key=reuse_key, key_type=key_type)
                for i in range(n)]

    def _cached(self, usage: Usage, cn: str, expired: bool, key_type: KeyType | None,
                reuse_key: bool) -> Credential:
        kt = key_type or self.key_type
        k = (usage, cn, expired, kt, reuse_key)
        if k not in self._cache:
            self._cache[k] = self.issue(cn, usage=usage, expired=expired, key_type=kt,
                                        reuse_key=reuse_key)
        return self._cache[k]

    def issue(self, cn: str, *, usage: Usage = "client", expired: bool = False,
              not_yet_valid: bool = False, days: int = VALID_DAYS,
              key_type: KeyType | None = None, reuse_key: bool = False,
              stem: str | None = None,
              eku: "list[x509.ObjectIdentifier] | None" = None) -> Credential:
        """Always issue a new certificate signed by this CA and write it out.

        ``usage`` picks the extensions OpenVPN's ``remote-cert-tls`` checks:
        "server" (EKU serverAuth), "client" (EKU clientAuth) or "none" (no EKU,
        for negative tests).  ``expired`` makes a certificate whose validity
        ended yesterday; ``not_yet_valid`` one that starts in a week.
        ``eku`` (added for ``remote-cert-eku`` tests) replaces the usage's
        extendedKeyUsage list with exactly these OIDs (``[]``: no EKU at all).
        """
        if not _CN_RE.match(cn):
            raise ValidationError(f"common name must match {_CN_RE.pattern}: {cn!r}")
        if usage not in ("server", "client", "none"):
            raise ValidationError(f"usage must be server, client or none: {usage!r}")
        if expired and not_yet_valid:
            raise ValidationError("a certificate cannot be both expired and not yet valid")
        if days < 1:
            raise ValidationError(f"days must be >= 1, got {days}")
        kt: KeyType = key_type or self.key_type
        key, key_path, key_pem = self._key_for(kt, reuse_key)
        now = _utcnow()
        if expired:
            nb, na = now - _dt.timedelta(days=30), now - _dt.timedelta(days=1)
        elif not_yet_valid:
            nb, na = now + _dt.timedelta(days=7), now + _dt.timedelta(days=7 + days)
        else:
            nb, na = now - _dt.timedelta(hours=1), now + _dt.timedelta(days=days)
        is_rsa = kt == "rsa"
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.ca.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(nb).not_valid_after(na)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=is_rsa, data_encipherment=False,
                                                key_agreement=not is_rsa, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(self._aki, critical=False))
        usage_eku = {"server": [ExtendedKeyUsageOID.SERVER_AUTH],
                     "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}.get(usage, [])
        eku_list = usage_eku if eku is None else list(eku)
        if eku_list:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku_list), critical=False)
        if usage == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]),
                                            critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        stem = self._unique_stem(stem or self._default_stem(cn, usage, expired, not_yet_valid))
        cert_path = self.directory / f"{stem}.crt"
        if key_path is None:
            key_path = self.directory / f"{stem}.key"
            _write(key_path, key_pem, 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return Credential(cn, cert, cert_path, key_path, key_pem)

    @staticmethod
    def _default_stem(cn: str, usage: str, expired: bool, not_yet_valid: bool) -> str:
        stem = cn if usage != "none" else f"{cn}-noeku"
        if expired:
            stem += "-expired"
        if not_yet_valid:
            stem += "-notyet"
        return stem

    def _unique_stem(self, stem: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.@-]+", stem) or stem in ("ca", "crl"):
            raise ValidationError(f"bad file stem {stem!r}")
        base, i = stem, 1
        while stem in self._stems:
            i += 1
            stem = f"{base}-{i}"
        self._stems.add(stem)
        return stem

    def _key_for(self, kt: KeyType, reuse: bool) -> tuple[PrivateKey, Path | None, bytes]:
        if not reuse:
            key = new_key(kt, self.rsa_bits)
            return key, None, _key_pem(key)
        if kt not in self._shared_keys:
            key = new_key(kt, self.rsa_bits)
            pem = _key_pem(key)
            path = self.directory / f"shared-{kt}.key"
            _write(path, pem, 0o600)
            self._shared_keys[kt] = (key, path, pem)
        return self._shared_keys[kt]

    # -- revocation -----------------------------------------------------------

    def revoke(self, cred: Credential | int, *,
               reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise) -> None:
        """Mark a certificate (or serial) revoked; it appears in the next ``crl()``."""
        serial = cred.serial if isinstance(cred, Credential) else int(cred)
        if isinstance(cred, Credential) and cred.cert.issuer != self.ca.cert.subject:
            raise PKIError(f"{cred.name} was not issued by this CA; cannot revoke it here")
        self._revoked[serial] = (_utcnow() - _dt.timedelta(minutes=1), reason)

    @property
    def revoked_serials(self) -> list[int]:
        return sorted(self._revoked)

    def crl(self, *, filename: str = "crl.pem", next_update_days: int = 30) -> Path:
        """Write a CRL signed by the CA listing every revoked serial; returns its path.

        A negative ``next_update_days`` produces an already-outdated CRL.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", filename):
            raise ValidationError(f"bad CRL file name {filename!r}")
        now = _utcnow()
        self._crl_number += 1
        last = now - _dt.timedelta(hours=1) if next_update_days >= 0 \
            else now + _dt.timedelta(days=next_update_days - 1)
        b = (x509.CertificateRevocationListBuilder()
             .issuer_name(self.ca.cert.subject)
             .last_update(last)
             .next_update(now + _dt.timedelta(days=next_update_days))
             .add_extension(x509.CRLNumber(self._crl_number), critical=False)
             .add_extension(self._aki, critical=False))
        for serial, (when, reason) in sorted(self._revoked.items()):
            rb = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            if reason is not None:
                rb = rb.add_extension(x509.CRLReason(reason), critical=False)
            b = b.add_revoked_certificate(rb.build())
        crl = b.sign(self._ca_key, hashes.SHA256())
        path = self.directory / filename
        _write(path, crl.public_bytes(serialization.Encoding.PEM))
        return path

    # -- the other CA ---------------------------------------------------------

    def unrelated_ca(self) -> "PKI":
        """A second, independent CA (subdirectory ``unrelated``) for wrong-CA tests."""
        if self._unrelated is None:
            self._unrelated = PKI(self.directory / "unrelated", key_type=self.key_type,
                                  rsa_bits=self.rsa_bits, ca_name="bsd_ovpn unrelated CA")
        return self._unrelated
