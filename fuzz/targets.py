"""Fuzz targets: one function per parser that faces a peer, a kernel, an engine client or a user.

Why one shared module: the atheris harness (``fuzz/run_atheris.py``) and CI's
short pass (``tests/unit/test_fuzz_targets.py``) must exercise exactly the same
code, so a crash found in a long run is replayed by pytest from the corpus.

Contract of every target: it takes ``bytes`` and returns ``None``.  The
module's *documented* error type is caught inside the target (that is the
expected outcome for garbage); anything else that escapes -- an IndexError,
a MemoryError, a violated property raised as :class:`FuzzPropertyError` --
is a finding.  Targets are deterministic for a given input (fixed keys and
clocks) so that libFuzzer's coverage feedback and crash reproduction work;
the only exception is the server target's cookie secret (see there).

Where a raw byte string would almost never get past authentication, a target
reads a *mode byte* first and can instead seal the rest with the legitimate
peer's encoder, so the fuzzer reaches the parser behind the MAC/AEAD; a
second byte then picks a position to corrupt, which checks that the
authentication really covers every byte.
"""
from __future__ import annotations

import errno as E
import ipaddress
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from typing import Any

from bsd_ovpn import nv
from bsd_ovpn.errors import ConfigError, ValidationError
from bsd_ovpn.ifovpn import (
    CIPHER_KEY_SIZES, MAX_REQUEST_SIZE, NOTIFICATION_QUEUE_LEN, Command,
)

__all__ = ["TARGETS", "FuzzPropertyError", "run"]

NOW = 1_700_000_000.0          # wall-clock seconds for the sans-IO protocol code


class FuzzPropertyError(AssertionError):
    """A target's property does not hold (as opposed to an unexpected exception)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzPropertyError(what)


class _Cursor:
    """Reads structure out of fuzz bytes; past the end every read yields zeros.

    Used instead of atheris.FuzzedDataProvider so the targets run without
    atheris (CI) and the same bytes mean the same thing in both runners.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def chunk(self) -> bytes:
        """A u16 length then that many bytes (clipped at the end)."""
        return self.take(self.u16())


def _flip(data: bytes, seed: int) -> bytes:
    """``data`` with the byte at a position chosen by ``seed`` changed."""
    pos = (seed * 131) % len(data)
    return data[:pos] + bytes([data[pos] ^ (1 + seed % 255)]) + data[pos + 1:]


# ============================================================================ nvlist

def _nv_reference(data: bytes, flags: int, nfds: int) -> Any:
    """``nv.unpack`` read pair by pair (shape templates off): an NVList or the NVError text."""
    saved = nv._templates_on
    nv._templates_on = False
    try:
        return nv.unpack(data, flags=flags, nfds=nfds)
    except nv.NVError as exc:
        return str(exc)
    finally:
        nv._templates_on = saved


def nv_unpack(data: bytes) -> None:
    """``nv.unpack``: NVError only; what unpacks re-packs to a fixed point.

    Also: the template fast path (a buffer shaped like one seen before,
    e.g. a mutated corpus entry) gives exactly the slow path's result or
    error.
    """
    flags = data[2] & nv.NV_FLAG_PUBLIC_MASK if len(data) > 2 else 0
    nfds = 4 if len(data) % 2 else 0          # reach the descriptor checks too
    reference = _nv_reference(data, flags, nfds)
    try:
        nv.unpack(data, flags=flags, nfds=nfds)        # learns the shape, if it can
        nvl = nv.unpack(data, flags=flags, nfds=nfds)  # ... and reads it by template
    except nv.NVError as exc:
        _check(str(exc) == reference, f"template path error {exc} differs from {reference!r}")
        return
    _check(isinstance(reference, nv.NVList) and reference == nvl
           and reference.byteorder == nvl.byteorder,
           f"template path result differs from the reference ({reference!r})")
    packed = nv.pack(nvl, byteorder=nvl.byteorder)
    again = nv.unpack(packed, flags=flags, nfds=nfds)
    _check(again == nvl, "unpack(pack(unpack(b))) differs from unpack(b)")
    _check(nv.pack(again, byteorder=again.byteorder) == packed,
           "pack is not a fixed point after one normalising round trip")


# ============================================================================ control channel

_STATIC_KEY_BYTES = bytes((i * 7 + 3) & 0xFF for i in range(256))
_V2_SERVER_KEY_BYTES = bytes((i * 11 + 5) & 0xFF for i in range(128))
_V2_KC_BYTES = bytes((i * 13 + 1) & 0xFF for i in range(256))
_V2_METADATA = b"\x01" + struct.pack(">Q", 1_700_000_000)
_DIGESTS = ("SHA1", "SHA256", "SHA512", "SHA1")


def _wrap_pair(kind: str, mode: int) -> tuple[Any, Any]:
    """(client-side sender, server-side receiver) with fixed keys; fresh replay state."""
    from bsd_ovpn.proto.keyfile import (
        StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, wrap_client_key,
    )
    from bsd_ovpn.proto.wrap import (
        NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client, TLSCryptV2Server,
    )
    if kind == "none":
        return NoWrap(), NoWrap()
    key = StaticKey(_STATIC_KEY_BYTES)
    if kind == "tls-auth":
        digest = _DIGESTS[(mode >> 2) & 3]
        return TLSAuth(key, 1, digest), TLSAuth(key, 0, digest)
    if kind == "tls-crypt":
        return TLSCrypt(key, server=False), TLSCrypt(key, server=True)
    skey = TLSCryptV2ServerKey(_V2_SERVER_KEY_BYTES)
    kc = StaticKey(_V2_KC_BYTES)
    ckey = TLSCryptV2ClientKey(kc, wrap_client_key(skey, kc, _V2_METADATA))
    return TLSCryptV2Client(ckey), TLSCryptV2Server(skey)


def _control(kind: str, data: bytes) -> None:
    """Unwrap (raw or legitimately sealed, maybe corrupted) then decode a control packet.

    Mode byte: bit 0 raw wire bytes; bit 1 corrupt one byte of the sealed
    packet (position from the second byte); bits 2-3 the tls-auth digest.
    Properties: only WrapError / PacketError; a sealed packet unwraps to what
    was sealed; a corrupted one never authenticates; a replay is refused;
    decode -> encode reproduces the plain bytes.
    """
    from bsd_ovpn.proto.packet import ControlPacket, PacketError
    from bsd_ovpn.proto.wrap import WrapError
    if len(data) < 2:
        return
    mode, seed, body = data[0], data[1], data[2:]
    sender, receiver = _wrap_pair(kind, mode)
    sealed = not mode & 1
    corrupt = sealed and bool(mode & 2)
    if sealed:
        if len(body) < 10:
            return                    # wrap() refuses a packet without a message byte
        wire = sender.wrap(body, NOW)
        if corrupt:
            wire = _flip(wire, seed)
    else:
        wire = body
    v2 = kind == "tls-crypt-v2"
    try:
        if v2:
            plain, session_wrap, metadata = receiver.unwrap_client(wire, NOW)
            _check(session_wrap.metadata == metadata, "session metadata differs")
        else:
            plain = receiver.unwrap(wire, NOW)
    except WrapError:
        return
    if sealed and not corrupt:
        _check(plain == body, "sealed packet did not unwrap to the plain packet")
    if corrupt and kind != "none":
        raise FuzzPropertyError(f"{kind}: a packet with a corrupted byte authenticated")
    if kind != "none":               # the same datagram again is a replay
        try:
            (session_wrap if v2 else receiver).unwrap(wire, NOW)
        except WrapError:
            pass
        else:
            raise FuzzPropertyError(f"{kind}: replayed packet accepted")
    try:
        pkt = ControlPacket.decode(plain)
    except PacketError:
        return
    _check(pkt.encode() == plain, "ControlPacket decode -> encode is not the identity")


def control_none(data: bytes) -> None:
    """Control packet without tls-auth/tls-crypt: NoWrap + ControlPacket.decode."""
    _control("none", data)


def control_tls_auth(data: bytes) -> None:
    """tls-auth (SHA1/SHA256/SHA512 HMAC) unwrap + decode."""
    _control("tls-auth", data)


def control_tls_crypt(data: bytes) -> None:
    """tls-crypt unwrap + decode."""
    _control("tls-crypt", data)


def control_tls_crypt_v2(data: bytes) -> None:
    """tls-crypt-v2 server side: WKc split/unwrap, Kc session unwrap, decode."""
    _control("tls-crypt-v2", data)


def wkc_unwrap(data: bytes) -> None:
    """``unwrap_client_key``: WKcError only; wrap/unwrap round trip; tampering detected.

    Mode byte bit 0: 0 = the rest is a raw WKc; 1 = the rest is Kc (256
    bytes, zero padded) + metadata, wrapped with the server key, then
    unwrapped (and, with bit 1, one byte corrupted first).
    """
    from bsd_ovpn.proto.keyfile import (
        MAX_METADATA_LEN, StaticKey, TLSCryptV2ServerKey, WKcError, unwrap_client_key,
        wrap_client_key,
    )
    if len(data) < 2:
        return
    mode, seed, body = data[0], data[1], data[2:]
    skey = TLSCryptV2ServerKey(_V2_SERVER_KEY_BYTES)
    if not mode & 1:
        try:
            kc, meta = unwrap_client_key(skey, body)
        except WKcError:
            return
        if 1 <= len(meta) <= MAX_METADATA_LEN:
            _check(wrap_client_key(skey, kc, meta) == body, "WKc re-wrap differs")
        return
    kc = StaticKey(body[:256].ljust(256, b"\0"))
    meta = body[256:] or b"\x00"
    if len(meta) > MAX_METADATA_LEN:
        return
    wkc = wrap_client_key(skey, kc, meta)
    if mode & 2:
        try:
            unwrap_client_key(skey, _flip(wkc, seed))
        except WKcError:
            return
        raise FuzzPropertyError("a WKc with a corrupted byte unwrapped")
    got = unwrap_client_key(skey, wkc)
    _check(got == (kc, meta), "WKc did not unwrap to the wrapped Kc and metadata")


# ============================================================================ key files

_KEYFILE_DIR = tempfile.mkdtemp(prefix="bsd_ovpn_fuzz_keys_")


def keyfile(data: bytes) -> None:
    """Key file readers and parsers: KeyFileError only; parse(format(k)) == k."""
    from bsd_ovpn.proto.keyfile import (
        KeyFileError, StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey,
        parse_tls_crypt_v2_key, read_key_text,
    )
    path = os.path.join(_KEYFILE_DIR, "key")
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        text = read_key_text(path)
    except KeyFileError:
        text = data.decode("latin-1")      # the parsers also take inline <tls-auth> blocks
    for parser in (StaticKey.parse, TLSCryptV2ServerKey.parse, TLSCryptV2ClientKey.parse,
                   parse_tls_crypt_v2_key):
        try:
            key = parser(text, "fuzz.key")
        except KeyFileError:
            continue
        _check(type(key).parse(key.format()) == key, f"{parser.__qualname__}: "
               "parse(format(key)) differs")


# ============================================================================ key method 2

def keymethod(data: bytes) -> None:
    """KeyMethod2.decode/decode_prefix, PeerInfo.parse, choose_cipher.

    Mode byte: bit 0 client_sent; bit 1 decode_prefix instead of decode;
    bit 2 the rest is peer-info text rather than a KM2 message.
    Errors allowed: KeyMethodError (KeyMethodTruncated included) and, from
    choose_cipher, CipherNegotiationError.
    """
    from bsd_ovpn.proto.keymethod import (
        CipherNegotiationError, KeyMethod2, KeyMethodError, PeerInfo, choose_cipher,
    )
    if not data:
        return
    mode, body = data[0], data[1:]
    client_sent = bool(mode & 1)
    if mode & 4:
        peer_info: str | None = body.decode("utf-8", "surrogateescape")
        remote_cipher = None
    else:
        try:
            if mode & 2:
                km, used = KeyMethod2.decode_prefix(body, client_sent)
                _check(0 < used <= len(body), f"decode_prefix used {used} of {len(body)}")
                _check(KeyMethod2.decode(body[:used], client_sent) == km,
                       "decode(prefix) differs from decode_prefix")
            else:
                km = KeyMethod2.decode(body, client_sent)
                used = len(body)
        except KeyMethodError:
            return
        if body[:5] == b"\0\0\0\0\x02" and km.options:
            _check(km.encode(client_sent) == body[:used], "KM2 decode -> encode differs")
        peer_info, remote_cipher = km.peer_info, None
    try:
        pi = PeerInfo.parse(peer_info)
    except KeyMethodError:
        return
    # build() refuses what parse() could not read back (CR, LF, NUL in a value):
    # everything it does build must round-trip.
    try:
        built = pi.build()
    except ValidationError:
        built = None
    if built is not None:
        _check(PeerInfo.parse(built) == pi, "PeerInfo parse(build(p)) differs")
    for ciphers in (("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"), ("AES-128-GCM",)):
        try:
            got = choose_cipher(ciphers, pi, None, remote_cipher=remote_cipher)
        except CipherNegotiationError:
            continue
        _check(got in ciphers, f"choose_cipher returned {got!r}, not one of ours")


# ============================================================================ control messages

def push(data: bytes) -> None:
    """Control-message framing, classification and PUSH_REPLY parsing/reassembly.

    Errors allowed: ControlMessageError (PushError is one).  Properties: a
    returned message is printable and re-frames to itself; a parsed
    PUSH_REPLY part rebuilds (build_push_reply) into parts with the same options.
    """
    from bsd_ovpn.proto.push import (
        ControlMessageError, PushReply, PushReplyAssembler, PushReplyPart, build_push_reply,
        encode_message, parse_message, split_messages,
    )
    split = split_messages(data)
    asm = PushReplyAssembler()
    for m in split.messages:
        if len(m) <= 2047:
            _check(split_messages(encode_message(m)).messages == [m],
                   "encode_message -> split_messages is not the identity")
        try:
            msg = parse_message(m)
        except ControlMessageError:
            continue
        if not isinstance(msg, PushReplyPart):
            continue
        try:
            asm.feed(msg)
        except ControlMessageError:
            pass
        try:
            PushReply.parse(m)
        except ControlMessageError:
            pass
        opts = list(msg.options)
        if opts and all(len(o) <= 900 for o in opts):
            rebuilt: list[str] = []
            for part in build_push_reply(opts):
                p = parse_message(part)
                assert isinstance(p, PushReplyPart)
                rebuilt.extend(p.options)
            _check(rebuilt == opts, "build_push_reply -> parse changed the options")


# ============================================================================ data channel

_CIPHERS = ("none", "AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305")


def _data_keys(cipher: str, key_id: int) -> tuple[Any, Any]:
    from bsd_ovpn.proto.keys import split_key2
    key2 = bytes((i * 29 + 17) & 0xFF for i in range(256))
    return (split_key2(key2, cipher, server=False, key_id=key_id),
            split_key2(key2, cipher, server=True, key_id=key_id))


def datachannel(data: bytes) -> None:
    """DataChannel.decrypt: DataChannelError only; seal/open round trip; forgery; replay.

    Mode byte: bits 0-1 cipher; bit 2 the sender uses P_DATA_V2 (peer_id
    from the seed byte); bits 3-5 key_id; bit 6 raw packet; bit 7 corrupt.
    """
    from bsd_ovpn.proto.datachannel import (
        DataChannel, DataChannelError, DataReplayError, is_occ_exit, is_ping, parse_occ,
    )
    if len(data) < 2:
        return
    mode, seed, body = data[0], data[1], data[2:]
    cipher = _CIPHERS[mode & 3]
    key_id = (mode >> 3) & 7
    tx_keys, rx_keys = _data_keys(cipher, key_id)
    tx = DataChannel(tx_keys, peer_id=seed * 0x10101 if mode & 4 else None)
    rx = DataChannel(rx_keys, peer_id=None)
    raw = bool(mode & 0x40)
    corrupt = not raw and bool(mode & 0x80)
    packet = body if raw else tx.encrypt(body)
    if corrupt:
        packet = _flip(packet, seed)
    try:
        plain = rx.decrypt(packet, NOW)
    except DataChannelError:
        return
    if not raw and not corrupt:
        _check(plain == body, "data packet did not decrypt to its plaintext")
    if corrupt and cipher != "none":
        raise FuzzPropertyError(f"{cipher}: a data packet with a corrupted byte authenticated")
    is_ping(plain)
    is_occ_exit(plain)
    parse_occ(plain)
    try:
        rx.decrypt(packet, NOW)
    except DataReplayError:
        pass
    else:
        raise FuzzPropertyError("replayed data packet accepted")


# ============================================================================ TLS 1.3 record layer

_RECORD_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                  "TLS_CHACHA20_POLY1305_SHA256")


def _record_pair(suite: str) -> tuple[Any, Any]:
    """(peer, us): two RecordLayers with mirrored fixed secrets, as after a hand-off."""
    from bsd_ovpn.proto.record import SUITES, RecordLayer
    n = 48 if SUITES[suite][0] == "sha384" else 32
    c2s, s2c, exp = bytes(range(n)), bytes(range(100, 100 + n)), bytes(range(50, 50 + n))
    peer = RecordLayer(suite, server=False, read_secret=s2c, write_secret=c2s, read_seq=3,
                       write_seq=5, exporter_secret=exp)
    us = RecordLayer(suite, server=True, read_secret=c2s, write_secret=s2c, read_seq=5,
                     write_seq=3, exporter_secret=exp)
    return peer, us


def record_layer(data: bytes) -> None:
    """RecordLayer.receive after a TLS 1.3 hand-off: RecordError only.

    Mode byte: bits 0-1 suite; bit 2 raw bytes (else the body is sent by the
    legitimate peer as application data, a KeyUpdate when bit 5 is set); bit 3
    corrupt one byte of the peer's records; bit 4 feed in two pieces (seed
    byte: where).  Properties: the peer's records decrypt to what it wrote;
    a corrupted record never authenticates; after a failure the layer stays
    failed; our replies are readable by the peer.
    """
    from bsd_ovpn.errors import LocalProtocolError
    from bsd_ovpn.proto.record import MAX_PLAINTEXT, RecordError
    if len(data) < 2:
        return
    mode, seed, body = data[0], data[1], data[2:]
    peer, us = _record_pair(_RECORD_SUITES[(mode & 3) % 3])
    raw = bool(mode & 4)
    corrupt = not raw and bool(mode & 8)
    if raw:
        wire = body
    else:
        if mode & 0x20:
            peer.key_update(request=bool(seed & 1))
        msgs = [body[i:i + MAX_PLAINTEXT] for i in range(0, len(body), MAX_PLAINTEXT)] or [b"x"]
        for m in msgs:
            if m:
                peer.write(m)
        wire = peer.outgoing()
        if corrupt:
            wire = _flip(wire, seed)
    pieces = [wire]
    if mode & 0x10 and len(wire) > 1:
        cut = seed % len(wire)
        pieces = [wire[:cut], wire[cut:]]
    try:
        for piece in pieces:
            us.receive(piece)
    except RecordError:
        _check(us.failed is not None, "a RecordError left the layer usable")
        try:
            us.receive(b"\x17\x03\x03\x00\x20" + bytes(32))
        except RecordError:
            pass
        else:
            raise FuzzPropertyError("a failed record layer accepted more input")
        if not raw and not corrupt:
            raise FuzzPropertyError("the legitimate peer's records were refused")
        return
    got = []
    while (chunk := us.read_record()):
        got.append(chunk)
    if not raw:
        if corrupt:
            # nothing may come out; a corrupted length can leave a record incomplete
            _check(not got, "a record with a corrupted byte authenticated")
            return
        _check(b"".join(got) == b"".join(m for m in msgs if m),
               "records did not decrypt to what the peer wrote")
    try:
        us.write(b"reply")
    except LocalProtocolError:
        return                                  # we already sent close_notify / an alert
    peer.receive(us.outgoing())
    _check(peer.read_record() == b"reply", "the peer could not read our reply")


# ============================================================================ config

_CONFIG_DIR = tempfile.mkdtemp(prefix="bsd_ovpn_fuzz_cfg_")
_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfuzz\n-----END CERTIFICATE-----\n"


def _config_files() -> None:
    """Fixed files in the scratch directory, so relative references parse deeper."""
    from bsd_ovpn.proto.keyfile import (
        StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, wrap_client_key,
    )
    skey = TLSCryptV2ServerKey(_V2_SERVER_KEY_BYTES)
    kc = StaticKey(_V2_KC_BYTES)
    files = {
        "ca.crt": _PEM, "server.crt": _PEM, "server.key": _PEM.replace("CERTIFICATE", "PRIVATE KEY"),
        "ta.key": StaticKey(_STATIC_KEY_BYTES).format(),
        "v2s.key": skey.format(),
        "v2c.key": TLSCryptV2ClientKey(kc, wrap_client_key(skey, kc, _V2_METADATA)).format(),
        "inc.conf": "verb 3\n", "self.conf": "config self.conf\n",
    }
    for name, text in files.items():
        fd = os.open(os.path.join(_CONFIG_DIR, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    os.mkdir(os.path.join(_CONFIG_DIR, "ccd"))


def config(data: bytes) -> None:
    """config.loads / loads_ccd: ConfigError only (KeyFileError, TokenizeError are ones).

    Relative paths resolve inside an empty scratch directory.  The runners
    point stdin at /dev/null so ``config /dev/stdin`` cannot block.
    """
    from bsd_ovpn import config as cfgmod
    if not os.path.exists(os.path.join(_CONFIG_DIR, "ccd")):
        _config_files()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    path = os.path.join(_CONFIG_DIR, "fuzz.conf")
    for loader in (cfgmod.loads, cfgmod.loads_ccd):
        try:
            loader(text, path)
        except ConfigError:
            pass
    for line in text.split("\n")[:64]:
        try:
            cfgmod.split_line(line)
        except cfgmod.TokenizeError:
            pass


# ============================================================================ engine

_ERRNOS = frozenset({0, E.ENXIO, E.E2BIG, E.EINVAL, E.ENOTSUP, E.ENOENT, E.EEXIST, E.EBUSY,
                     E.ENOLINK, E.EBADF, E.ENOTSOCK, E.EPROTOTYPE, E.EADDRINUSE,
                     E.EHOSTUNREACH, E.ENOSPC})
_CMDS = tuple(Command) + (0, 0x20004400, 0x2000440E, 0xFFFFFFFF)
_NAMES = ("peerid", "fd", "remote", "local", "af", "address", "port", "scopeid", "vpn_ipv4",
          "vpn_ipv6", "slot", "keyid", "encrypt", "decrypt", "cipher", "key", "iv",
          "interval", "timeout", "ifmode", "notification", "peers", "x")
_STRINGS = tuple(CIPHER_KEY_SIZES) + ("aes-256-gcm", "AES-512-GCM", "")
_NUMBERS = (0, 1, 2, 7, 8, 28, 0x8010, 0x8002, 0x10, 0x2, 1194, 0xFFFFFF, 0x1000000,
            0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 2**63, 2**64 - 1)


class _Sockets:
    """Real descriptors for NEW_PEER: UDP v4/v6 with SO_REUSEPORT, TCP, a pipe, a bad fd."""

    def __init__(self) -> None:
        self.fds: list[int | None] = [None]
        self._keep: list[Any] = []
        for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((addr, 0))
            except OSError:
                continue
            self._keep.append(s)
            self.fds.append(s.fileno())
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._keep.append(t)
        self.fds.append(t.fileno())
        r, w = os.pipe()
        self.fds += [r, 1 << 20]
        self._keep += [r, w]

    def pick(self, i: int) -> int | None:
        return self.fds[i % len(self.fds)]


_SOCKETS: _Sockets | None = None


def _sockets() -> _Sockets:
    global _SOCKETS
    if _SOCKETS is None:
        _SOCKETS = _Sockets()
    return _SOCKETS


class EngineClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_engine_host(clock: EngineClock) -> Any:
    """A host edge that records what the engine asks for; data planes are traced."""
    from bsd_ovpn.engine.commands import inspect_socket
    from bsd_ovpn.engine.dataplane import PythonDataPlane

    class TracingDataPlane(PythonDataPlane):
        """The Python data plane plus a record of peers/key slots and injectable events."""

        def __init__(self) -> None:
            super().__init__(clock=clock)
            self.peer_slots: dict[int, list[int | None]] = {}
            self.injected: list[tuple] = []

        def add_peer(self, peer_id, remote, local, vpn4, vpn6):  # type: ignore[no-untyped-def]
            _check(peer_id not in self.peer_slots, f"add_peer of existing peer {peer_id}")
            super().add_peer(peer_id, remote, local, vpn4, vpn6)
            self.peer_slots[peer_id] = [None, None]

        def del_peer(self, peer_id):  # type: ignore[no-untyped-def]
            self.peer_slots.pop(peer_id)
            return super().del_peer(peer_id)

        def set_key(self, peer_id, slot, key_id, cipher, enc_key, enc_iv, dec_key, dec_iv):  # type: ignore[no-untyped-def]
            super().set_key(peer_id, slot, key_id, cipher, enc_key, enc_iv, dec_key, dec_iv)
            self.peer_slots[peer_id][slot] = key_id

        def swap_keys(self, peer_id):  # type: ignore[no-untyped-def]
            super().swap_keys(peer_id)
            self.peer_slots[peer_id].reverse()

        def del_key(self, peer_id, slot):  # type: ignore[no-untyped-def]
            super().del_key(peer_id, slot)
            self.peer_slots[peer_id][slot] = None

        def events(self):  # type: ignore[no-untyped-def]
            out = super().events() + self.injected
            self.injected = []
            return out

    class Host:
        def __init__(self) -> None:
            self.links: set[str] = set()
            self.up: set[str] = set()
            self.hooked: dict[str, int] = {}

        def inspect_socket(self, fd):  # type: ignore[no-untyped-def]
            return inspect_socket(fd)

        def select_source(self, remote):  # type: ignore[no-untyped-def]
            return bytes.fromhex("20010db8000000000000000000000063")

        def create_link(self, name):  # type: ignore[no-untyped-def]
            self.links.add(name)
            return name

        def destroy_link(self, name):  # type: ignore[no-untyped-def]
            self.links.discard(name)
            self.up.discard(name)

        def rename_link(self, name, new):  # type: ignore[no-untyped-def]
            self.links.discard(name)
            self.links.add(new)
            if name in self.up:
                self.up.discard(name)
                self.up.add(new)

        def set_link_up(self, name):  # type: ignore[no-untyped-def]
            self.up.add(name)

        def link_is_up(self, name):  # type: ignore[no-untyped-def]
            return name in self.up

        def link_exists(self, name):  # type: ignore[no-untyped-def]
            return name in self.links

        def make_dataplane(self, name):  # type: ignore[no-untyped-def]
            return TracingDataPlane()

        def hook_socket(self, name, fd, dp):  # type: ignore[no-untyped-def]
            self.hooked[name] = fd

        def unhook_socket(self, name, dp):  # type: ignore[no-untyped-def]
            self.hooked.pop(name, None)

        def set_steering(self, name, ids):  # type: ignore[no-untyped-def]
            pass

        def gateway_routes(self, name):  # type: ignore[no-untyped-def]
            return []

    return Host()


def _gen_value(c: _Cursor, depth: int) -> Any:
    kind = c.u8() % 9
    if kind == 0:
        return None
    if kind == 1:
        return bool(c.u8() & 1)
    if kind == 2:
        b = c.u8()
        return _NUMBERS[b % len(_NUMBERS)] if b & 0x80 else int.from_bytes(c.take(b % 9), "big")
    if kind == 3:
        b = c.u8()
        return _STRINGS[b % len(_STRINGS)] if b & 0x80 else \
            c.take(b % 24).decode("latin-1").replace("\0", "")
    if kind == 4:
        return c.take(c.u8() % 41) or b"\x00"     # libnv binaries are never empty
    if kind in (5, 6) and depth < 3:
        return _gen_nvlist(c, depth + 1)
    if kind == 7:
        return _gen_sockaddr(c)
    if kind == 8 and depth < 3:
        return [_gen_nvlist(c, depth + 1) for _ in range(1 + c.u8() % 3)]
    return [int.from_bytes(c.take(2), "big") for _ in range(1 + c.u8() % 3)]


def _gen_sockaddr(c: _Cursor) -> nv.NVList:
    """A sockaddr-shaped nvlist (af/address/port[/scopeid]), sometimes bent."""
    b = c.u8()
    out = nv.NVList()
    af = (2, 28, 10, 0)[b & 3]
    if not b & 0x10:
        out.add("af", af)
    n = 4 if af == 2 else 16
    if b & 0x20:
        n = c.u8() % 20 or 1
    if not b & 0x40:
        out.add("address", c.take(n).ljust(n, b"\x01"))
    if not b & 0x80:
        out.add("port", c.u16())
    if b & 4:
        out.add("scopeid", c.u8())
    return out


def _gen_nvlist(c: _Cursor, depth: int = 0) -> nv.NVList:
    """An nvlist from a vocabulary of the engine's own names, values of every type."""
    out = nv.NVList()
    for _ in range(c.u8() % 8):
        b = c.u8()
        name = _NAMES[b % len(_NAMES)] if b & 0x80 else \
            c.take(b % 12).decode("latin-1").replace("\0", "") or "x"
        value = _gen_value(c, depth)
        if name in out:
            continue
        try:
            out.add(name, value)
        except nv.NVError:
            continue
    return out


def _engine_snapshot(ifs: Any) -> tuple:
    return (tuple(sorted((p.peer_id, p.remote, p.local, p.vpn4, p.vpn6, tuple(p.key_ids),
                          tuple(p.key_installed), p.interval, p.timeout)
                         for p in ifs.peers.values())),
            ifs.flags, ifs.up, ifs.socket, len(ifs.ring))


def _engine_invariants(eng: Any, ifs: Any) -> None:
    dp = ifs.dataplane
    _check(set(ifs.peers) == set(dp.peer_slots),
           f"engine peers {sorted(ifs.peers)} != data plane peers {sorted(dp.peer_slots)}")
    for pid, peer in ifs.peers.items():
        _check(peer.peer_id == pid, "peer stored under a different peer_id")
        for slot in (0, 1):
            want = peer.key_ids[slot] if peer.key_installed[slot] else None
            _check(dp.peer_slots[pid][slot] == want,
                   f"peer {pid} slot {slot}: engine says {want}, data plane "
                   f"{dp.peer_slots[pid][slot]}")
    _check(len(ifs.ring) <= NOTIFICATION_QUEUE_LEN, f"notification ring holds {len(ifs.ring)}")
    _check(bool(ifs.peers) <= (ifs.socket is not None), "peers without a socket")


def engine_commands(data: bytes) -> None:
    """Engine.handle_set/handle_get with arbitrary bytes and generated nvlists.

    Each step: opcode byte (kind, command, fd), then its argument.  Kinds:
    raw SET payload, generated-nvlist SET, GET with a buffer size, clock
    advance, data-plane event (float / rotate_key), interface rename.
    Properties: every answer is an errno from the kernel's set, never an
    exception; a failed SET changes nothing; the engine's peers and key slots
    match what the data plane was told; the ring never exceeds 32; GET
    replies unpack, POLL_PKT counts the ring, GET_PKT dequeues in order.
    """
    from bsd_ovpn.engine.commands import Engine
    c = _Cursor(data)
    clock = EngineClock()
    eng = Engine(make_engine_host(clock), clock=clock)
    rc, name = eng.create_interface("ovpn")
    _check(rc == 0, f"create_interface failed: {rc}")
    socks = _sockets()
    steps = 0
    while c.left and steps < 64:
        steps += 1
        op = c.u8()
        kind = op % 6
        ifs = eng.interfaces[name]
        eng.tick(clock.t)                  # so handle_*'s own sync() changes nothing
        if kind in (0, 1):
            cmd = _CMDS[c.u8() % len(_CMDS)]
            fd = socks.pick(c.u8())
            if kind == 0:
                payload: bytes | None = c.chunk()
            else:
                top = _gen_nvlist(c)
                if c.u8() & 1:
                    top["peerid"] = c.u8() % 4
                payload = nv.pack(top)
            if payload is not None and len(payload) > 2 * MAX_REQUEST_SIZE:
                payload = payload[:2 * MAX_REQUEST_SIZE]
            before = _engine_snapshot(ifs)
            target = name if c.u8() != 0xFF else "ovpn99"
            rc = eng.handle_set(target, cmd, payload, fd)
            _check(isinstance(rc, int) and rc in _ERRNOS, f"handle_set returned {rc!r}")
            if target != name:
                _check(rc == E.ENXIO, "unknown interface is not ENXIO")
            if rc != 0:
                _check(_engine_snapshot(ifs) == before,
                       f"failed SET {cmd:#x} (errno {rc}) changed the engine state")
        elif kind == 2:
            cmd = _CMDS[c.u8() % len(_CMDS)]
            bufsize = (0, 64, 128, 4096, 1 << 16)[c.u8() % 5]
            ring = list(ifs.ring)
            rc, reply = eng.handle_get(name, cmd, bufsize)
            _check(isinstance(rc, int) and rc in _ERRNOS, f"handle_get returned {rc!r}")
            _check((rc == 0) == bool(reply) and len(reply) <= bufsize,
                   f"handle_get: errno {rc} with a {len(reply)}-byte reply (bufsize {bufsize})")
            if rc == 0:
                out = nv.unpack(reply)
                if cmd == Command.OVPN_POLL_PKT:
                    _check(out.get_number("pending") == len(ring), "POLL_PKT pending != ring")
                if cmd == Command.OVPN_GET_PKT:
                    _check(out.get_number("peerid") == ring[0].peer_id and
                           out.get_number("notification") == int(ring[0].type),
                           "GET_PKT did not return the oldest notification")
            if cmd == Command.OVPN_GET_PKT and rc in (0, E.ENOSPC):
                _check(list(ifs.ring) == ring[1:], "GET_PKT did not dequeue exactly one")
            if cmd == Command.OVPN_GET_PKT and not ring:
                _check(rc == E.ENOENT, "GET_PKT on an empty ring is not ENOENT")
        elif kind == 3:
            clock.t += c.u16() / 16
            eng.tick(clock.t)
        elif kind == 4:
            pid = c.u8() % 5
            if c.u8() & 1:
                ifs.dataplane.injected.append(("rotate_key", pid))
            else:
                port = 1024 + c.u8()
                ifs.dataplane.injected.append(("float", pid, (f"192.0.2.{c.u8()}", port)))
            eng.tick(clock.t)
        else:
            new = ("ovpn1", "tun0", "", "x" * 16, "ovpn/1")[c.u8() % 5]
            rc = eng.rename_interface(name, new)
            _check(rc in _ERRNOS, f"rename_interface returned {rc}")
            if rc == 0:
                name = new
        _engine_invariants(eng, eng.interfaces[name])
    eng.close()
    _check(not eng.interfaces, "close() left interfaces behind")


# ============================================================================ server endpoint

_SERVER_CTX: dict[str, Any] = {}
_ADDRS = (("192.0.2.2", 40000), ("192.0.2.3", 40001), ("2001:db8::5", 1194, 0, 0),
          ("::ffff:192.0.2.2", 40000, 0, 0))
_WRAP_KINDS = ("none", "tls-auth", "tls-crypt", "tls-crypt-v2")


def _server_tls() -> Any:
    if "tls" not in _SERVER_CTX:
        from bsd_ovpn.proto.tls import TLSConfig
        from bsd_ovpn.testbed.pki import PKI
        pki = PKI(tempfile.mkdtemp(prefix="bsd_ovpn_fuzz_pki_"))
        srv = pki.server()
        _SERVER_CTX["tls"] = TLSConfig(ca=pki.ca_pem, cert=srv.cert_pem, key=srv.key_pem,
                                       remote_cert_tls="client")
    return _SERVER_CTX["tls"]


def _make_endpoint(kind: str) -> Any:
    from bsd_ovpn.proto.cookie import CookieJar
    from bsd_ovpn.proto.keyfile import StaticKey, TLSCryptV2ServerKey
    from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
    from bsd_ovpn.proto.session import SessionSettings
    from bsd_ovpn.proto.wrap import NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Server
    settings = SessionSettings(server=True, tls=_server_tls(), hand_window=60,
                               push_options=("ping 10",))
    key = StaticKey(_STATIC_KEY_BYTES)
    factory: Callable[[], Any] | None
    v2 = None
    if kind == "none":
        factory = NoWrap
    elif kind == "tls-auth":
        factory = lambda: TLSAuth(key, 0, "SHA1")  # noqa: E731
    elif kind == "tls-crypt":
        factory = lambda: TLSCrypt(key, server=True)  # noqa: E731
    else:
        factory = None
        v2 = TLSCryptV2Server(TLSCryptV2ServerKey(_V2_SERVER_KEY_BYTES))
    # A fresh random cookie secret per input: a cookie can only be known by
    # reading the server's reply (the echo step), never replayed from a corpus.
    return ServerEndpoint(ServerSettings(settings, max_clients=4,
                                         pool=ipaddress.ip_network("198.51.100.0/24")),
                          wrap_factory=factory, tls_crypt_v2=v2,
                          cookie_jar=CookieJar(os.urandom(32), 60))


def server_endpoint(data: bytes) -> None:
    """ServerEndpoint.receive_datagram: never raises, no state before a valid cookie.

    First byte: the server's wrapping.  Then steps: opcode byte (kind,
    source address) and a chunk.  Kinds: raw datagram; a plain packet sealed
    with the legitimate client wrapping; an echo that acknowledges the last
    cookie reset the server sent to that address, with the chunk as payload
    (the way in for the TLS/session layer); time advance + timers.
    Property: the number of clients grows only on an echo of a real cookie or
    on a tls-crypt-v2 V3 reset without the early-negotiation marker (the
    documented stateful path for clients that cannot resend their WKc).
    """
    from bsd_ovpn.proto.packet import ControlPacket, Opcode, PacketError
    from bsd_ovpn.proto.wrap import WrapError, early_negotiation_marker
    c = _Cursor(data)
    kind = _WRAP_KINDS[c.u8() % 4]
    ep = _make_endpoint(kind)
    now = NOW
    last_reset: dict[Any, ControlPacket] = {}
    senders: dict[Any, Any] = {}      # one client wrapping per address, as a real client
    steps = 0
    while c.left and steps < 16:
        steps += 1
        op = c.u8()
        step, addr = op % 4, _ADDRS[(op >> 2) % len(_ADDRS)]
        chunk = c.chunk()
        if addr not in senders:
            senders[addr] = _wrap_pair(kind, 0)[0]
        sender = senders[addr]
        echo = False
        if step == 0:
            wire = chunk
        elif step == 1:
            if len(chunk) < 10:
                continue
            wire = sender.wrap(chunk, now)
        elif step == 2:
            reset = last_reset.get(addr)
            if reset is None:
                continue
            opcode = Opcode.P_CONTROL_WKC_V1 if kind == "tls-crypt-v2" else \
                (Opcode.P_CONTROL_V1 if chunk else Opcode.P_ACK_V1)
            pkt = ControlPacket(opcode, 0, reset.remote_session_id, (0,), reset.session_id,
                                1 if opcode != Opcode.P_ACK_V1 else None, chunk)
            wire = sender.wrap(pkt.encode(), now)
            echo = True
        else:
            now += c.u8()
            ep.handle_timer(now)
            wire = b""
        if wire:
            before = len(ep)
            ok = ep.receive_datagram(wire, addr, now)
            _check(isinstance(ok, bool), f"receive_datagram returned {ok!r}")
            if len(ep) > before:
                v3_stateful = kind == "tls-crypt-v2" and wire[0] >> 3 == \
                    Opcode.P_CONTROL_HARD_RESET_CLIENT_V3 and not early_negotiation_marker(wire)
                _check(echo or v3_stateful, f"a client appeared for {addr} from a step-{step} "
                                            "datagram without a cookie echo")
        for out, dest in ep.datagrams_to_send(now):
            _check(isinstance(out, bytes) and dest in _ADDRS, "bad datagram to send")
            try:
                plain = senders.get(dest, sender).unwrap_stateless(out, now)
                reply = ControlPacket.decode(plain)
            except (WrapError, PacketError):
                continue
            if reply.opcode == Opcode.P_CONTROL_HARD_RESET_SERVER_V2 and reply.acks:
                last_reset[dest] = reply
        _check(len(ep) <= 4, "more clients than max_clients")
        while ep.next_event() is not None:
            pass
        ep.get_timer()


# ============================================================================ client session

def _client_tls() -> Any:
    if "client_tls" not in _SERVER_CTX:
        from bsd_ovpn.proto.tls import TLSConfig
        from bsd_ovpn.testbed.pki import PKI
        pki = PKI(tempfile.mkdtemp(prefix="bsd_ovpn_fuzz_pki_"))
        cli = pki.client()
        _SERVER_CTX["client_tls"] = TLSConfig(ca=pki.ca_pem, cert=cli.cert_pem, key=cli.key_pem,
                                              remote_cert_tls="server")
    return _SERVER_CTX["client_tls"]


def client_session(data: bytes) -> None:
    """A client Session.receive_datagram fed by a hostile server: never raises.

    First byte: the wrapping.  Steps (opcode byte + chunk): raw datagram;
    a plain packet sealed with the server-side wrapping; a server reset
    that acknowledges the client's reset (chunk = its payload, e.g. the
    early-negotiation TLVs), after which the client starts TLS; a
    P_CONTROL_V1 acking the client's newest packet with the chunk as TLS
    bytes; time advance + timers.  Properties: receive_datagram returns a
    bool; timers, datagrams_to_send and events never raise.
    """
    from bsd_ovpn.proto.packet import ControlPacket, Opcode, PacketError
    from bsd_ovpn.proto.session import Session, SessionSettings
    from bsd_ovpn.proto.wrap import WrapError
    c = _Cursor(data)
    kind = _WRAP_KINDS[c.u8() % 4]
    client_wrap, _ = _wrap_pair(kind, 0)
    # the server side of the same keys: tls-auth direction 0, tls-crypt server, v2 with Kc
    if kind == "tls-crypt-v2":
        from bsd_ovpn.proto.keyfile import StaticKey
        from bsd_ovpn.proto.wrap import TLSCryptV2ServerSession
        server_wrap: Any = TLSCryptV2ServerSession(StaticKey(_V2_KC_BYTES), client_wrap.wkc,
                                                  _V2_METADATA)
    else:
        server_wrap = _wrap_pair(kind, 0)[1]
    settings = SessionSettings(server=False, tls=_client_tls(), hand_window=60)
    now = NOW
    s = Session.connect(settings, client_wrap, now)
    server_sid = bytes.fromhex("5e5e5e5e5e5e5e5e")
    sent: list[ControlPacket] = []
    next_mid = 0
    steps = 0
    while c.left and steps < 16:
        steps += 1
        op = c.u8()
        step = op % 5
        chunk = c.chunk()
        for out in s.datagrams_to_send(now):
            try:
                sent.append(ControlPacket.decode(server_wrap.unwrap_stateless(out, now)))
            except (WrapError, PacketError):
                pass
        if step == 0:
            wire = chunk
        elif step == 1:
            if len(chunk) < 10:
                continue
            wire = server_wrap.wrap(chunk, now)
        elif step in (2, 3):
            if not sent:
                continue
            last = sent[-1]
            acks = (last.message_id,) if last.message_id is not None else ()
            opcode = Opcode.P_CONTROL_HARD_RESET_SERVER_V2 if step == 2 else \
                Opcode.P_CONTROL_V1
            if step == 2:
                next_mid = 0
            pkt = ControlPacket(opcode, 0, server_sid, acks, last.session_id if acks else None,
                                next_mid, chunk)
            next_mid += 1
            wire = server_wrap.wrap(pkt.encode(), now)
        else:
            now += c.u8()
            s.handle_timer(now)
            wire = b""
        if wire:
            ok = s.receive_datagram(wire, now)
            _check(isinstance(ok, bool), f"receive_datagram returned {ok!r}")
        while s.next_event() is not None:
            pass
        s.get_timer()


# ============================================================================ registry

TARGETS: dict[str, Callable[[bytes], None]] = {
    "nv_unpack": nv_unpack,
    "control_none": control_none,
    "control_tls_auth": control_tls_auth,
    "control_tls_crypt": control_tls_crypt,
    "control_tls_crypt_v2": control_tls_crypt_v2,
    "wkc_unwrap": wkc_unwrap,
    "keyfile": keyfile,
    "keymethod": keymethod,
    "push": push,
    "datachannel": datachannel,
    "record_layer": record_layer,
    "config": config,
    "engine_commands": engine_commands,
    "server_endpoint": server_endpoint,
    "client_session": client_session,
}


def run(name: str, data: bytes) -> None:
    """Run one target on one input (the entry point both runners share)."""
    TARGETS[name](bytes(data))
