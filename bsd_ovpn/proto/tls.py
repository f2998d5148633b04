"""TLS for the OpenVPN control channel over memory BIOs (pyOpenSSL), sans-IO.

The control channel carries an ordinary TLS stream inside reliable control
packets (protocol spec §7).  We need three things the stdlib ``ssl`` module
lacks or makes awkward: RFC 5705 keying-material export (EKM, §9.2), a verify
callback to add OpenVPN's own checks (``remote-cert-tls``,
``verify-x509-name``) with messages a person can act on, and exact control
over record boundaries (each KM2 / control message is ONE ``SSL_write``, §4.2).
pyOpenSSL's ``Connection(ctx, None)`` is a pure memory-BIO TLS object.

Contexts are expensive (CA store, CRLs, key parsing), so :class:`TLSConfig`
builds one per role and reuses it for every connection (a server with 1000
clients has one context).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError, ValidationError

__all__ = [
    "MAX_WRITE", "TLSChannel", "TLSConfig", "TLSConfigError", "TLSError", "VerifyX509Name",
    "format_subject",
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
try:  # pragma: no branch - depends on the installed binding
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
    _verify_error_string = _lib.X509_verify_cert_error_string
except (ImportError, AttributeError):  # pragma: no cover
    _verify_error_string = None


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
    ``verify_client_cert`` its ``--verify-client-cert none|optional|require``
    (servers only).
    """

    ca: bytes | str
    cert: bytes | str | None = None
    key: bytes | str | None = None
    crl: Sequence[bytes | str] = ()
    verify_x509_name: VerifyX509Name | tuple[str, str] | str | None = None
    remote_cert_tls: str | None = None
    tls_version_min: str = "1.2"
    verify_client_cert: str = "require"
    _contexts: dict[bool, SSL.Context] = field(default_factory=dict, init=False, repr=False)

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
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every key_state: full handshake
        ctx.set_cipher_list(_TLS12_CIPHERS)
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
        return ctx

    def _verify_callback(self, conn: SSL.Connection, cert: crypto.X509, errnum: int,
                         depth: int, ok: int) -> bool:
        """OpenSSL's chain verdict plus OpenVPN's leaf checks; records why it failed."""
        ref = conn.get_app_data()
        channel = ref() if isinstance(ref, weakref.ref) else None
        try:
            ccert = cert.to_cryptography()
            if not ok:
                reason = (f"certificate verify failed: {_verify_error(errnum)} (depth {depth}, "
                          f"subject {format_subject(ccert.subject)})")
                if errnum == _X509_V_ERR_INVALID_PURPOSE:
                    role = "client" if conn.get_context() is self._contexts.get(True) \
                        else "server"
                    reason += (f": its extendedKeyUsage does not allow use as a TLS {role} "
                               "certificate")
            elif depth == 0:
                reason = self._leaf_problem(ccert)
            else:
                reason = None
        except Exception as e:  # never let an exception escape into OpenSSL
            reason = f"certificate verify failed: cannot inspect certificate ({e})"
        if reason is not None:
            if isinstance(channel, TLSChannel) and channel._verify_failure is None:
                channel._verify_failure = reason
            return False
        return True

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
        vxn = self.verify_x509_name
        if isinstance(vxn, VerifyX509Name):
            return vxn.mismatch(cert)
        return None


# --------------------------------------------------------------------------- channel

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
    """

    def __init__(self, config: TLSConfig, *, server: bool) -> None:
        self.config = config
        self.server = server
        self._conn = SSL.Connection(config.context(server), None)
        # A weak reference: no cycle, so a dropped channel frees its SSL at once.
        self._conn.set_app_data(weakref.ref(self))
        self._verify_failure: str | None = None
        self._pending: list[bytes] = []
        self._failed: TLSError | None = None
        self.handshake_complete = False
        self.closed = False
        if server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            self._advance()  # produce the ClientHello now

    # -- errors ----------------------------------------------------------------

    def _fail(self, err: SSL.Error) -> TLSError:
        if self._verify_failure is not None:
            exc = TLSError(self._verify_failure)
        else:
            exc = TLSError(_describe_failure(_ssl_error_text(err), self.server))
        self._failed = exc
        return exc

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise TLSError(f"TLS session already failed: {self._failed}")

    # -- handshake ---------------------------------------------------------------

    def _advance(self) -> None:
        if self.handshake_complete:
            return
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            raise self._fail(e) from None
        self.handshake_complete = True
        pending, self._pending = self._pending, []
        for data in pending:
            self._write_record(data)

    def receive(self, ciphertext: bytes) -> None:
        """Feed TLS bytes from the peer (in control-packet order)."""
        self._check_usable()
        if ciphertext:
            self._conn.bio_write(bytes(ciphertext))
        self._advance()

    def outgoing(self) -> bytes:
        """Drain everything TLS wants to send (possibly several records)."""
        out = []
        while True:
            try:
                chunk = self._conn.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.Error:  # pragma: no cover - memory BIO read cannot fail otherwise
                break
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)

    # -- application data ----------------------------------------------------------

    def _write_record(self, data: bytes) -> None:
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
        self._write_record(bytes(plaintext))

    def read_record(self) -> bytes:
        """At most one record's plaintext (one SSL_read), b"" if none is ready."""
        self._check_usable()
        if not self.handshake_complete:
            return b""
        try:
            return self._conn.recv(_READ_CHUNK)
        except SSL.WantReadError:
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

    # -- session facts ---------------------------------------------------------------

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 / RFC 8446 exporter with no context (OpenVPN's EKM)."""
        if not self.handshake_complete:
            raise LocalProtocolError("keying material can only be exported after the handshake")
        if not 0 < length <= 4096:
            raise ValidationError(f"EKM length must be 1..4096, got {length}")
        try:
            return self._conn.export_keying_material(label, length, None)
        except SSL.Error as e:  # pragma: no cover - OpenSSL refuses only odd labels
            raise TLSError(f"keying material export failed: {_ssl_error_text(e)}") from None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self._conn.get_peer_certificate(as_cryptography=True)

    @property
    def peer_common_name(self) -> str | None:
        cert = self.peer_certificate
        return _common_name(cert) if cert is not None else None

    @property
    def cipher_name(self) -> str | None:
        return self._conn.get_cipher_name()

    @property
    def version(self) -> str | None:
        """``TLSv1.3`` / ``TLSv1.2`` once negotiated."""
        v = self._conn.get_protocol_version_name()
        return v if self.handshake_complete else None
