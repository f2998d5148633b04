"""OpenVPN key files: static keys (tls-auth / tls-crypt) and tls-crypt-v2 keys (spec §5).

The formats are byte-for-byte those of ``openvpn --genkey`` so keys move
freely between stock OpenVPN and bsd_ovpn in both directions: the
"OpenVPN Static key V1" hex block, and the PEM blocks "OpenVPN tls-crypt-v2
server key" / "OpenVPN tls-crypt-v2 client key".  The client key's wrapped
part (WKc) is built and opened here because only the server key can do it
and a key-generation tool needs it too, not only the protocol engine.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
import struct
import time
from typing import Union

from bsd_ovpn.errors import ConfigError, RemoteProtocolError
from bsd_ovpn.proto.fastcrypto import AnyCtrHmacKey, CtlCryptAuthError, CtrHmacKey

__all__ = [
    "KeyFileError", "WKcError", "StaticKey", "TLSCryptV2ServerKey", "TLSCryptV2ClientKey",
    "wrap_client_key", "unwrap_client_key", "key_indices", "read_key_text",
    "parse_tls_crypt_v2_key", "METADATA_TYPE_USER", "METADATA_TYPE_TIMESTAMP",
    "user_metadata", "timestamp_metadata", "describe_metadata",
    "MAX_WKC_LEN", "MAX_METADATA_LEN", "TAG_SIZE", "GENKEY_KINDS", "genkey",
    "generate_tls_crypt_key", "generate_tls_auth_key", "generate_tls_crypt_v2_server_key",
    "generate_tls_crypt_v2_client_key",
]

log = logging.getLogger(__name__)

STATIC_KEY_HEAD = "-----BEGIN OpenVPN Static key V1-----"
STATIC_KEY_FOOT = "-----END OpenVPN Static key V1-----"
V2_SERVER_PEM = "OpenVPN tls-crypt-v2 server key"
V2_CLIENT_PEM = "OpenVPN tls-crypt-v2 client key"

KEY2_SIZE = 256              # struct key2: two struct key
KEY_SIZE = 128               # struct key: 64-byte cipher slot + 64-byte hmac slot
SLOT_SIZE = 64
TAG_SIZE = 32                # HMAC-SHA256 tag / synthetic IV source
MAX_WKC_LEN = 1024
MAX_METADATA_LEN = MAX_WKC_LEN - (KEY2_SIZE + TAG_SIZE + 2)    # 734, type byte included
METADATA_TYPE_USER = 0x00
METADATA_TYPE_TIMESTAMP = 0x01


class KeyFileError(ConfigError):
    """A key file (or inline key block) is malformed or of the wrong kind."""


class WKcError(RemoteProtocolError):
    """A wrapped client key did not unwrap: wrong server key, tampered, or malformed.

    Raised from the network path (the WKc arrives in a packet), hence a
    remote protocol error; the wrapping layer turns it into a silent drop.
    """


def key_indices(direction: int | None) -> tuple[int, int]:
    """``(send_index, receive_index)`` into a key2 for a key direction (spec §5.1)."""
    if direction is None:
        return 0, 0
    if direction == 0:
        return 0, 1
    if direction == 1:
        return 1, 0
    raise ValueError(f"key direction must be 0, 1 or None, not {direction!r}")


def read_key_text(path: str | os.PathLike[str]) -> str:
    """Read a key file, warning when others may read it (as OpenVPN does for secrets)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read((1 << 20) + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror or exc}", path) from None
    if len(raw) > 1 << 20:
        raise KeyFileError("larger than 1 MiB: not a key file", path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is group or others accessible (mode %o); chmod 600 it",
                    path, stat.S_IMODE(st.st_mode))
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"non-ASCII byte at offset {exc.start}", path) from None


def _write_secret(path: str | os.PathLike[str], text: str) -> None:
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)


def _pem_encode(name: str, data: bytes) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {name}-----\n" + "".join(ln + "\n" for ln in lines) + \
        f"-----END {name}-----\n"


def _pem_decode(text: str, name: str, source: str | None) -> bytes:
    head, foot = f"-----BEGIN {name}-----", f"-----END {name}-----"
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        if line.strip() == head:
            start = i
            break
    if start is None:
        raise KeyFileError(f"no '{head}' line found", source)
    body = []
    for j in range(start + 1, len(lines)):
        line = lines[j].strip()
        if line == foot:
            break
        if line.startswith("-----"):
            raise KeyFileError(f"unexpected '{line}' inside {name}", source, j + 1)
        body.append(line)
    else:
        raise KeyFileError(f"no '{foot}' line found", source)
    try:
        return base64.b64decode("".join(body), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"bad base64 in {name}: {exc}", source) from None


class StaticKey:
    """A 256-byte key2: ``keys[0].cipher, keys[0].hmac, keys[1].cipher, keys[1].hmac``."""

    __slots__ = ("_data", "_tls_crypt")
    SIZE = KEY2_SIZE

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if len(data) != KEY2_SIZE:
            raise KeyFileError(f"a static key is {KEY2_SIZE} bytes, got {len(data)}")
        self._data = data
        self._tls_crypt: dict[bool, tuple[AnyCtrHmacKey, AnyCtrHmacKey]] = {}

    def tls_crypt_keys(self, server: bool) -> tuple[AnyCtrHmacKey, AnyCtrHmacKey]:
        """(send, receive) tls-crypt keys of one side, prepared once per StaticKey.

        A server's every session wraps with its one ``--tls-crypt`` key; the
        prepared keys hold no per-packet state (replay state lives in the
        wraps), so all of them share one pair: ~1.3 KiB of OpenSSL contexts
        each, which per session would be ~3 KiB per client, and ~2.5 us to
        make, which per session was four times per handshake.  Fixed
        directions: servers send with keys[0] and receive with keys[1].
        """
        pair = self._tls_crypt.get(server)
        if pair is None:
            # keys[i].cipher[:32] is data[128i:128i+32], keys[i].hmac[:32] data[128i+64:128i+96]
            d = self._data
            send, recv = (0, 128) if server else (128, 0)
            pair = self._tls_crypt[server] = (
                CtrHmacKey(d[send:send + 32], d[send + 64:send + 96]),
                CtrHmacKey(d[recv:recv + 32], d[recv + 64:recv + 96]))
        return pair

    @property
    def data(self) -> bytes:
        return self._data

    def __bytes__(self) -> bytes:
        return self._data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticKey) and hmac.compare_digest(self._data, other._data)

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:  # never print key material
        return f"StaticKey(sha256:{hashlib.sha256(self._data).hexdigest()[:12]})"

    def cipher(self, i: int) -> bytes:
        """64-byte cipher slot of ``keys[i]``; algorithms use a prefix of it."""
        if i not in (0, 1):
            raise IndexError(f"key index {i} is not 0 or 1")
        return self._data[i * KEY_SIZE:i * KEY_SIZE + SLOT_SIZE]

    def hmac(self, i: int) -> bytes:
        """64-byte HMAC slot of ``keys[i]``."""
        if i not in (0, 1):
            raise IndexError(f"key index {i} is not 0 or 1")
        return self._data[i * KEY_SIZE + SLOT_SIZE:(i + 1) * KEY_SIZE]

    def xor(self, other: bytes) -> StaticKey:
        """Byte-wise XOR with 256 bytes (dynamic tls-crypt, spec §5.5)."""
        other = bytes(other)
        if len(other) != KEY2_SIZE:
            raise KeyFileError(f"XOR operand must be {KEY2_SIZE} bytes, got {len(other)}")
        mixed = int.from_bytes(self._data, "big") ^ int.from_bytes(other, "big")
        return StaticKey(mixed.to_bytes(KEY2_SIZE, "big"))

    @classmethod
    def generate(cls) -> StaticKey:
        return cls(os.urandom(KEY2_SIZE))

    @classmethod
    def parse(cls, text: str, source: str | None = None) -> StaticKey:
        """Parse the "OpenVPN Static key V1" format (leading comments allowed)."""
        lines = text.splitlines()
        start = None
        for i, line in enumerate(lines):
            if line.startswith(STATIC_KEY_HEAD):
                start = i
                break
        if start is None:
            raise KeyFileError(f"no '{STATIC_KEY_HEAD}' line found", source)
        out = bytearray()
        half: str | None = None
        finished = False
        for j in range(start + 1, len(lines)):
            line = lines[j]
            if line.startswith("-"):
                if not line.startswith(STATIC_KEY_FOOT):
                    raise KeyFileError(f"expected '{STATIC_KEY_FOOT}'", source, j + 1)
                finished = True
                break
            for col, ch in enumerate(line):
                if ch.isspace():
                    continue
                if ch not in "0123456789abcdefABCDEF":
                    raise KeyFileError(f"non-hex character {ch!r} in column {col + 1}",
                                       source, j + 1)
                if len(out) >= KEY2_SIZE:
                    raise KeyFileError(f"more than {KEY2_SIZE} bytes of key data", source, j + 1)
                if half is None:
                    half = ch
                else:
                    out.append(int(half + ch, 16))
                    half = None
        if not finished:
            raise KeyFileError(f"no '{STATIC_KEY_FOOT}' line found", source)
        if len(out) != KEY2_SIZE or half is not None:
            raise KeyFileError(f"static key has {len(out)} bytes, needs {KEY2_SIZE} "
                               "(a 2048-bit key as made by openvpn --genkey)", source)
        return cls(bytes(out))

    def format(self) -> str:
        """The text ``openvpn --genkey secret|tls-auth|tls-crypt`` writes."""
        hexed = self._data.hex()
        body = "".join(hexed[i:i + 32] + "\n" for i in range(0, len(hexed), 32))
        return (f"#\n# {KEY2_SIZE * 8} bit OpenVPN static key\n#\n"
                f"{STATIC_KEY_HEAD}\n{body}{STATIC_KEY_FOOT}\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StaticKey:
        return cls.parse(read_key_text(path), os.fspath(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        _write_secret(path, self.format())


class TLSCryptV2ServerKey:
    """The 128-byte tls-crypt-v2 server key: Ke = bytes 0..31, Ka = bytes 64..95."""

    __slots__ = ("_data", "_wkc_key")
    SIZE = KEY_SIZE

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if len(data) != KEY_SIZE:
            raise KeyFileError(f"a tls-crypt-v2 server key is {KEY_SIZE} bytes, got {len(data)}")
        self._data = data
        self._wkc_key: AnyCtrHmacKey | None = None

    def wkc_key(self) -> AnyCtrHmacKey:
        """The (Ke, Ka) pair that wraps client keys, prepared once: a server opens a
        WKc on every tls-crypt-v2 handshake."""
        key = self._wkc_key
        if key is None:
            key = self._wkc_key = CtrHmacKey(self.cipher_key, self.hmac_key)
        return key

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def cipher_key(self) -> bytes:
        return self._data[:32]

    @property
    def hmac_key(self) -> bytes:
        return self._data[SLOT_SIZE:SLOT_SIZE + 32]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TLSCryptV2ServerKey) and hmac.compare_digest(self._data,
                                                                              other._data)

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:
        return f"TLSCryptV2ServerKey(sha256:{hashlib.sha256(self._data).hexdigest()[:12]})"

    @classmethod
    def generate(cls) -> TLSCryptV2ServerKey:
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def parse(cls, text: str, source: str | None = None) -> TLSCryptV2ServerKey:
        data = _pem_decode(text, V2_SERVER_PEM, source)
        if len(data) != KEY_SIZE:
            raise KeyFileError(f"tls-crypt-v2 server key holds {len(data)} bytes, "
                               f"expected {KEY_SIZE}", source)
        return cls(data)

    def format(self) -> str:
        return _pem_encode(V2_SERVER_PEM, self._data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TLSCryptV2ServerKey:
        return cls.parse(read_key_text(path), os.fspath(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        _write_secret(path, self.format())


class TLSCryptV2ClientKey:
    """A client's Kc (a key2 used like a tls-crypt key) and its opaque WKc."""

    __slots__ = ("kc", "wkc")

    def __init__(self, kc: StaticKey, wkc: bytes) -> None:
        if not isinstance(kc, StaticKey):
            raise KeyFileError(f"kc must be a StaticKey, not {type(kc).__name__}")
        wkc = bytes(wkc)
        _check_wkc_shape(wkc, KeyFileError)
        self.kc = kc
        self.wkc = wkc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TLSCryptV2ClientKey) and self.kc == other.kc \
            and self.wkc == other.wkc

    def __hash__(self) -> int:
        return hash((self.kc, self.wkc))

    def __repr__(self) -> str:
        return f"TLSCryptV2ClientKey({self.kc!r}, wkc={len(self.wkc)} bytes)"

    @classmethod
    def parse(cls, text: str, source: str | None = None) -> TLSCryptV2ClientKey:
        data = _pem_decode(text, V2_CLIENT_PEM, source)
        if len(data) <= KEY2_SIZE:
            raise KeyFileError(f"tls-crypt-v2 client key holds only {len(data)} bytes "
                               "(no wrapped key after the 256-byte Kc)", source)
        kc, wkc = StaticKey(data[:KEY2_SIZE]), data[KEY2_SIZE:]
        try:
            _check_wkc_shape(wkc, KeyFileError)
        except KeyFileError as exc:
            raise KeyFileError(str(exc), source) from None
        return cls(kc, wkc)

    def format(self) -> str:
        return _pem_encode(V2_CLIENT_PEM, self.kc.data + self.wkc)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TLSCryptV2ClientKey:
        return cls.parse(read_key_text(path), os.fspath(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        _write_secret(path, self.format())


def parse_tls_crypt_v2_key(text: str, source: str | None = None
                           ) -> Union[TLSCryptV2ServerKey, TLSCryptV2ClientKey]:
    """A ``tls-crypt-v2`` file is a server key on servers and a client key on clients."""
    if f"-----BEGIN {V2_SERVER_PEM}-----" in text:
        return TLSCryptV2ServerKey.parse(text, source)
    if f"-----BEGIN {V2_CLIENT_PEM}-----" in text:
        return TLSCryptV2ClientKey.parse(text, source)
    raise KeyFileError("neither a tls-crypt-v2 server key nor a client key", source)


def _check_wkc_shape(wkc: bytes, exc: type[Exception]) -> None:
    n = len(wkc)
    if n > MAX_WKC_LEN:
        raise exc(f"wrapped client key is {n} bytes, more than {MAX_WKC_LEN}")
    if n < TAG_SIZE + KEY2_SIZE + 2:
        raise exc(f"wrapped client key is {n} bytes, shorter than tag + Kc + length "
                  f"({TAG_SIZE + KEY2_SIZE + 2})")
    (declared,) = struct.unpack(">H", wkc[-2:])
    if declared != n:
        raise exc(f"wrapped client key length field says {declared}, actual {n}")


# --- metadata ---------------------------------------------------------------------------

def user_metadata(value: bytes) -> bytes:
    """Metadata of type USER: ``00 || value`` (value ≤ 733 bytes)."""
    if len(value) > MAX_METADATA_LEN - 1:
        raise KeyFileError(f"metadata too long ({len(value)} bytes, max "
                           f"{MAX_METADATA_LEN - 1} bytes)")
    return bytes((METADATA_TYPE_USER,)) + bytes(value)


def timestamp_metadata(unix_time: float) -> bytes:
    """Metadata of type TIMESTAMP: ``01 || u64 unix time`` (the default of --genkey)."""
    return bytes((METADATA_TYPE_TIMESTAMP,)) + struct.pack(">Q", int(unix_time))


def describe_metadata(metadata: bytes) -> tuple[int | None, bytes | int]:
    """``(type, value)``: TIMESTAMP → the u64 time, USER → raw bytes, empty → (None, b"")."""
    if not metadata:
        return None, b""
    typ, rest = metadata[0], metadata[1:]
    if typ == METADATA_TYPE_TIMESTAMP and len(rest) == 8:
        return typ, struct.unpack(">Q", rest)[0]
    return typ, bytes(rest)


# --- WKc --------------------------------------------------------------------------------

def wrap_client_key(server_key: TLSCryptV2ServerKey, kc: StaticKey, metadata: bytes) -> bytes:
    """Build WKc = T || AES-256-CTR(Ke, T[:16], Kc || metadata) || len (spec §5.4)."""
    metadata = bytes(metadata)
    if not 1 <= len(metadata) <= MAX_METADATA_LEN:
        raise KeyFileError(f"metadata must be 1..{MAX_METADATA_LEN} bytes (type byte "
                           f"included), got {len(metadata)}")
    plain = kc.data + metadata
    net_len = struct.pack(">H", TAG_SIZE + len(plain) + 2)
    return server_key.wkc_key().seal(net_len, plain) + net_len


def unwrap_client_key(server_key: TLSCryptV2ServerKey, wkc: bytes) -> tuple[StaticKey, bytes]:
    """Open a WKc with the server key: ``(Kc, metadata)``; :class:`WKcError` if it fails."""
    wkc = bytes(wkc)
    _check_wkc_shape(wkc, WKcError)
    tag, body, net_len = wkc[:TAG_SIZE], wkc[TAG_SIZE:-2], wkc[-2:]
    try:
        plain = server_key.wkc_key().open(net_len, tag, body)
    except CtlCryptAuthError:
        raise WKcError("wrapped client key does not authenticate "
                       "(made for a different tls-crypt-v2 server key, or tampered)") from None
    return StaticKey(plain[:KEY2_SIZE]), plain[KEY2_SIZE:]


# --- generation (ovpnctl genkey) --------------------------------------------------------

def generate_tls_crypt_key() -> str:
    """Text of ``openvpn --genkey tls-crypt``."""
    return StaticKey.generate().format()


def generate_tls_auth_key() -> str:
    """Text of ``openvpn --genkey tls-auth`` (same format as tls-crypt / secret)."""
    return StaticKey.generate().format()


def generate_tls_crypt_v2_server_key() -> str:
    """Text of ``openvpn --genkey tls-crypt-v2-server``."""
    return TLSCryptV2ServerKey.generate().format()


def generate_tls_crypt_v2_client_key(server_key: TLSCryptV2ServerKey,
                                     metadata: bytes | None = None,
                                     now: float | None = None) -> str:
    """Text of ``openvpn --tls-crypt-v2 srv.key --genkey tls-crypt-v2-client [b64 metadata]``.

    ``metadata`` is the USER payload (already decoded); without it the
    metadata is a TIMESTAMP of ``now`` (default: the current time), as OpenVPN does.
    """
    meta = user_metadata(metadata) if metadata is not None else \
        timestamp_metadata(time.time() if now is None else now)
    kc = StaticKey.generate()
    return TLSCryptV2ClientKey(kc, wrap_client_key(server_key, kc, meta)).format()


GENKEY_KINDS = ("tls-crypt", "tls-auth", "secret", "tls-crypt-v2-server", "tls-crypt-v2-client")


def genkey(kind: str, *, server_key: TLSCryptV2ServerKey | None = None,
           metadata_b64: str | None = None, now: float | None = None) -> str:
    """One entry point for the genkey kinds, taking metadata as base64 like OpenVPN's CLI."""
    if kind in ("tls-crypt", "secret"):
        return generate_tls_crypt_key()
    if kind == "tls-auth":
        return generate_tls_auth_key()
    if kind == "tls-crypt-v2-server":
        return generate_tls_crypt_v2_server_key()
    if kind == "tls-crypt-v2-client":
        if server_key is None:
            raise KeyFileError("tls-crypt-v2-client needs the tls-crypt-v2 server key")
        meta = None
        if metadata_b64 is not None:
            try:
                meta = base64.b64decode(metadata_b64, validate=True)
            except (binascii.Error, ValueError):
                raise KeyFileError("failed to base64 decode provided metadata") from None
        return generate_tls_crypt_v2_client_key(server_key, meta, now)
    raise KeyFileError(f"unknown genkey kind {kind!r}; one of {', '.join(GENKEY_KINDS)}")
