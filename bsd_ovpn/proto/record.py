"""A small TLS 1.3 record layer (RFC 8446 §5, §4.6.3, §7) for established sessions.

Why: a server holds one TLS session per connected client for the whole life
of the key state, but after the handshake the control channel only carries a
few short messages (PUSH_REPLY, EXIT, RESTART...).  An OpenSSL ``SSL`` object
costs ~43 KiB of memory per client; the application-data record protection of
TLS 1.3 needs two traffic secrets, two sequence numbers and an AEAD.  So once
the handshake is over and the connection is quiescent, :class:`TLSChannel
<bsd_ovpn.proto.tls.TLSChannel>` hands the session over to :class:`RecordLayer`
and frees the ``SSL`` object (TLS 1.2 sessions stay in OpenSSL).

Two pieces live here:

* :class:`RecordCounter` watches the records of one direction while OpenSSL
  still runs the session and counts those protected with the application
  traffic key (by trial decryption, never by guessing), which gives the next
  sequence number at the hand-off.  It gives up (``lost``) on anything it
  cannot account for -- a KeyUpdate, an alert, a record that stops
  decrypting -- and then the hand-off simply does not happen.
* :class:`RecordLayer` protects and unprotects records after the hand-off:
  per-record nonce, inner content type, padding removal, alerts (close_notify,
  fatal alerts both ways), KeyUpdate in both directions, the record size
  limits, and the TLS 1.3 exporter (RFC 8446 §7.5) for OpenVPN's EKM and
  dynamic tls-crypt keys.  Anything unexpected is a :class:`RecordError` that
  says what the peer did wrong; a fatal alert is queued for the peer first.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_CIPHERTEXT", "MAX_PLAINTEXT", "SUITES", "RecordCounter", "RecordError",
           "RecordLayer", "hkdf_expand_label", "tls13_exporter"]

#: RFC 8446 §5.1 / §5.2 limits.
MAX_PLAINTEXT = 1 << 14
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
_HEADER = 5
_TAG = 16
# content types
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
# handshake types seen after the handshake
HS_NEW_SESSION_TICKET = 4
HS_KEY_UPDATE = 24
# alert descriptions we send or name
ALERT_CLOSE_NOTIFY = 0
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_BAD_RECORD_MAC = 20
ALERT_RECORD_OVERFLOW = 22
ALERT_ILLEGAL_PARAMETER = 47
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_USER_CANCELED = 90
_ALERT_NAMES = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
    47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security",
    80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
    109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
    113: "bad_certificate_status_response", 115: "unknown_psk_identity",
    116: "certificate_required", 120: "no_application_protocol",
}
_MAX_HANDSHAKE_BUFFER = 1 << 16       # a post-handshake message larger than this is refused
_SEQ_LIMIT = (1 << 64) - 1

#: TLS 1.3 cipher suites we can carry on: OpenSSL name -> (hash, key length, AEAD class).
SUITES: dict[str, tuple[str, int, type]] = {
    "TLS_AES_128_GCM_SHA256": ("sha256", 16, AESGCM),
    "TLS_AES_256_GCM_SHA384": ("sha384", 32, AESGCM),
    "TLS_CHACHA20_POLY1305_SHA256": ("sha256", 32, ChaCha20Poly1305),
}


class RecordError(RemoteProtocolError):
    """The peer sent something our TLS 1.3 record layer must refuse (the text says what).

    ``peer_alert`` is the description code when the peer itself sent a fatal
    alert (it refused us), ``None`` when we refused the peer.
    """

    def __init__(self, message: str, *, peer_alert: int | None = None) -> None:
        super().__init__(message)
        self.peer_alert = peer_alert


def alert_name(desc: int) -> str:
    return _ALERT_NAMES.get(desc, f"alert {desc}")


# --------------------------------------------------------------------------- key schedule

# hashlib constructors: hmac with a constructor is ~2x faster than with a name
_HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384}


_KDF_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}


def _hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3): cryptography's, a few times faster than an HMAC loop
    in Python for the 256-byte EKM exports every new session makes."""
    return HKDFExpand(_KDF_HASHES[hash_name](), length, info).derive(prk)


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes,
                      length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + bytes((len(context),)) \
        + context
    return _hkdf_expand(hash_name, secret, info, length)


def tls13_exporter(hash_name: str, exporter_secret: bytes, label: bytes, context: bytes,
                   length: int) -> bytes:
    """TLS-Exporter (RFC 8446 §7.5) from the exporter master secret.

    OpenSSL's ``SSL_export_keying_material`` without a context uses an empty
    one in TLS 1.3, which is what OpenVPN's EKM asks for.
    """
    ctor = _HASHES[hash_name]
    empty = ctor(b"").digest()
    derived = hkdf_expand_label(hash_name, exporter_secret, label, empty, len(empty))
    return hkdf_expand_label(hash_name, derived, b"exporter", ctor(context).digest(), length)


def _label_info(label: bytes, length: int) -> bytes:
    """HkdfLabel with an empty context, plus HKDF-Expand's block counter 1."""
    full = b"tls13 " + label
    return length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00\x01"


_KEY_INFO = {n: _label_info(b"key", n) for n in (16, 32)}   # by key length
_IV_INFO = _label_info(b"iv", 12)


class _Keys:
    """Write or read protection of one direction: traffic secret, key, iv, sequence number."""

    __slots__ = ("hash_name", "key_len", "aead_cls", "secret", "key", "iv", "seq", "aead")

    def __init__(self, suite: str, secret: bytes, seq: int = 0) -> None:
        self.hash_name, self.key_len, self.aead_cls = SUITES[suite]
        self.seq = seq
        self.aead: Any = None       # a cached AEAD object (counting only: see seal())
        self._set(secret)

    def _set(self, secret: bytes) -> None:
        # HKDF-Expand-Label(secret, "key"/"iv", "", n): one HMAC block each (hot: every
        # handshake derives four of these), same result as hkdf_expand_label()
        self.secret = secret
        self.aead = None
        keyed = hmac.new(secret, digestmod=_HASHES[self.hash_name])
        k = keyed.copy()
        k.update(_KEY_INFO[self.key_len])
        self.key = k.digest()[:self.key_len]
        keyed.update(_IV_INFO)
        self.iv = int.from_bytes(keyed.digest()[:12], "big")

    def update(self) -> None:
        """The next generation of traffic secret (KeyUpdate, §7.2); sequence restarts at 0."""
        self._set(hkdf_expand_label(self.hash_name, self.secret, b"traffic upd", b"",
                                    len(self.secret)))
        self.seq = 0

    def nonce(self) -> bytes:
        return (self.iv ^ self.seq).to_bytes(12, "big")

    def seal(self, content_type: int, data: bytes) -> bytes:
        if self.seq >= _SEQ_LIMIT:
            raise LocalProtocolError("TLS record sequence number exhausted (key update needed)")
        inner = data + bytes((content_type,))
        header = bytes((CT_APPLICATION_DATA, 3, 3)) + (len(inner) + _TAG).to_bytes(2, "big")
        # The AEAD object is made per record: keeping one per client would cost far
        # more memory than the few control messages after a handshake cost CPU.
        ct = (self.aead or self.aead_cls(self.key)).encrypt(self.nonce(), inner, header)
        self.seq += 1
        return header + ct

    def open(self, header: bytes, body: bytes) -> bytes | None:
        """The inner plaintext, or None if the record does not authenticate with this key."""
        try:
            inner = (self.aead or self.aead_cls(self.key)).decrypt(self.nonce(), body, header)
        except InvalidTag:
            return None
        self.seq += 1
        return inner


def _split_inner(inner: bytes) -> tuple[int, bytes] | None:
    """(content type, content) of a TLSInnerPlaintext, None if it is all padding."""
    end = len(inner)
    while end and inner[end - 1] == 0:
        end -= 1
    if not end:
        return None
    return inner[end - 1], inner[:end - 1]


# --------------------------------------------------------------------------- counting

class RecordCounter:
    """Counts one direction's application-epoch records while OpenSSL runs the session.

    Every byte that passes between OpenSSL and the wire in this direction is
    fed here, with ``handshake=True`` for bytes the caller knows to be
    handshake-epoch records (:class:`~bsd_ovpn.proto.tls.TLSChannel` knows
    the record boundary where the handshake ended; see there).

    ``verify=True`` (the peer's direction): encrypted records seen before the
    traffic secret is known wait; each one is trial-decrypted with the
    application traffic key at the next sequence number: success counts it,
    failure before the first success is a handshake record.  After the first
    success every record must decrypt, and none may be a KeyUpdate or an
    alert; otherwise ``lost`` is set for good and the session is never
    handed off.

    ``verify=False`` (our own direction): OpenSSL wrote these records for us,
    so they are counted by their headers alone.  What could make a count of
    ours wrong is OpenSSL sending a KeyUpdate or an alert on its own: it does
    the first only in answer to the peer's KeyUpdate (which the peer's
    counter catches) and the second only when the session fails or closes
    (no hand-off then).  This saves a key schedule and an AEAD pass per
    record on every handshake.
    """

    __slots__ = ("_buf", "_waiting", "_waiting_bytes", "keys", "count", "lost", "started",
                 "verify", "suite", "secret")

    def __init__(self, *, verify: bool = True) -> None:
        self._buf = bytearray()
        self._waiting: list[tuple[bytes, bytes]] = []
        self._waiting_bytes = 0
        self.keys: _Keys | None = None
        self.count = 0
        self.lost: str | None = None
        self.started = False
        self.verify = verify
        self.suite: str | None = None
        self.secret: bytes | None = None

    @property
    def idle(self) -> bool:
        """No partial record and nothing waiting for a key."""
        return not self._buf and not self._waiting

    @property
    def ready(self) -> bool:
        """The traffic secret is known and the count can be trusted."""
        return self.secret is not None and self.lost is None

    def set_secret(self, suite: str, secret: bytes) -> None:
        if self.secret is not None or self.lost is not None:
            return
        if suite not in SUITES:
            self.lost = f"cipher suite {suite} is not supported by the record layer"
            return
        self.suite, self.secret = suite, secret
        if not self.verify:
            return
        self.keys = _Keys(suite, secret)
        self.keys.aead = self.keys.aead_cls(self.keys.key)    # several records to check
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        for header, body in waiting:
            self._check(header, body)

    def take_keys(self) -> _Keys:
        """The traffic keys at the next sequence number (for the hand-off)."""
        if not self.ready:
            raise LocalProtocolError("TLS record layer: counter without a secret or out of step")
        keys = self.keys
        if keys is None:
            assert self.suite is not None and self.secret is not None
            keys = self.keys = _Keys(self.suite, self.secret, self.count)
        return keys

    def feed(self, data: bytes, *, handshake: bool = False) -> None:
        """Account for ``data`` (stream order).

        ``handshake``: the caller knows that the records completed by ``data``
        were written before OpenSSL finished its handshake, so none of them
        can be an application-epoch record (saves their trial decryption).
        """
        if self.lost is not None or not data:
            return
        self._buf += data
        if len(self._buf) > _HEADER + MAX_CIPHERTEXT + 2048:
            self.lost = "record larger than TLS allows"
            self._buf = bytearray()
            return
        buf = self._buf
        pos = 0
        n = len(buf)
        # records are sliced out only when they must be decrypted (or wait to be)
        while n - pos >= _HEADER:
            end = pos + _HEADER + ((buf[pos + 3] << 8) | buf[pos + 4])
            if end > n:
                break
            ctype = buf[pos]
            start, pos = pos, end
            if ctype != CT_APPLICATION_DATA:
                if self.started:
                    self.lost = f"plaintext record type {ctype} after the handshake"
                continue            # ClientHello/ServerHello, change_cipher_spec, plain alert
            if handshake:
                if self.started:
                    self.lost = "handshake record after an application record"
                continue
            if not self.verify:
                self.started = True
                self.count += 1
                if self.keys is not None:
                    self.keys.seq += 1
                continue
            header = bytes(buf[start:start + _HEADER])
            body = bytes(buf[start + _HEADER:end])
            if self.keys is None:
                self._waiting.append((header, body))
                self._waiting_bytes += len(body)
                if self._waiting_bytes > 4 * MAX_CIPHERTEXT:
                    self.lost = "too many encrypted records before the traffic secret"
                continue
            self._check(header, body)
            if self.lost is not None:
                break
        if self.lost is not None:
            self._buf = bytearray()
        elif pos:
            del buf[:pos]

    def _check(self, header: bytes, body: bytes) -> None:
        keys = self.keys
        assert keys is not None
        inner = keys.open(header, body)
        if inner is None:
            if self.started:
                self.lost = "an application-epoch record did not decrypt"
            return
        self.started = True
        self.count = keys.seq
        split = _split_inner(inner)
        if split is None:
            self.lost = "an all-padding record"
        elif split[0] == CT_ALERT:
            self.lost = "an alert"
        elif split[0] == CT_HANDSHAKE and _has_key_update(split[1]):
            self.lost = "a KeyUpdate"


def _has_key_update(data: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(data):
        if data[pos] == HS_KEY_UPDATE:
            return True
        pos += 4 + int.from_bytes(data[pos + 1:pos + 4], "big")
    return pos != len(data)        # a fragment: be conservative


# --------------------------------------------------------------------------- record layer

class RecordLayer:
    """TLS 1.3 application-epoch record protection for one established session.

    Sans-IO like the rest: :meth:`receive` takes ciphertext in stream order,
    :meth:`read_record` hands out one record's plaintext, :meth:`write`
    protects one message as one record, :meth:`outgoing` drains what must be
    sent.  ``read_seq``/``write_seq`` are the sequence numbers of the next
    record of each direction under the *_0 traffic secrets.
    """

    __slots__ = ("_read", "_write", "_exporter", "_in", "_out", "_plain", "_hs", "closed",
                 "close_sent", "failed", "server", "got_data")

    def __init__(self, suite: str, *, server: bool, read_secret: bytes, write_secret: bytes,
                 read_seq: int, write_seq: int, exporter_secret: bytes) -> None:
        if suite not in SUITES:
            raise LocalProtocolError(f"TLS record layer: unsupported cipher suite {suite}")
        self.server = server
        self._read = _Keys(suite, read_secret, read_seq)
        self._write = _Keys(suite, write_secret, write_seq)
        self._init_rest(exporter_secret)

    @classmethod
    def from_counters(cls, *, server: bool, read: RecordCounter, write: RecordCounter,
                      exporter_secret: bytes) -> RecordLayer:
        """Take over the keys (and so the sequence numbers) two counters arrived at."""
        self = cls.__new__(cls)
        self.server = server
        self._read, self._write = read.take_keys(), write.take_keys()
        self._read.aead = self._write.aead = None    # ~memory: made per record from now on
        self._init_rest(exporter_secret)
        return self

    def _init_rest(self, exporter_secret: bytes) -> None:
        self._exporter = exporter_secret
        self._in = bytearray()
        self._out: list[bytes] = []
        self._plain: list[bytes] = []      # a list: an empty deque costs ~600 bytes
        self._hs = b""
        self.closed = False          # the peer sent close_notify
        self.close_sent = False
        self.failed: RecordError | None = None
        self.got_data = False        # application data arrived since the hand-off

    # -- errors ----------------------------------------------------------------

    def _fatal(self, desc: int, message: str) -> RecordError:
        """Queue a fatal alert for the peer (if we still may send) and return the error."""
        if not self.close_sent:
            self._out.append(self._write.seal(CT_ALERT, bytes((2, desc))))
            self.close_sent = True
        exc = RecordError(f"TLS: {message} (sent {alert_name(desc)} alert)")
        self.failed = exc
        return exc

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise RecordError(f"TLS session already failed: {self.failed}")

    # -- receiving ---------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Feed ciphertext from the peer; decrypts every complete record."""
        self._check_usable()
        if self.closed:
            return                   # anything after close_notify is ignored (§6.1)
        self._in += data
        while len(self._in) >= _HEADER:
            header = bytes(self._in[:_HEADER])
            length = int.from_bytes(header[3:5], "big")
            if header[0] != CT_APPLICATION_DATA:
                if header[0] == CT_CHANGE_CIPHER_SPEC:
                    raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                      "peer sent change_cipher_spec after the handshake")
                raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                  f"peer sent an unprotected record of type {header[0]} after "
                                  f"the handshake")
            if header[1:3] != b"\x03\x03":
                raise self._fatal(ALERT_PROTOCOL_VERSION,
                                  f"record version {header[1:3].hex()} is not 0303")
            if length > MAX_CIPHERTEXT:
                raise self._fatal(ALERT_RECORD_OVERFLOW,
                                  f"record of {length} bytes exceeds {MAX_CIPHERTEXT}")
            if length < _TAG + 1:
                raise self._fatal(ALERT_DECODE_ERROR, f"record of {length} bytes is too short")
            if len(self._in) < _HEADER + length:
                return
            body = bytes(self._in[_HEADER:_HEADER + length])
            del self._in[:_HEADER + length]
            inner = self._read.open(header, body)
            if inner is None:
                raise self._fatal(ALERT_BAD_RECORD_MAC,
                                  f"record {self._read.seq} does not authenticate (tampered, "
                                  f"or keys out of step)")
            if len(inner) > MAX_PLAINTEXT + 1:
                raise self._fatal(ALERT_RECORD_OVERFLOW,
                                  f"record plaintext of {len(inner)} bytes exceeds "
                                  f"{MAX_PLAINTEXT + 1}")
            split = _split_inner(inner)
            if split is None:
                raise self._fatal(ALERT_UNEXPECTED_MESSAGE, "record with no content type")
            ctype, content = split
            if self._hs and ctype != CT_HANDSHAKE:
                raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                  "handshake message interrupted by another record type")
            if ctype == CT_APPLICATION_DATA:
                if content:
                    self._plain.append(content)
                    self.got_data = True
            elif ctype == CT_ALERT:
                self._alert(content)
                if self.closed:
                    self._in = bytearray()
                    return
            elif ctype == CT_HANDSHAKE:
                if not content:
                    raise self._fatal(ALERT_UNEXPECTED_MESSAGE, "empty handshake record")
                self._handshake(content)
            else:
                raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                  f"record of content type {ctype} after the handshake")

    def _alert(self, content: bytes) -> None:
        if len(content) != 2:
            raise self._fatal(ALERT_DECODE_ERROR, f"alert record of {len(content)} bytes (not 2)")
        level, desc = content
        if desc == ALERT_CLOSE_NOTIFY:
            self.closed = True
            return
        if desc == ALERT_USER_CANCELED:
            return                   # a close_notify follows
        exc = RecordError(f"TLS: peer sent fatal alert {alert_name(desc)} "
                          f"(level {level})", peer_alert=desc)
        self.failed = exc
        self.close_sent = True       # no alert in reply to a fatal alert
        raise exc

    def _handshake(self, content: bytes) -> None:
        buf = self._hs + content
        if len(buf) > _MAX_HANDSHAKE_BUFFER:
            raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                              f"post-handshake message over {_MAX_HANDSHAKE_BUFFER} bytes")
        pos = 0
        while len(buf) - pos >= 4:
            mtype = buf[pos]
            mlen = int.from_bytes(buf[pos + 1:pos + 4], "big")
            if len(buf) - pos - 4 < mlen:
                break
            body = buf[pos + 4:pos + 4 + mlen]
            pos += 4 + mlen
            if mtype == HS_KEY_UPDATE:
                if mlen != 1:
                    raise self._fatal(ALERT_DECODE_ERROR, f"KeyUpdate of {mlen} bytes (not 1)")
                if body[0] not in (0, 1):
                    raise self._fatal(ALERT_ILLEGAL_PARAMETER,
                                      f"KeyUpdate request_update {body[0]} (not 0 or 1)")
                if pos != len(buf):
                    # the key changes after this message: it must end the record (§5.1)
                    raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                      "data after a KeyUpdate in the same record")
                self._read.update()
                if body[0] == 1 and not self.close_sent:
                    self._send_key_update(False)
            elif mtype == HS_NEW_SESSION_TICKET and not self.server:
                pass                 # we never resume sessions: a ticket is ignored
            else:
                raise self._fatal(ALERT_UNEXPECTED_MESSAGE,
                                  f"unexpected handshake message type {mtype} after the "
                                  f"handshake")
        self._hs = bytes(buf[pos:])

    def read_record(self) -> bytes:
        """One record's application data, b"" if none is waiting."""
        self._check_usable()
        return self._plain.pop(0) if self._plain else b""

    @property
    def pending(self) -> int:
        """Plaintext bytes received and not read yet."""
        return sum(len(p) for p in self._plain)

    # -- sending -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Protect ``data`` as one application-data record (at most 2^14 bytes)."""
        self._check_usable()
        if self.close_sent:
            raise LocalProtocolError("TLS: write after close_notify was sent")
        if len(data) > MAX_PLAINTEXT:
            raise LocalProtocolError(f"TLS record of {len(data)} bytes exceeds {MAX_PLAINTEXT}")
        self._out.append(self._write.seal(CT_APPLICATION_DATA, bytes(data)))

    def _send_key_update(self, request: bool) -> None:
        self._out.append(self._write.seal(CT_HANDSHAKE, bytes((HS_KEY_UPDATE, 0, 0, 1,
                                                               int(request)))))
        self._write.update()

    def key_update(self, *, request: bool = False) -> None:
        """Send a KeyUpdate and switch our sending key (``request``: ask the peer to too)."""
        self._check_usable()
        if self.close_sent:
            raise LocalProtocolError("TLS: key update after close_notify was sent")
        self._send_key_update(request)

    def close(self) -> None:
        """Send close_notify (once); no data can be written afterwards."""
        if self.close_sent or self.failed is not None:
            return
        self._out.append(self._write.seal(CT_ALERT, bytes((1, ALERT_CLOSE_NOTIFY))))
        self.close_sent = True

    def outgoing(self) -> bytes:
        """All protected records waiting to be sent."""
        if not self._out:
            return b""
        out, self._out = b"".join(self._out), []
        return out

    # -- exporter ----------------------------------------------------------------

    def export(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        return tls13_exporter(self._read.hash_name, self._exporter, label, context, length)

    @property
    def sequence_numbers(self) -> tuple[int, int]:
        """(read, write) sequence numbers of the next record (tests, diagnostics)."""
        return self._read.seq, self._write.seq
