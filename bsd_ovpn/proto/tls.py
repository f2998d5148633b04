"""TLS for the OpenVPN control channel over memory BIOs (pyOpenSSL), sans-IO.

The control channel carries an ordinary TLS stream inside reliable control
packets (protocol spec §7).  We need three things the stdlib ``ssl`` module
lacks or makes awkward: RFC 5705 keying-material export (EKM, §9.2), a verify
callback to add OpenVPN's own checks (``remote-cert-tls``, ``remote-cert-eku``,
``verify-x509-name``) with messages a person can act on, and exact control
over record boundaries (each KM2 / control message is ONE ``SSL_write``, §4.2).
pyOpenSSL's ``Connection(ctx, None)`` is a pure memory-BIO TLS object.

Contexts are expensive (CA store, CRLs, key parsing), so :class:`TLSConfig`
builds one per role and reuses it for every connection (a server with 1000
clients has one context).
"""
from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from bsd_ovpn.proto.record import RecordCounter, RecordError, RecordLayer, alert_name

__all__ = [
    "MAX_WRITE", "TLSChannel", "TLSConfig", "TLSConfigError", "TLSError", "VerifyX509Name",
    "check_remote_cert_eku", "format_subject", "openssl_cipher_list", "openssl_ciphersuites",
    "openssl_groups",
]

#: One control message / KM2 must fit OpenVPN's 2048-byte TLS read buffer.
MAX_WRITE = 2048
_READ_CHUNK = 16384
# ECDHE-only suites for TLS 1.2 (OpenVPN's "dh none" default behaviour); TLS 1.3
# suites are all (EC)DHE by construction.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_CLIENT_CERT_MODES = {"require": "require", "required": "require", "optional": "optional",
                      "none": "none"}
_X509_NAME_TYPES = ("subject", "name", "name-prefix")
_X509_V_ERR_INVALID_PURPOSE = 26
#: leaf verdicts kept per TLSConfig (the DER is the object the sessions keep anyway)
_LEAF_CACHE_SIZE = 1024

# Fallback words for the X509_V_ERR_* codes we expect, used only if the
# OpenSSL binding does not expose X509_verify_cert_error_string.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate", 3: "unable to get certificate CRL",
    7: "certificate signature failure", 8: "CRL signature failure",
    9: "certificate is not yet valid", 10: "certificate has expired",
    11: "CRL is not yet valid", 12: "CRL has expired",
    18: "self-signed certificate", 19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate", 21: "unable to verify the first certificate",
    23: "certificate revoked", 24: "invalid CA certificate", 26: "unsupported certificate purpose",
}
# pyOpenSSL 26 has no wrappers for three OpenSSL calls we need, so this module
# (and only this one) reaches the raw binding through ``OpenSSL._util``:
#   X509_verify_cert_error_string  - the text of a verify error code;
#   SSL_CTX_set1_curves_list       - OpenVPN's --tls-groups (the same ctrl as
#                                    SSL_CTX_set1_groups_list in OpenSSL 3);
#   OBJ_txt2nid / OBJ_nid2ln       - OpenSSL's long names of EKU OIDs, which is
#                                    what OpenVPN's --remote-cert-eku compares;
#   X509_NAME_* / ASN1_STRING_to_UTF8 - the peer's CN from the certificate OpenSSL
#                                    already parsed (see _openssl_common_name).
# Each use checks that the symbol exists and fails with a clear message if not.
try:  # pragma: no branch - depends on the installed binding
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _ffi = _lib = None
_verify_error_string = getattr(_lib, "X509_verify_cert_error_string", None)


def _verify_error(errnum: int) -> str:
    if _verify_error_string is not None:
        try:
            return _ffi.string(_verify_error_string(errnum)).decode("ascii", "replace")
        except Exception:  # pragma: no cover - binding oddity; use the table
            pass
    return _VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")


class TLSError(RemoteProtocolError):
    """The TLS handshake or stream failed; the message says what a person must fix."""


class TLSConfigError(ValidationError):
    """A certificate, key or CRL given to :class:`TLSConfig` is unusable."""


# --------------------------------------------------------------------------- names

_SHORT_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress"}


def format_subject(name: x509.Name) -> str:
    """A subject as OpenVPN prints and compares it: ``C=US, O=Org, CN=server``."""
    parts = []
    for attr in name:
        key = _SHORT_NAMES.get(attr.oid) or attr.rfc4514_attribute_name
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        parts.append(f"{key}={value}")
    return ", ".join(parts)


_NID_COMMON_NAME = 13       # NID_commonName (objects.h; fixed since SSLeay)
_CN_CALLS = ("X509_get_subject_name", "X509_NAME_get_index_by_NID", "X509_NAME_get_entry",
             "X509_NAME_ENTRY_get_data", "ASN1_STRING_to_UTF8", "OPENSSL_free")
_HAVE_CN_CALLS = _lib is not None and all(hasattr(_lib, n) for n in _CN_CALLS)


def _openssl_common_name(cert: crypto.X509) -> tuple[bool, str | None]:
    """(True, the last CN) read from the certificate OpenSSL already parsed.

    The same answer as :func:`_common_name`, for a fraction of the cost: a
    new client's certificate would otherwise be parsed again and its subject
    turned into Python objects, ~20 us per handshake on each side.  (False,
    None) when this cannot tell (binding without the calls, a CN that is not
    a string type): the caller then uses :func:`_common_name`.
    """
    if not _HAVE_CN_CALLS:
        return False, None
    name = _lib.X509_get_subject_name(cert._x509)  # noqa: SLF001 - see the binding note
    if name == _ffi.NULL:
        return False, None
    idx = last = -1
    while (idx := _lib.X509_NAME_get_index_by_NID(name, _NID_COMMON_NAME, idx)) >= 0:
        last = idx                          # OpenVPN uses the last CN if several
    if last < 0:
        return True, None
    data = _lib.X509_NAME_ENTRY_get_data(_lib.X509_NAME_get_entry(name, last))
    out = _ffi.new("unsigned char **")
    n = _lib.ASN1_STRING_to_UTF8(out, data)
    if n < 0:
        return False, None
    try:
        return True, bytes(_ffi.buffer(out[0], n)).decode("utf-8", "replace")
    finally:
        _lib.OPENSSL_free(out[0])


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[-1].value  # OpenVPN uses the last CN if several
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass(frozen=True)
class VerifyX509Name:
    """``--verify-x509-name name [subject|name|name-prefix]`` (default subject)."""

    name: str
    type: str = "subject"

    def __post_init__(self) -> None:
        if self.type not in _X509_NAME_TYPES:
            raise TLSConfigError(f"verify-x509-name type must be one of "
                                 f"{', '.join(_X509_NAME_TYPES)}, got {self.type!r}")
        if not self.name:
            raise TLSConfigError("verify-x509-name needs a name")

    def mismatch(self, cert: x509.Certificate) -> str | None:
        """Why ``cert`` does not match, or ``None`` if it does."""
        if self.type == "subject":
            subject = format_subject(cert.subject)
            if subject != self.name:
                return f"verify-x509-name mismatch: peer subject '{subject}' is not '{self.name}'"
            return None
        cn = _common_name(cert)
        if cn is None:
            return f"verify-x509-name mismatch: peer certificate has no CN (want '{self.name}')"
        if self.type == "name" and cn != self.name:
            return f"verify-x509-name mismatch: peer CN '{cn}' is not '{self.name}'"
        if self.type == "name-prefix" and not cn.startswith(self.name):
            return f"verify-x509-name mismatch: peer CN '{cn}' does not start with '{self.name}'"
        return None


def _as_verify_name(value: Any) -> VerifyX509Name | None:
    if value is None or isinstance(value, VerifyX509Name):
        return value
    if isinstance(value, str):
        return VerifyX509Name(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        a, b = value
        # Accept (name, type) as written in a config file, or (type, name).
        if a in _X509_NAME_TYPES and b not in _X509_NAME_TYPES:
            return VerifyX509Name(b, a)
        return VerifyX509Name(a, b)
    raise TLSConfigError(f"verify_x509_name must be a name, (name, type) or VerifyX509Name, "
                         f"got {value!r}")


# --------------------------------------------------------------------------- EKU

_DOTTED_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]{0,18})){1,63}")


def _openssl_long_name(text: str) -> str | None:
    """OpenSSL's long name for an OID (dotted) or object name, ``None`` if unknown."""
    if _lib is None or not hasattr(_lib, "OBJ_txt2nid") or not hasattr(_lib, "OBJ_nid2ln"):
        raise TLSConfigError("remote-cert-eku needs OBJ_txt2nid/OBJ_nid2ln, which this "
                             "pyOpenSSL binding does not expose")
    nid = _lib.OBJ_txt2nid(text.encode("ascii"))
    if nid == _lib.NID_undef:
        # a failed lookup leaves an error on OpenSSL's (per-thread) queue, where the next
        # pyOpenSSL call would find it and raise it as its own failure
        _lib.ERR_clear_error()
        return None
    ln = _lib.OBJ_nid2ln(nid)
    return _ffi.string(ln).decode("ascii", "replace") if ln != _ffi.NULL else None


def check_remote_cert_eku(value: str) -> str:
    """Validate ``--remote-cert-eku``: a dotted OID or an OpenSSL long name.

    OpenVPN compares the expected text with each of the peer's EKU OIDs
    printed both as OpenSSL's long name (``TLS Web Server Authentication``)
    and as a dotted number, so those are the only spellings that can ever
    match.  A short name such as ``serverAuth`` would silently reject every
    peer there; here it is an error that says what to write instead.
    """
    if not isinstance(value, str) or not value:
        raise TLSConfigError(f"remote-cert-eku needs an OID or an OpenSSL long name, "
                             f"got {value!r}")
    _check_text(value, "remote-cert-eku", spaces=True)     # long names have spaces
    if _DOTTED_OID.fullmatch(value):
        return value
    ln = _openssl_long_name(value)
    if ln is None:
        raise TLSConfigError(f"remote-cert-eku {value!r} is neither a dotted OID nor an "
                             f"OpenSSL object name")
    if ln != value:
        raise TLSConfigError(f"remote-cert-eku {value!r}: OpenVPN compares OpenSSL's long "
                             f"name, write '{ln}' or the dotted OID")
    return value


def _eku_problem(cert: x509.Certificate, want: str) -> str | None:
    """Why ``cert``'s extendedKeyUsage lacks ``want`` (OpenVPN's --remote-cert-eku)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return (f"peer certificate has no extendedKeyUsage extension (remote-cert-eku "
                f"'{want}'); subject {format_subject(cert.subject)}")
    have = []
    for oid in eku:
        dotted = oid.dotted_string
        name = _openssl_long_name(dotted)
        if want == dotted or (name is not None and want == name):
            return None
        have.append(f"{name} ({dotted})" if name else dotted)
    return (f"peer certificate's extendedKeyUsage lacks '{want}' (remote-cert-eku); it has "
            f"{', '.join(have) or 'nothing'}; subject {format_subject(cert.subject)}")


# --------------------------------------------------------------------------- cipher policy

#: OpenVPN-style (IANA) names of the ECDHE/DHE AEAD suites that --tls-cipher may use,
#: translated into OpenSSL names; anything else must be written as OpenSSL spells it.
_IANA_TLS12 = re.compile(r"TLS[-_](ECDHE|DHE)[-_](ECDSA|RSA)[-_]WITH[-_]"
                         r"(AES[-_](128|256)[-_]GCM|CHACHA20[-_]POLY1305)[-_](SHA256|SHA384)")
_TLS_VERSION_NAMES = ("1.0", "1.1", "1.2", "1.3")


def _check_text(value: str, what: str, *, spaces: bool = False) -> None:
    """Printable ASCII only: these strings go to OpenSSL as C strings (a NUL would cut them)."""
    if not isinstance(value, str) or any(not (33 <= ord(c) <= 126 or (spaces and c == " "))
                                         for c in value):
        raise TLSConfigError(f"{what}: {value!r} contains characters other than printable "
                             f"ASCII")
    if len(value) > 4096:
        raise TLSConfigError(f"{what}: longer than 4096 characters")


def _tls12_cipher_token(token: str) -> str:
    m = _IANA_TLS12.fullmatch(token)
    if m is None:
        if token.upper().startswith(("TLS-", "TLS_")):
            raise TLSConfigError(f"tls-cipher: cannot translate {token!r}; write it as "
                                 f"OpenSSL names it (see 'openssl ciphers -stdname'), TLS 1.3 "
                                 f"suites belong in tls-ciphersuites")
        return token
    kx, auth, bits, mac = m.group(1), m.group(2), m.group(4), m.group(5)
    if bits is not None:
        return f"{kx}-{auth}-AES{bits}-GCM-{mac}"
    return f"{kx}-{auth}-CHACHA20-POLY1305"


def _tls12_names(ctx: SSL.Context) -> list[str]:
    return [n for n in SSL.Connection(ctx, None).get_cipher_list() if not n.startswith("TLS_")]


def openssl_cipher_list(value: str) -> bytes:
    """``--tls-cipher`` (TLS <= 1.2) as an OpenSSL cipher string, checked token by token.

    OpenSSL silently drops list entries it does not know as long as one
    matches, so a typo would quietly shrink the policy: each positive entry
    must select at least one suite on its own, and the whole list must leave
    at least one TLS 1.2 suite.
    """
    _check_text(value, "tls-cipher")
    tokens = [t for t in value.split(":") if t]
    if not tokens:
        raise TLSConfigError("tls-cipher: empty cipher list")
    out = []
    for tok in tokens:
        name = _tls12_cipher_token(tok)
        if name[0] not in "!-+@":
            probe = SSL.Context(SSL.TLS_METHOD)
            try:
                probe.set_cipher_list(name.encode("ascii"))
            except SSL.Error:
                raise TLSConfigError(f"tls-cipher: {tok!r} matches no cipher suite OpenSSL "
                                     f"knows") from None
            if not _tls12_names(probe):
                raise TLSConfigError(f"tls-cipher: {tok!r} matches no TLS 1.2 cipher suite")
        out.append(name)
    joined = ":".join(out).encode("ascii")
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.set_cipher_list(joined)
    except SSL.Error:
        raise TLSConfigError(f"tls-cipher: {value!r} leaves no cipher suite") from None
    if not _tls12_names(probe):
        raise TLSConfigError(f"tls-cipher: {value!r} leaves no TLS 1.2 cipher suite")
    return joined


def openssl_ciphersuites(value: str) -> bytes:
    """``--tls-ciphersuites`` (TLS 1.3), each name checked against OpenSSL's own list.

    OpenVPN accepts ``TLS-AES-256-GCM-SHA384`` as well as the IANA underscores;
    OpenSSL ignores names it does not know, so unknown ones are an error here.
    """
    _check_text(value, "tls-ciphersuites")
    names = [t.replace("-", "_") for t in value.split(":") if t]
    if not names:
        raise TLSConfigError("tls-ciphersuites: empty list")
    for name in names:
        probe = SSL.Context(SSL.TLS_METHOD)
        try:
            probe.set_tls13_ciphersuites(name.encode("ascii"))
        except SSL.Error:
            raise TLSConfigError(f"tls-ciphersuites: unknown TLS 1.3 suite {name!r}") from None
        if name not in SSL.Connection(probe, None).get_cipher_list():
            raise TLSConfigError(f"tls-ciphersuites: unknown TLS 1.3 suite {name!r} "
                                 f"(e.g. TLS_AES_256_GCM_SHA384)")
    return ":".join(names).encode("ascii")


def _set_groups(ctx: SSL.Context, groups: bytes) -> bool:
    fn = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    if fn is None:  # pragma: no cover - every OpenSSL 1.1+/3 binding has it
        raise TLSConfigError("tls-groups needs SSL_CTX_set1_curves_list, which this "
                             "pyOpenSSL binding does not expose")
    ok = fn(ctx._context, groups) == 1  # noqa: SLF001 - see the binding note above
    if not ok:
        _lib.ERR_clear_error()          # see _openssl_long_name
    return bool(ok)


def openssl_groups(value: str) -> bytes:
    """``--tls-groups`` (key exchange groups, e.g. ``X25519:secp256r1``), each one checked."""
    _check_text(value, "tls-groups")
    names = [t for t in value.split(":") if t]
    if not names:
        raise TLSConfigError("tls-groups: empty list")
    for name in names:
        if not _set_groups(SSL.Context(SSL.TLS_METHOD), name.encode("ascii")):
            raise TLSConfigError(f"tls-groups: unknown group {name!r} (e.g. X25519, "
                                 f"secp256r1, secp384r1, ffdhe2048)")
    return ":".join(names).encode("ascii")


def _pem(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


# --------------------------------------------------------------------------- config

@dataclass(eq=False)
class TLSConfig:
    """Certificates and verification policy of one side; builds its SSL contexts once.

    ``ca``, ``cert``, ``key`` and each ``crl`` are PEM (bytes or str); ``ca``
    may hold several certificates, ``cert`` may be followed by intermediates.
    ``remote_cert_tls`` is OpenVPN's ``--remote-cert-tls server|client``;
    ``remote_cert_eku`` its ``--remote-cert-eku OID|long-name``;
    ``verify_client_cert`` its ``--verify-client-cert none|optional|require``
    (servers only).  ``tls_version_max``, ``tls_cipher`` (TLS <= 1.2, OpenSSL
    cipher string), ``tls_ciphersuites`` (TLS 1.3) and ``tls_groups`` are the
    directives of the same names; ``None`` keeps our defaults (TLS 1.2-1.3,
    ECDHE AEAD suites, OpenSSL's TLS 1.3 suites and groups).
    """

    ca: bytes | str
    cert: bytes | str | None = None
    key: bytes | str | None = None
    crl: Sequence[bytes | str] = ()
    verify_x509_name: VerifyX509Name | tuple[str, str] | str | None = None
    remote_cert_tls: str | None = None
    tls_version_min: str = "1.2"
    verify_client_cert: str = "require"
    remote_cert_eku: str | None = None
    tls_version_max: str | None = None
    tls_cipher: str | None = None
    tls_ciphersuites: str | None = None
    tls_groups: str | None = None
    #: After a TLS 1.3 handshake, carry the session on with our own record layer and
    #: free OpenSSL's per-connection state (see :class:`TLSChannel`).
    record_handoff: bool = True
    _contexts: dict[bool, SSL.Context] = field(default_factory=dict, init=False, repr=False)
    _cipher_list: bytes = field(default=_TLS12_CIPHERS, init=False, repr=False)
    _ciphersuites: bytes | None = field(default=None, init=False, repr=False)
    _groups: bytes | None = field(default=None, init=False, repr=False)
    #: leaf certificate DER -> (problem, CN, the DER itself): see _leaf_verdict
    _leaf_cache: dict[bytes, tuple[str | None, str | None, bytes]] = field(
        default_factory=dict, init=False, repr=False)
    _leaf_policy: tuple[Any, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.verify_x509_name = _as_verify_name(self.verify_x509_name)
        if self.remote_cert_tls not in (None, "server", "client"):
            raise TLSConfigError(f"remote-cert-tls must be 'server' or 'client', "
                                 f"got {self.remote_cert_tls!r}")
        if self.tls_version_min not in _VERSIONS:
            raise TLSConfigError(f"tls-version-min must be one of {', '.join(_VERSIONS)}, "
                                 f"got {self.tls_version_min!r}")
        if self.verify_client_cert not in _CLIENT_CERT_MODES:
            raise TLSConfigError(f"verify-client-cert must be none, optional or require, "
                                 f"got {self.verify_client_cert!r}")
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("cert and key must be given together")
        if self.remote_cert_eku is not None:
            check_remote_cert_eku(self.remote_cert_eku)
        if self.tls_version_max is not None:
            if self.tls_version_max not in _TLS_VERSION_NAMES:
                raise TLSConfigError(f"tls-version-max must be one of "
                                     f"{', '.join(_TLS_VERSION_NAMES)}, got "
                                     f"{self.tls_version_max!r}")
            if self.tls_version_max not in _VERSIONS:
                raise TLSConfigError(f"tls-version-max {self.tls_version_max} is below TLS 1.2, "
                                     f"the oldest version bsd_ovpn speaks")
            if float(self.tls_version_max) < float(self.tls_version_min):
                raise TLSConfigError(f"tls-version-max {self.tls_version_max} is below "
                                     f"tls-version-min {self.tls_version_min}: no TLS version "
                                     f"is left")
        # Convert (and so validate) the policy strings now: a bad one is a config error,
        # not a handshake failure later.
        self._cipher_list = openssl_cipher_list(self.tls_cipher) \
            if self.tls_cipher is not None else _TLS12_CIPHERS
        self._ciphersuites = openssl_ciphersuites(self.tls_ciphersuites) \
            if self.tls_ciphersuites is not None else None
        self._groups = openssl_groups(self.tls_groups) if self.tls_groups is not None else None

    def context(self, server: bool) -> SSL.Context:
        """The SSL context for this role, built on first use and then shared."""
        ctx = self._contexts.get(server)
        if ctx is None:
            ctx = self._contexts[server] = self._build(server)
        return ctx

    def _build(self, server: bool) -> SSL.Context:
        if server and self.cert is None:
            raise TLSConfigError("a TLS server needs cert and key")
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(_VERSIONS[self.tls_version_min])
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET
                        | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
        if self.tls_version_max is not None:
            ctx.set_max_proto_version(_VERSIONS[self.tls_version_max])
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every key_state: full handshake
        # OpenSSL keeps ~16 KB read/write buffers per connection unless told to
        # free them between records; a server holds one connection per client
        # for the whole session, so this is ~8 KiB of RSS per client.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(self._cipher_list)
        if self._ciphersuites is not None:
            ctx.set_tls13_ciphersuites(self._ciphersuites)
        if self._groups is not None and not _set_groups(ctx, self._groups):
            raise TLSConfigError(f"tls-groups {self.tls_groups!r} rejected by OpenSSL")
        store = ctx.get_cert_store()
        assert store is not None
        try:
            cas = x509.load_pem_x509_certificates(_pem(self.ca) or b"")
        except ValueError as e:
            raise TLSConfigError(f"ca: not a PEM certificate bundle ({e})") from None
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
        if self.crl:
            for i, pem in enumerate(self.crl):
                try:
                    crl = x509.load_pem_x509_crl(_pem(pem) or b"")
                except ValueError as e:
                    raise TLSConfigError(f"crl[{i}]: not a PEM CRL ({e})") from None
                store.add_crl(crl)
            # OpenVPN's --crl-verify: check the whole chain against the CRLs.
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
        if self.cert is not None:
            try:
                chain = x509.load_pem_x509_certificates(_pem(self.cert) or b"")
            except ValueError as e:
                raise TLSConfigError(f"cert: not a PEM certificate ({e})") from None
            try:
                key = serialization.load_pem_private_key(_pem(self.key) or b"", password=None)
            except (ValueError, TypeError) as e:
                raise TLSConfigError(f"key: not an unencrypted PEM private key ({e})") from None
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            try:
                ctx.use_privatekey(key)  # type: ignore[arg-type]
                ctx.check_privatekey()
            except SSL.Error:
                raise TLSConfigError("key does not match the certificate") from None
        if server:
            mode = _CLIENT_CERT_MODES[self.verify_client_cert]
            if mode == "require":
                flags = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            elif mode == "optional":
                flags = SSL.VERIFY_PEER
            else:
                flags = SSL.VERIFY_NONE
        else:
            flags = SSL.VERIFY_PEER
        ctx.set_verify(flags, self._verify_callback)
        if self.record_handoff:
            ctx.set_keylog_callback(_keylog_callback)
        return ctx

    def _verify_callback(self, conn: SSL.Connection, cert: crypto.X509, errnum: int,
                         depth: int, ok: int) -> bool:
        """OpenSSL's chain verdict plus OpenVPN's leaf checks; records why it failed."""
        if ok and depth:
            return True                 # a CA that OpenSSL accepted needs no look
        ref = conn.get_app_data()
        channel = ref() if isinstance(ref, weakref.ref) else None
        try:
            if not ok:
                ccert = cert.to_cryptography()
                reason = (f"certificate verify failed: {_verify_error(errnum)} (depth {depth}, "
                          f"subject {format_subject(ccert.subject)})")
                if errnum == _X509_V_ERR_INVALID_PURPOSE:
                    role = "client" if conn.get_context() is self._contexts.get(True) \
                        else "server"
                    reason += (f": its extendedKeyUsage does not allow use as a TLS {role} "
                               "certificate")
            else:
                reason, cn, der = self._leaf_verdict(
                    crypto.dump_certificate(crypto.FILETYPE_ASN1, cert), cert)
                if reason is None and isinstance(channel, TLSChannel):
                    # the peer's certificate facts, so they need not be fetched again
                    channel._peer = (der, cn)
        except Exception as e:  # never let an exception escape into OpenSSL
            reason = f"certificate verify failed: cannot inspect certificate ({e})"
        if reason is not None:
            if isinstance(channel, TLSChannel) and channel._verify_failure is None:
                channel._verify_failure = reason
            return False
        return True

    def _leaf_verdict(self, der: bytes, openssl_cert: crypto.X509 | None = None
                      ) -> tuple[str | None, str | None, bytes]:
        """(why the leaf ``der`` fails our checks or None, its CN, ``der``), cached per DER.

        The verdict is a pure function of the certificate and this config's
        leaf policy, while OpenSSL's own chain checks (signatures, validity,
        CRLs) run on every handshake regardless; so a client that rekeys or
        reconnects costs the parse and the extension checks once.  The DER
        returned is the cached object, so the sessions of one client share it.
        """
        policy = (self.remote_cert_tls, self.remote_cert_eku, self.verify_x509_name)
        cache = self._leaf_cache
        if policy != self._leaf_policy:         # the policy was changed: forget verdicts
            cache.clear()
            self._leaf_policy = policy
        hit = cache.get(der)
        if hit is not None:
            return hit
        cert = x509.load_der_x509_certificate(der)
        reason = self._leaf_problem(cert)
        cn = None
        if reason is None:
            known, cn = _openssl_common_name(openssl_cert) if openssl_cert is not None \
                else (False, None)
            if not known:
                cn = _common_name(cert)
        verdict = (reason, cn, der)
        if len(cache) >= _LEAF_CACHE_SIZE:
            del cache[next(iter(cache))]        # the oldest entry (insertion order)
        cache[der] = verdict
        return verdict

    def _leaf_problem(self, cert: x509.Certificate) -> str | None:
        want = self.remote_cert_tls
        if want is not None:
            oid = ExtendedKeyUsageOID.SERVER_AUTH if want == "server" else \
                ExtendedKeyUsageOID.CLIENT_AUTH
            word = "serverAuth" if want == "server" else "clientAuth"
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                eku = None
            if eku is None or oid not in eku:
                return (f"peer certificate lacks extendedKeyUsage {word} "
                        f"(remote-cert-tls {want}); subject {format_subject(cert.subject)}")
            try:
                cert.extensions.get_extension_for_class(x509.KeyUsage)
            except x509.ExtensionNotFound:
                return (f"peer certificate has no keyUsage extension (remote-cert-tls {want}); "
                        f"subject {format_subject(cert.subject)}")
        if self.remote_cert_eku is not None:
            problem = _eku_problem(cert, self.remote_cert_eku)
            if problem is not None:
                return problem
        vxn = self.verify_x509_name
        if isinstance(vxn, VerifyX509Name):
            return vxn.mismatch(cert)
        return None


# --------------------------------------------------------------------------- channel

def _keylog_callback(conn: SSL.Connection, line: bytes) -> None:
    """Route OpenSSL's key log line to its channel (never raises into OpenSSL)."""
    try:
        if not line.startswith(_HANDOFF_PREFIXES):
            return                      # a handshake-epoch secret: the hand-off needs none
        ref = conn.get_app_data()
        channel = ref() if isinstance(ref, weakref.ref) else None
        if isinstance(channel, TLSChannel):
            channel._keylog(line)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - no exception may cross the C callback  # pragma: no cover
        pass


def _ssl_error_text(err: SSL.Error) -> str:
    reasons = []
    for item in err.args[0] if err.args and isinstance(err.args[0], list) else []:
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return "; ".join(r for r in reasons if r) or str(err) or err.__class__.__name__


def _describe_failure(text: str, server: bool) -> str:
    peer = "client" if server else "server"
    if "alert" in text:
        return f"TLS handshake failed: the {peer} rejected us ({text})"
    if "peer did not return a certificate" in text:
        return "TLS handshake failed: the client presented no certificate (verify-client-cert require)"
    if "wrong version number" in text or "unsupported protocol" in text:
        return f"TLS handshake failed: no common TLS version with the {peer} ({text})"
    if "no shared cipher" in text or "no suitable" in text:
        return f"TLS handshake failed: no shared cipher or group with the {peer} ({text})"
    return f"TLS failed: {text}"


class TLSChannel:
    """One TLS session over memory BIOs: feed ciphertext, drain ciphertext.

    ``receive()`` feeds in-order control-packet payloads, ``outgoing()``
    returns what must be cut into control packets.  ``write()`` before the
    handshake completes is buffered and flushed (one record per write) as
    soon as it does.  Errors raise :class:`TLSError`; the TLS alert that
    explains the failure to the peer is still left in :meth:`outgoing`.

    A TLS 1.3 session leaves OpenSSL once it is established and quiescent
    (see :mod:`bsd_ovpn.proto.record`): an ``SSL`` object costs ~43 KiB for
    as long as the key state lives, our record layer a few hundred bytes.
    The hand-off happens by itself at the first point where nothing is in
    flight inside OpenSSL and both directions' record sequence numbers are
    known for sure (:meth:`release_openssl`); until then, and for TLS 1.2,
    OpenSSL runs the session.  The API is the same either way.
    """

    __slots__ = ("config", "server", "_conn", "_verify_failure", "_pending", "_failed",
                 "handshake_complete", "closed", "_secrets", "_count_in", "_count_out",
                 "_drained", "_rl", "_facts", "_peer", "_new_secret", "_in_hold", "_out_hs",
                 "__weakref__")

    def __init__(self, config: TLSConfig, *, server: bool) -> None:
        self.config = config
        self.server = server
        self._conn: SSL.Connection | None = SSL.Connection(config.context(server), None)
        # A weak reference: no cycle, so a dropped channel frees its SSL at once.
        self._conn.set_app_data(weakref.ref(self))
        self._verify_failure: str | None = None
        self._pending: list[bytes] = []
        self._failed: TLSError | None = None
        self.handshake_complete = False
        self.closed = False
        # hand-off bookkeeping (None once handed off, or when it cannot happen)
        self._secrets: dict[bytes, bytes] | None = {} if config.record_handoff else None
        self._count_in: RecordCounter | None = RecordCounter() if config.record_handoff else None
        self._count_out: RecordCounter | None = RecordCounter(verify=False) \
            if config.record_handoff else None
        # The record boundary where the handshake ended, per direction, so that no
        # handshake record needs a trial decryption: the peer's bytes fed before
        # the handshake completed wait here (only those OpenSSL left unread at
        # completion are application records: it reads record by record), and
        # _out_hs is how many bytes of our next drain are still handshake records.
        self._in_hold: bytearray | None = bytearray() if config.record_handoff else None
        self._out_hs = 0
        self._drained = False      # the last SSL_read wanted more input than was given
        self._new_secret = False   # a key log line arrived that the counters have not seen
        self._rl: RecordLayer | None = None
        # (version, cipher, group, peer certificate DER, peer CN) kept at the hand-off
        self._facts: tuple[str | None, str | None, str | None, bytes | None, str | None] | None \
            = None
        self._peer: tuple[bytes | None, str | None] | None = None   # (cert DER, CN), cached
        if server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            self._advance()  # produce the ClientHello now

    @property
    def handed_off(self) -> bool:
        """True once OpenSSL is gone and our TLS 1.3 record layer carries the session."""
        return self._rl is not None

    # -- errors ----------------------------------------------------------------

    def _fail(self, err: SSL.Error) -> TLSError:
        if self._verify_failure is not None:
            exc = TLSError(self._verify_failure)
        else:
            exc = TLSError(_describe_failure(_ssl_error_text(err), self.server))
        self._failed = exc
        self._stop_counting()
        return exc

    def _record_failure(self, err: RecordError) -> TLSError:
        if err.peer_alert is not None:
            # worded like OpenSSL's failures (_describe_failure): in TLS 1.3 a server
            # refuses a client certificate only after the client finished its handshake
            assert self._rl is not None
            peer = "client" if self.server else "server"
            stage = "TLS failed" if self._rl.got_data else "TLS handshake failed"
            exc = TLSError(f"{stage}: the {peer} rejected us (TLS alert "
                           f"{alert_name(err.peer_alert).replace('_', ' ')})")
        else:
            exc = TLSError(str(err))
        self._failed = exc
        return exc

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise TLSError(f"TLS session already failed: {self._failed}")

    # -- hand-off to the record layer --------------------------------------------

    def _stop_counting(self) -> None:
        self._secrets = self._count_in = self._count_out = self._in_hold = None

    def _keylog(self, line: bytes) -> None:
        """OpenSSL's key log line (NSS format): keep the secrets the hand-off needs."""
        if self._secrets is None or not line.startswith(_HANDOFF_PREFIXES):
            return                      # the two handshake secrets are of no use here
        parts = line.split()
        if len(parts) == 3 and parts[0] in _HANDOFF_SECRETS:
            try:
                self._secrets[parts[0]] = bytes.fromhex(parts[2].decode("ascii"))
                self._new_secret = True
            except ValueError:  # pragma: no cover - OpenSSL writes hex
                self._stop_counting()

    def _give_counters_keys(self) -> None:
        """Hand each counter its application traffic secret once OpenSSL derived it."""
        if not self._new_secret:
            return
        secrets, conn = self._secrets, self._conn
        if secrets is None or conn is None or self._count_in is None \
                or self._count_out is None:
            return
        suite = conn.get_cipher_name()
        if suite is None:
            return
        self._new_secret = False
        mine, theirs = (_SERVER_SECRET, _CLIENT_SECRET) if self.server \
            else (_CLIENT_SECRET, _SERVER_SECRET)
        if theirs in secrets:
            self._count_in.set_secret(suite, secrets[theirs])
        if mine in secrets:
            self._count_out.set_secret(suite, secrets[mine])

    def release_openssl(self) -> bool:
        """Move an established TLS 1.3 session from OpenSSL to our record layer, if safe now.

        Safe means: the handshake is over and nothing is in flight -- no
        ciphertext unread in either memory BIO or half-parsed by us, no
        plaintext OpenSSL decrypted that was not read, the last SSL_read
        asked for more input, no write waiting for the handshake, no
        shutdown started -- and the counters know both sequence numbers
        (neither lost track).  Returns True if the session is (now) handed off.
        """
        if self._rl is not None:
            return True
        conn = self._conn
        cin, cout, secrets = self._count_in, self._count_out, self._secrets
        if conn is None or cin is None or cout is None or secrets is None \
                or not self.handshake_complete or self._failed is not None or self.closed:
            return False
        if self._pending or not self._drained or not cin.idle or not cout.idle:
            return False                    # cheap tests first: this runs on every drain
        if conn.get_protocol_version_name() != "TLSv1.3":
            self._stop_counting()           # TLS 1.2 stays in OpenSSL
            return False
        self._give_counters_keys()
        if not cin.ready or not cout.ready or _EXPORTER_SECRET not in secrets:
            if cin.lost is not None or cout.lost is not None:
                self._stop_counting()
            return False
        if (conn.pending() or conn.get_shutdown()
                or _bio_pending(conn._into_ssl) or _bio_pending(conn._from_ssl)):  # noqa: SLF001
            return False
        suite = conn.get_cipher_name()
        assert suite is not None
        group = self._group_from(conn)
        # interned: one copy of "TLSv1.3" etc. for all sessions, not one per client
        self._facts = (sys.intern(conn.get_protocol_version_name()), sys.intern(suite),
                       sys.intern(group) if group is not None else None, *self._peer_facts())
        # the counters' keys are the application traffic keys at the next sequence numbers
        self._rl = RecordLayer.from_counters(server=self.server, read=cin, write=cout,
                                             exporter_secret=secrets[_EXPORTER_SECRET])
        self._stop_counting()
        self._conn = None                   # frees the SSL object (nothing else holds it)
        return True

    # -- handshake ---------------------------------------------------------------

    def _advance(self) -> None:
        if self.handshake_complete:
            return
        conn = self._conn
        assert conn is not None
        counting = self._count_out is not None
        before = _bio_pending(conn._from_ssl) if counting else 0  # noqa: SLF001
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            raise self._fail(e) from None
        self.handshake_complete = True
        if counting:
            # TLS 1.3: the call that completes a server's handshake writes only
            # NewSessionTickets (application records); a client's writes its
            # Finished flight (handshake records) and nothing after it
            self._out_hs = before if self.server \
                else _bio_pending(conn._from_ssl)  # noqa: SLF001
        pending, self._pending = self._pending, []
        for data in pending:
            self._write_record(data)

    def receive(self, ciphertext: bytes) -> None:
        """Feed TLS bytes from the peer (in control-packet order)."""
        self._check_usable()
        rl = self._rl
        if rl is not None:
            try:
                rl.receive(bytes(ciphertext))
            except RecordError as e:
                raise self._record_failure(e) from None
            return
        conn = self._conn
        assert conn is not None
        if ciphertext:
            data = bytes(ciphertext)
            conn.bio_write(data)
            self._drained = False
            if self._count_in is not None:
                hold = self._in_hold
                if hold is None:
                    self._count_in.feed(data)
                else:
                    hold += data
                    if len(hold) > _MAX_HOLD:
                        self._stop_counting()   # an odd handshake: OpenSSL keeps it
        if not self.handshake_complete:
            self._advance()
            hold = self._in_hold
            if self.handshake_complete and hold is not None and self._count_in is not None:
                self._in_hold = None
                rest = _bio_pending(conn._into_ssl)  # noqa: SLF001
                if _bio_get_mem_data is None:  # pragma: no cover - see _bio_pending
                    self._stop_counting()
                elif rest:
                    self._count_in.feed(bytes(hold[len(hold) - rest:]))
        self._give_counters_keys()

    def outgoing(self) -> bytes:
        """Drain everything TLS wants to send (possibly several records)."""
        rl = self._rl
        if rl is not None:
            return rl.outgoing()
        conn = self._conn
        assert conn is not None
        data = _drain(conn)
        cout = self._count_out
        if cout is not None:
            if data:
                self._give_counters_keys()
                if not self.handshake_complete:
                    cout.feed(data, handshake=True)
                elif self._out_hs:
                    hs, self._out_hs = self._out_hs, 0
                    cout.feed(data[:hs], handshake=True)
                    cout.feed(data[hs:])
                else:
                    cout.feed(data)
            if self.handshake_complete:
                self.release_openssl()
        return data

    # -- application data ----------------------------------------------------------

    def _write_record(self, data: bytes) -> None:
        assert self._conn is not None
        try:
            n = self._conn.write(data)
        except SSL.Error as e:
            raise self._fail(e) from None
        if n != len(data):  # pragma: no cover - memory BIOs accept everything
            raise TLSError(f"TLS wrote {n} of {len(data)} bytes")

    def write(self, plaintext: bytes) -> None:
        """Queue one message as ONE TLS record (one SSL_write), as OpenVPN reads it."""
        self._check_usable()
        if len(plaintext) > MAX_WRITE:
            raise LocalProtocolError(f"control message of {len(plaintext)} bytes exceeds "
                                     f"OpenVPN's {MAX_WRITE}-byte TLS read buffer")
        if not plaintext:
            return
        if not self.handshake_complete:
            self._pending.append(bytes(plaintext))
            return
        rl = self._rl
        if rl is not None:
            rl.write(bytes(plaintext))
            return
        self._write_record(bytes(plaintext))

    def read_record(self) -> bytes:
        """At most one record's plaintext (one SSL_read), b"" if none is ready."""
        self._check_usable()
        if not self.handshake_complete:
            return b""
        rl = self._rl
        if rl is not None:
            data = rl.read_record()
            if not data and rl.closed:
                self.closed = True
            return data
        assert self._conn is not None
        try:
            return self._conn.recv(_READ_CHUNK)
        except SSL.WantReadError:
            self._drained = True
            return b""
        except SSL.ZeroReturnError:
            self.closed = True
            return b""
        except SSL.Error as e:
            raise self._fail(e) from None

    def read(self) -> bytes:
        """All plaintext available now (may span several records)."""
        out = []
        while True:
            chunk = self.read_record()
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)

    def key_update(self, *, request: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate (record layer only: after the hand-off)."""
        self._check_usable()
        if self._rl is None:
            raise LocalProtocolError("key_update needs a session handed off to the record layer")
        self._rl.key_update(request=request)

    def close(self) -> None:
        """Send close_notify."""
        if self._failed is not None:
            return
        if self._rl is not None:
            self._rl.close()
            return
        assert self._conn is not None
        try:
            self._conn.shutdown()
        except SSL.Error:  # pragma: no cover - shutdown on a memory BIO wants no more
            pass

    # -- session facts ---------------------------------------------------------------

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 / RFC 8446 exporter with no context (OpenVPN's EKM)."""
        if not self.handshake_complete:
            raise LocalProtocolError("keying material can only be exported after the handshake")
        if not 0 < length <= 4096:
            raise ValidationError(f"EKM length must be 1..4096, got {length}")
        if self._rl is not None:
            return self._rl.export(label, length)
        assert self._conn is not None
        try:
            return self._conn.export_keying_material(label, length, None)
        except SSL.Error as e:  # pragma: no cover - OpenSSL refuses only odd labels
            raise TLSError(f"keying material export failed: {_ssl_error_text(e)}") from None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        if self._facts is not None:
            der = self._facts[3]
            return x509.load_der_x509_certificate(der) if der is not None else None
        assert self._conn is not None
        return self._conn.get_peer_certificate(as_cryptography=True)

    def _peer_facts(self) -> tuple[bytes | None, str | None]:
        """(DER, CN) of the peer certificate, looked up once the handshake is done."""
        if self._peer is not None:
            return self._peer
        assert self._conn is not None
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        facts = (None, None) if cert is None else \
            (cert.public_bytes(serialization.Encoding.DER), _common_name(cert))
        if self.handshake_complete:
            self._peer = facts
        return facts

    @property
    def peer_common_name(self) -> str | None:
        if self._facts is not None:
            return self._facts[4]
        return self._peer_facts()[1]

    @property
    def cipher_name(self) -> str | None:
        if self._facts is not None:
            return self._facts[1]
        assert self._conn is not None
        return self._conn.get_cipher_name()

    @staticmethod
    def _group_from(conn: SSL.Connection) -> str | None:
        try:
            return conn.get_group_name()
        except NotImplementedError:  # pragma: no cover - binding without SSL_get0_group_name
            return None

    @property
    def group_name(self) -> str | None:
        """The key-exchange group (``X25519``, ``secp384r1``…) once negotiated."""
        if not self.handshake_complete:
            return None
        if self._facts is not None:
            return self._facts[2]
        assert self._conn is not None
        return self._group_from(self._conn)

    @property
    def version(self) -> str | None:
        """``TLSv1.3`` / ``TLSv1.2`` once negotiated."""
        if not self.handshake_complete:
            return None
        if self._facts is not None:
            return self._facts[0]
        assert self._conn is not None
        return self._conn.get_protocol_version_name()


_CLIENT_SECRET = b"CLIENT_TRAFFIC_SECRET_0"
_SERVER_SECRET = b"SERVER_TRAFFIC_SECRET_0"
_EXPORTER_SECRET = b"EXPORTER_SECRET"
_HANDOFF_SECRETS = (_CLIENT_SECRET, _SERVER_SECRET, _EXPORTER_SECRET)
_HANDOFF_PREFIXES = tuple(name + b" " for name in _HANDOFF_SECRETS)
_bio_get_mem_data = getattr(_lib, "BIO_get_mem_data", None)
#: the peer's handshake bytes held to find the record boundary (a certificate chain
#: of several KB fits many times; more than this and the session stays in OpenSSL)
_MAX_HOLD = 256 * 1024


def _drain(conn: SSL.Connection) -> bytes:
    """Everything in the connection's outgoing memory BIO."""
    out = []
    if _bio_get_mem_data is not None:
        # ask the memory BIO how much it holds: an empty bio_read() costs an exception
        while (n := int(_bio_get_mem_data(conn._from_ssl, _ffi.NULL))) > 0:  # noqa: SLF001
            try:
                chunk = conn.bio_read(n)
            except SSL.Error:  # pragma: no cover - memory BIO read cannot fail otherwise
                break
            if not chunk:  # pragma: no cover - the BIO said it had n bytes
                break
            out.append(chunk)
    else:  # pragma: no cover - every pyOpenSSL binding has BIO_get_mem_data
        while True:
            try:
                chunk = conn.bio_read(_READ_CHUNK)
            except SSL.Error:
                break
            if not chunk:
                break
            out.append(chunk)
    return out[0] if len(out) == 1 else b"".join(out)


def _bio_pending(bio: Any) -> int:
    """Bytes waiting in a memory BIO (1 if the binding cannot tell: no hand-off then)."""
    if _bio_get_mem_data is None:  # pragma: no cover - every pyOpenSSL binding has it
        return 1
    return int(_bio_get_mem_data(bio, _ffi.NULL))

