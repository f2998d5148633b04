"""Key-method-2 messages, the OCC options string, peer-info and cipher negotiation.

The KM2 message is the first plaintext each side writes on the TLS channel
(protocol spec §8): the key-source randoms the PRF needs, the options string
(§8.1), the client's credentials and its peer-info (§11.1), from which the
server negotiates the data cipher (§11.2).  Everything here is pure bytes and
strings so the session layer can drive it from any TLS engine.
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bsd_ovpn.errors import RemoteProtocolError, ValidationError
from bsd_ovpn.ifovpn import CIPHER_KEY_SIZES
from bsd_ovpn.proto.keys import PRE_MASTER_SIZE, RANDOM_SIZE, KeySource

__all__ = [
    "KEY_METHOD_2", "MAX_MESSAGE_SIZE", "OPTIONS_MAX", "USER_PASS_MAX",
    "CipherNegotiationError", "IVProto", "KeyMethod2", "KeyMethodError", "KeyMethodTruncated",
    "PeerInfo",
    "choose_cipher", "options_cipher", "options_string",
]

KEY_METHOD_2 = 2
_KEY_METHOD_MASK = 0x0F
#: TLS_OPTIONS_LEN: options string limit including its NUL.
OPTIONS_MAX = 512
#: USER_PASS_LEN of a stock build: username / password limit including the NUL.
USER_PASS_MAX = 128
#: TLS_CHANNEL_BUF_SIZE: OpenVPN reads one TLS record into a buffer this big, so
#: a KM2 message (or any control message) larger than this can never be read.
MAX_MESSAGE_SIZE = 2048

#: Ciphers a peer announcing only ``IV_NCP=2`` is known to support (§11.2).
_NCP2_CIPHERS = ("AES-256-GCM", "AES-128-GCM")


class KeyMethodError(RemoteProtocolError):
    """A key-method-2 message or peer-info string is malformed.

    ``field`` names the part that was wrong (``options``, ``username``,
    ``peer-info`` …) so a server can tell, e.g., an over-long password (answer
    AUTH_FAILED, as OpenVPN does) from a garbled message (drop the session).
    """

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"key-method 2 {field_name}: {message}")


class KeyMethodTruncated(KeyMethodError):
    """The data ends inside the message: with a stream read, wait for more bytes."""


class CipherNegotiationError(RemoteProtocolError):
    """No data cipher both sides accept (the server answers AUTH_FAILED)."""


# --------------------------------------------------------------------------- strings

def _encode_str(name: str, value: str | None, limit: int | None) -> bytes:
    """u16 length including NUL, bytes, NUL; ``None`` is the absent string (u16 0)."""
    if value is None:
        return b"\x00\x00"
    raw = value.encode("utf-8", "surrogateescape")
    if b"\x00" in raw:
        raise ValidationError(f"key-method 2 {name} must not contain NUL bytes")
    n = len(raw) + 1
    if limit is not None and n > limit:
        raise ValidationError(f"key-method 2 {name} is {n} bytes with its NUL; "
                              f"the limit is {limit}")
    return struct.pack("!H", n) + raw + b"\x00"


class _Reader:
    """Bounds-checked cursor; every short read names the field being read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, name: str) -> bytes:
        if self.pos + n > len(self.data):
            raise KeyMethodTruncated(name, f"message truncated (need {n} bytes at offset "
                                       f"{self.pos}, have {len(self.data) - self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def string(self, name: str, limit: int | None) -> str | None:
        (n,) = struct.unpack("!H", self.take(2, name))
        if n == 0:
            return None
        if limit is not None and n > limit:
            raise KeyMethodError(name, f"{n} bytes with its NUL exceeds the limit of {limit}")
        raw = self.take(n, name)
        if raw[-1] != 0:
            raise KeyMethodError(name, "string is not NUL-terminated")
        raw = raw[:-1]
        if b"\x00" in raw:
            raise KeyMethodError(name, "string contains an embedded NUL byte")
        # surrogateescape keeps non-UTF-8 credentials lossless (re-encodable).
        return raw.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- KM2

@dataclass
class KeyMethod2:
    """One key-method-2 message (§8).

    ``username``/``password``/``peer_info`` are ``None`` when absent (u16 0 on
    the wire) and ``""`` when sent as an empty string (u16 1, NUL).
    """

    key_source: KeySource
    options: str
    username: str | None = None
    password: str | None = None
    peer_info: str | None = None

    def encode(self, client: bool) -> bytes:
        """The message as one TLS write; only a client sends its pre_master."""
        if client and len(self.key_source.pre_master) != PRE_MASTER_SIZE:
            raise ValidationError("a client key-method 2 message needs a 48-byte pre_master")
        if not self.options:
            raise ValidationError("key-method 2 options string is required")
        out = bytearray(struct.pack("!IB", 0, KEY_METHOD_2))
        if client:
            out += self.key_source.pre_master
        out += self.key_source.random1 + self.key_source.random2
        out += _encode_str("options", self.options, OPTIONS_MAX)
        out += _encode_str("username", self.username, USER_PASS_MAX)
        out += _encode_str("password", self.password, USER_PASS_MAX)
        out += _encode_str("peer-info", self.peer_info, None)
        if len(out) > MAX_MESSAGE_SIZE:
            raise ValidationError(f"key-method 2 message is {len(out)} bytes; the peer reads "
                                  f"at most {MAX_MESSAGE_SIZE} (shorten peer-info)")
        return bytes(out)

    @classmethod
    def decode_prefix(cls, data: bytes, client_sent: bool) -> tuple[KeyMethod2, int]:
        """Parse a KM2 at the start of ``data``; return it and the bytes it used.

        For callers whose TLS read may return the KM2 and the next control
        message (e.g. a PUSH_REPLY) together.  Raises :class:`KeyMethodTruncated`
        if ``data`` ends inside the message (read more and retry).
        """
        clipped = len(data) > MAX_MESSAGE_SIZE
        try:
            return cls._decode_prefix(data[:MAX_MESSAGE_SIZE] if clipped else data, client_sent)
        except KeyMethodTruncated as exc:
            if clipped:  # more bytes would not help: the message is simply too big
                raise KeyMethodError(exc.field, f"message exceeds the {MAX_MESSAGE_SIZE}-byte "
                                                "limit") from None
            raise

    @classmethod
    def _decode_prefix(cls, data: bytes, client_sent: bool) -> tuple[KeyMethod2, int]:
        r = _Reader(data)
        r.take(4, "header")  # literal u32 0; OpenVPN skips it without looking
        method = r.take(1, "key method")[0]
        if method & _KEY_METHOD_MASK != KEY_METHOD_2:
            raise KeyMethodError("key method", f"unsupported key method/flags {method:#04x} "
                                               "(only key-method 2 exists in OpenVPN 2.6)")
        pre_master = r.take(PRE_MASTER_SIZE, "pre_master") if client_sent else b""
        random1 = r.take(RANDOM_SIZE, "random1")
        random2 = r.take(RANDOM_SIZE, "random2")
        options = r.string("options", OPTIONS_MAX)
        if options is None:
            raise KeyMethodError("options", "required options string is absent")
        username = r.string("username", USER_PASS_MAX)
        password = r.string("password", USER_PASS_MAX)
        peer_info = r.string("peer-info", None)
        km = cls(KeySource(pre_master, random1, random2), options, username, password,
                 peer_info)
        return km, r.pos

    @classmethod
    def decode(cls, data: bytes, client_sent: bool) -> KeyMethod2:
        """Parse exactly one KM2 message; trailing bytes are an error.

        ``client_sent`` says whose message this is (only a client's carries
        the pre_master).  Username and password are always parsed, even when
        unused, because peer-info follows them.
        """
        if len(data) > MAX_MESSAGE_SIZE:
            raise KeyMethodError("message", f"{len(data)} bytes exceeds the "
                                            f"{MAX_MESSAGE_SIZE}-byte limit")
        km, used = cls.decode_prefix(data, client_sent)
        if used != len(data):
            raise KeyMethodError("message", f"{len(data) - used} unexpected bytes after "
                                            "peer-info")
        return km

    def __repr__(self) -> str:  # the password never reaches a log via repr()
        return (f"KeyMethod2(options={self.options!r}, username={self.username!r}, "
                f"password={'<set>' if self.password else self.password!r}, "
                f"peer_info={self.peer_info!r})")


# --------------------------------------------------------------------------- options string

_PROTO_WORDS = {
    ("udp", False): "UDPv4", ("udp", True): "UDPv4",
    ("tcp", False): "TCPv4_CLIENT", ("tcp", True): "TCPv4_SERVER",
}


def options_string(*, server: bool, proto: str = "udp", dev_type: str = "tun",
                   link_mtu: int = 1541, tun_mtu: int = 1500,
                   tls_auth_keydir: int | None = None, cipher: str | None = None) -> str:
    """The §8.1 OCC options string a stock 2.6 peer sends.

    Defaults give the string of a 2.6 peer using ``data-ciphers`` (no cipher
    field, the unused BF-CBC/SHA1 placeholders).  ``cipher`` adds the
    ``cipher X,auth [null-digest],keysize N`` form for an AEAD cipher
    (``"none"`` gives ``[null-cipher]``).  ``tls_auth_keydir`` (0 server,
    1 client) adds the tls-auth fields.  Mismatches only cause warnings at
    the peer, but matching exactly keeps its logs quiet.
    """
    proto_l = proto.lower().rstrip("46")
    if proto_l.startswith("tcp"):
        proto_l = "tcp"
    if (proto_l, server) not in _PROTO_WORDS:
        raise ValidationError(f"options string: unknown proto {proto!r} (udp or tcp)")
    if tls_auth_keydir not in (None, 0, 1):
        raise ValidationError(f"options string: keydir must be 0 or 1, got {tls_auth_keydir}")
    parts = ["V4", f"dev-type {dev_type}", f"link-mtu {link_mtu}", f"tun-mtu {tun_mtu}",
             f"proto {_PROTO_WORDS[(proto_l, server)]}"]
    if tls_auth_keydir is not None:
        parts.append(f"keydir {tls_auth_keydir}")
    if cipher is None:
        parts += ["auth SHA1", "keysize 128"]
    elif cipher == "none":
        parts += ["cipher [null-cipher]", "auth [null-digest]", "keysize 0"]
    else:
        if cipher not in CIPHER_KEY_SIZES:
            raise ValidationError(f"options string: unknown data cipher {cipher!r}")
        parts += [f"cipher {cipher}", "auth [null-digest]",
                  f"keysize {CIPHER_KEY_SIZES[cipher] * 8}"]
    if tls_auth_keydir is not None:
        parts.append("tls-auth")
    parts += ["key-method 2", "tls-server" if server else "tls-client"]
    return ",".join(parts)


def options_cipher(options: str) -> str | None:
    """The ``cipher`` an OCC options string names (legacy NCP fallback), if any.

    ``[null-cipher]`` is reported as ``"none"``, as OpenVPN does.
    """
    for item in options.split(","):
        if item.startswith("cipher "):
            name = item[len("cipher "):].strip()
            return "none" if name == "[null-cipher]" else name
    return None


# --------------------------------------------------------------------------- peer-info

class IVProto(enum.IntFlag):
    """IV_PROTO capability bits (§11.1)."""

    DATA_V2 = 1 << 1
    REQUEST_PUSH = 1 << 2
    TLS_KEY_EXPORT = 1 << 3
    AUTH_PENDING_KW = 1 << 4
    NCP_P2P = 1 << 5
    DNS_OPTION = 1 << 6
    CC_EXIT_NOTIFY = 1 << 7
    AUTH_FAIL_TEMP = 1 << 8
    DYN_TLS_CRYPT = 1 << 9
    DATA_EPOCH = 1 << 10
    DNS_OPTION_V2 = 1 << 11
    PUSH_UPDATE = 1 << 12


def _int_var(key: str, value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise KeyMethodError("peer-info", f"{key}={value!r} is not a decimal number")
    return int(value)


@dataclass
class PeerInfo:
    """The peer-info variables of a client (§11.1), typed where we act on them.

    ``extra`` keeps every other ``KEY=value`` pair in order (IV_LZO_STUB,
    IV_GUI_VER, UV_* …) so a server can hand them to scripts unchanged.
    """

    version: str | None = None
    platform: str | None = None
    tcpnl: bool = False
    mtu: int | None = None
    ncp: int | None = None
    ciphers: tuple[str, ...] | None = None
    proto: IVProto = IVProto(0)
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, text: str | None) -> PeerInfo:
        """Parse ``KEY=value`` lines; lines without ``=`` are ignored as OpenVPN does."""
        pi = cls()
        if not text:
            return pi
        extra: list[tuple[str, str]] = []
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if "=" not in line:
                continue
            key, value = line.split("=", 1)
            if key == "IV_VER":
                pi.version = value
            elif key == "IV_PLAT":
                pi.platform = value
            elif key == "IV_TCPNL":
                pi.tcpnl = value == "1"
            elif key == "IV_MTU":
                pi.mtu = _int_var(key, value)
            elif key == "IV_NCP":
                pi.ncp = _int_var(key, value)
            elif key == "IV_CIPHERS":
                pi.ciphers = tuple(c for c in value.split(":") if c)
            elif key == "IV_PROTO":
                pi.proto = IVProto(_int_var(key, value) & 0xFFFFFFFF)
            else:
                extra.append((key, value))
        pi.extra = tuple(extra)
        return pi

    def build(self) -> str:
        """The peer-info string in the order a stock 2.6 client writes it."""
        lines: list[str] = []
        if self.version is not None:
            lines.append(f"IV_VER={self.version}")
        if self.platform is not None:
            lines.append(f"IV_PLAT={self.platform}")
        if self.tcpnl:
            lines.append("IV_TCPNL=1")
        if self.mtu is not None:
            lines.append(f"IV_MTU={self.mtu}")
        if self.ncp is not None:
            lines.append(f"IV_NCP={self.ncp}")
        if self.ciphers is not None:
            lines.append(f"IV_CIPHERS={':'.join(self.ciphers)}")
        lines.append(f"IV_PROTO={int(self.proto)}")
        lines += [f"{k}={v}" for k, v in self.extra]
        for line in lines:
            # parse() takes CR-LF line ends, so a CR inside a value would not survive
            if "\n" in line or "\r" in line or "\x00" in line:
                raise ValidationError(f"peer-info line {line!r} contains a CR, LF or NUL")
        return "".join(line + "\n" for line in lines)

    @classmethod
    def for_client(cls, *, version: str, platform: str, ciphers: Sequence[str],
                   proto: IVProto, mtu: int | None = None) -> PeerInfo:
        """A pull client's peer-info; IV_NCP=2 iff both GCM ciphers are offered."""
        ncp = 2 if all(c in ciphers for c in _NCP2_CIPHERS) else None
        if proto and not proto & IVProto.DATA_V2:
            raise ValidationError("IV_PROTO must include DATA_V2 whenever any bit is set")
        return cls(version=version, platform=platform, tcpnl=True, mtu=mtu, ncp=ncp,
                   ciphers=tuple(ciphers), proto=proto)

    def ncp_ciphers(self) -> tuple[str, ...]:
        """The data ciphers this peer supports as far as NCP knows (IV_CIPHERS/IV_NCP)."""
        if self.ciphers is not None:
            return self.ciphers
        if self.ncp is not None and self.ncp >= 2:
            return _NCP2_CIPHERS
        return ()


def choose_cipher(server_ciphers: Iterable[str] | str, peer_info: PeerInfo | str | None,
                  fallback: str | None, *, remote_cipher: str | None = None) -> str:
    """Server-side NCP (§11.2): the first of our ciphers the client supports.

    The client list is IV_CIPHERS, else ``AES-256-GCM:AES-128-GCM`` for
    IV_NCP>=2; a client without IV_CIPHERS may also be matched on the
    ``cipher`` of its options string (``remote_cipher``).  ``fallback``
    (``--data-ciphers-fallback``) is used only when the client sent no cipher
    information at all.  Names compare case-insensitively and the server's
    spelling is returned, since that is what the kernel is given.
    """
    if isinstance(server_ciphers, str):
        server_list = [c for c in server_ciphers.split(":") if c]
    else:
        server_list = list(server_ciphers)
    pi = peer_info if isinstance(peer_info, PeerInfo) else PeerInfo.parse(peer_info)
    peer_list = {c.upper() for c in pi.ncp_ciphers()}
    occ = (remote_cipher or "").upper() if pi.ciphers is None else ""
    for name in server_list:
        if name.upper() in peer_list or (occ and name.upper() == occ):
            return name
    if peer_list:
        raise CipherNegotiationError(
            "Data channel cipher negotiation failed (no shared cipher): server data-ciphers "
            f"{':'.join(server_list)!r}, client supports {':'.join(pi.ncp_ciphers())!r}")
    if remote_cipher:
        raise CipherNegotiationError(
            "Data channel cipher negotiation failed (no shared cipher): server data-ciphers "
            f"{':'.join(server_list)!r}, client uses cipher {remote_cipher!r}")
    if fallback:
        return fallback
    raise CipherNegotiationError(
        "Data channel cipher negotiation failed (no shared cipher): the client sent no "
        "IV_CIPHERS, IV_NCP or cipher, and no data-ciphers-fallback is set")
