"""Control-channel wrappings: none, tls-auth, tls-crypt, tls-crypt-v2 (spec §3.3–§3.5, §5).

A wrapping turns a plain control packet (``ControlPacket.encode()``) into its
wire form and back.  One instance belongs to one session because it owns the
long-form replay state: the send counter (replay packet-id + timestamp) and
the receive window (64 ids, 15 s time backtrack, spec §10.4).  A server that
must answer a first packet before it has a session (stateless cookie path)
uses :meth:`ControlWrap.unwrap_stateless`, which authenticates without
touching replay state.

Sans-IO: ``now`` is wall-clock seconds (``time.time()``); its integer part
becomes the long-form timestamp, exactly as OpenVPN uses its own clock.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from abc import ABC, abstractmethod

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError
from bsd_ovpn.proto.fastcrypto import AnyCtrHmacKey, CtlCryptAuthError, hmac_digest
from bsd_ovpn.proto.keyfile import (
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, WKcError, key_indices,
    unwrap_client_key, MAX_WKC_LEN,
)
from bsd_ovpn.proto.packet import Opcode, SID_SIZE

__all__ = [
    "WrapError", "ControlWrap", "NoWrap", "TLSAuth", "TLSCrypt", "TLSCryptV2Client",
    "TLSCryptV2Server", "TLSCryptV2ServerSession", "ReplayWindow", "dynamic_tls_crypt",
    "early_negotiation_marker", "EARLY_NEG_START", "REPLAY_WINDOW", "REPLAY_TIME_BACKTRACK",
    "TLS_CRYPT_OVERHEAD", "TLS_CRYPT_WIRE_OVERHEAD", "WKC_OPCODES",
]

REPLAY_WINDOW = 64
REPLAY_TIME_BACKTRACK = 15.0
EARLY_NEG_START = 0x0F000000          # tls-crypt-v2 client counter start: "early negotiation"
EARLY_NEG_MASK = 0xFF000000
TLS_CRYPT_TAG = 32
TLS_CRYPT_WIRE_OVERHEAD = 8 + TLS_CRYPT_TAG          # 40: pid/ts + tag, CTR adds nothing
TLS_CRYPT_OVERHEAD = TLS_CRYPT_WIRE_OVERHEAD + 16    # 56: what OpenVPN budgets (extra block)
WKC_OPCODES = frozenset({Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, Opcode.P_CONTROL_WKC_V1})

_HDR = 1 + SID_SIZE            # opcode byte + own session id
_U32_MAX = 0xFFFFFFFF


class WrapError(RemoteProtocolError):
    """A wrapped control packet failed authentication, decryption or the replay check."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"control packet dropped: {reason}")


class ReplayWindow:
    """Long-form (packet-id, timestamp) replay protection, as OpenVPN's packet_id_rec.

    A newer timestamp restarts the window; an older one is rejected.  Within
    one timestamp an id is accepted if above every id seen, or inside the last
    ``window`` ids, unseen, and not older than ``backtrack`` seconds (a gap
    left behind by a newer packet stops being fillable after that long).
    State is bounded: at most ``window`` remembered ids.
    """

    __slots__ = ("window", "backtrack", "_ts", "_top", "_seen", "_holes")

    def __init__(self, window: int = REPLAY_WINDOW,
                 backtrack: float = REPLAY_TIME_BACKTRACK) -> None:
        self.window = window
        self.backtrack = backtrack
        self._ts: int | None = None
        self._top = 0
        self._seen: set[int] = set()
        self._holes: dict[int, float] = {}   # unseen id -> local time the gap appeared

    def check(self, pid: int, ts: int, now: float) -> str | None:
        """``None`` if (pid, ts) is acceptable, else the reason it is not."""
        if pid == 0:
            return "replay packet-id 0 is never valid"
        if self._ts is None or ts > self._ts:
            return None
        if ts < self._ts:
            return f"replay timestamp {ts} older than current {self._ts}"
        if pid > self._top:
            return None
        diff = self._top - pid
        if diff >= self.window:
            return f"replay packet-id {pid} is {diff} behind {self._top}, outside the window"
        if pid in self._seen:
            return f"replayed packet-id {pid}"
        born = self._holes.get(pid)
        if born is None or now - born > self.backtrack:
            return f"packet-id {pid} arrived more than {self.backtrack:g} s late"
        return None

    def add(self, pid: int, ts: int, now: float) -> None:
        """Record an accepted (pid, ts); call only after :meth:`check` said yes."""
        if self._ts is None or ts > self._ts or pid > self._top + self.window:
            self._ts = ts
            self._seen = set()
            self._holes = {i: now for i in range(max(1, pid - self.window + 1), pid)}
            self._top = pid
        elif pid > self._top:
            holes, seen = self._holes, self._seen
            for i in range(max(self._top + 1, pid - self.window + 1), pid):
                holes[i] = now
            # ids fall out of the window from the bottom: drop just those (at most
            # pid - top of them) instead of rebuilding both containers per packet
            for i in range(self._top - self.window + 1, pid - self.window + 1):
                seen.discard(i)
                holes.pop(i, None)
            self._top = pid
        self._holes.pop(pid, None)
        self._seen.add(pid)


class ControlWrap(ABC):
    """One session's control-channel wrapping with its own replay state."""

    #: bytes OpenVPN budgets for this wrapping when sizing control packets (spec §4.1)
    overhead: int = 0
    #: bytes actually added on the wire (without a tls-crypt-v2 WKc)
    wire_overhead: int = 0
    #: whether the wrapping carries a long-form replay id (tls-auth / tls-crypt)
    has_packet_id: bool = True
    #: the configured key2 (tls-auth / tls-crypt key, or the tls-crypt-v2 Kc):
    #: dynamic tls-crypt XORs its exported key with it (spec §5.5)
    base_key: StaticKey | None = None

    def __init__(self) -> None:
        self._send_id = 0
        self._send_time = 0
        self.replay = ReplayWindow()

    @property
    def send_packet_id(self) -> int:
        """Last replay packet-id sent; the next wrap uses one more.

        A stateless server that already answered with packet-id 1 sets this
        to 1 when it finally creates the session (spec §6.3).
        """
        return self._send_id

    @send_packet_id.setter
    def send_packet_id(self, value: int) -> None:
        if not 0 <= value < _U32_MAX:
            raise LocalProtocolError(f"replay packet-id {value} outside 0..2^32-2")
        self._send_id = value

    def _next_pid(self, now: float) -> bytes:
        if not self._send_time:
            self._send_time = int(now) & _U32_MAX
        if self._send_id >= _U32_MAX:      # long form: restart the sequence with a new time
            self._send_id = 0
            self._send_time = int(now) & _U32_MAX
        self._send_id += 1
        return struct.pack(">II", self._send_id, self._send_time)

    @staticmethod
    def _check_plain(packet: bytes) -> bytes:
        packet = bytes(packet)
        if len(packet) < _HDR + 1:
            raise LocalProtocolError(f"a plain control packet is at least {_HDR + 1} bytes, "
                                     f"got {len(packet)}")
        return packet

    @abstractmethod
    def wrap(self, packet: bytes, now: float) -> bytes:
        """Wire form of a plain-layout packet (advances the send counter)."""

    @abstractmethod
    def _open(self, data: bytes) -> tuple[bytes, int, int]:
        """Authenticate/decrypt: ``(plain, replay_pid, replay_ts)`` or raise WrapError."""

    def unwrap(self, data: bytes, now: float) -> bytes:
        """Plain layout of a received packet after authentication and the replay check."""
        plain, pid, ts = self._open(bytes(data))
        if self.has_packet_id:
            reason = self.replay.check(pid, ts, now)
            if reason is not None:
                raise WrapError(reason)
            self.replay.add(pid, ts, now)
        return plain

    def unwrap_stateless(self, data: bytes, now: float) -> bytes:
        """Authenticate/decrypt only; no replay state is read or written."""
        return self._open(bytes(data))[0]


class NoWrap(ControlWrap):
    """No tls-auth/tls-crypt: the wire form is the plain layout."""

    overhead = 0
    wire_overhead = 0
    has_packet_id = False

    def wrap(self, packet: bytes, now: float) -> bytes:
        return self._check_plain(packet)

    def _open(self, data: bytes) -> tuple[bytes, int, int]:
        if len(data) < _HDR + 1:
            raise WrapError(f"packet of {len(data)} bytes is too short")
        return data, 0, 0


def _digest_name(digest: str) -> str:
    name = digest.strip().lower().replace("-", "_")
    if name.startswith("rsa_"):
        name = name[4:]
    if name in ("none", "[null_digest]", ""):
        raise LocalProtocolError("tls-auth needs an HMAC digest; --auth none cannot be used")
    try:
        size = hashlib.new(name).digest_size
    except (ValueError, TypeError):
        raise LocalProtocolError(f"unknown --auth digest {digest!r}") from None
    if size > 64:
        raise LocalProtocolError(f"digest {digest!r} is {size} bytes, longer than a key slot")
    return name


class TLSAuth(ControlWrap):
    """``--tls-auth``: HMAC with the ``--auth`` digest after the session id (spec §3.3, §5.2)."""

    def __init__(self, key: StaticKey, direction: int | None, digest: str = "SHA1") -> None:
        super().__init__()
        self.base_key = key
        self.digest = _digest_name(digest)
        self.hsize = hashlib.new(self.digest).digest_size
        send, recv = key_indices(direction)
        self._send_key = key.hmac(send)[:self.hsize]
        self._recv_key = key.hmac(recv)[:self.hsize]
        self.overhead = self.wire_overhead = self.hsize + 8

    def _mac(self, key: bytes, pidts: bytes, hdr: bytes, rest: bytes) -> bytes:
        return hmac_digest(key, pidts + hdr + rest, self.digest)

    def wrap(self, packet: bytes, now: float) -> bytes:
        packet = self._check_plain(packet)
        pidts = self._next_pid(now)
        hdr, rest = packet[:_HDR], packet[_HDR:]
        return hdr + self._mac(self._send_key, pidts, hdr, rest) + pidts + rest

    def _open(self, data: bytes) -> tuple[bytes, int, int]:
        h = self.hsize
        if len(data) < _HDR + h + 8 + 1:
            raise WrapError(f"tls-auth packet of {len(data)} bytes is too short")
        hdr, mac = data[:_HDR], data[_HDR:_HDR + h]
        pidts, rest = data[_HDR + h:_HDR + h + 8], data[_HDR + h + 8:]
        if not hmac.compare_digest(mac, self._mac(self._recv_key, pidts, hdr, rest)):
            raise WrapError("tls-auth HMAC mismatch (wrong key, key-direction or --auth?)")
        pid, ts = struct.unpack(">II", pidts)
        return hdr + rest, pid, ts



class TLSCrypt(ControlWrap):
    """``--tls-crypt``: AES-256-CTR + HMAC-SHA256, SIV style (spec §3.4, §5.3).

    ``server`` picks the fixed directions: servers send with keys[0] and
    receive with keys[1]; clients the other way round.
    """

    overhead = TLS_CRYPT_OVERHEAD
    wire_overhead = TLS_CRYPT_WIRE_OVERHEAD

    def __init__(self, key: StaticKey, server: bool) -> None:
        super().__init__()
        self.base_key = key
        self.server = bool(server)
        # prepared on first use, and then shared by every wrap of this key: a
        # stateless reply never opens a packet, and a dynamic tls-crypt wrap made
        # at every handshake is only used at a renegotiation
        self._keys: tuple[AnyCtrHmacKey, AnyCtrHmacKey] | None = None

    def wrap(self, packet: bytes, now: float) -> bytes:
        packet = self._check_plain(packet)
        header = packet[:_HDR] + self._next_pid(now)
        keys = self._keys
        if keys is None:
            keys = self._keys = self.base_key.tls_crypt_keys(self.server)
        return header + keys[0].seal(header, packet[_HDR:])

    def _open(self, data: bytes) -> tuple[bytes, int, int]:
        off_ct = _HDR + 8 + TLS_CRYPT_TAG
        if len(data) < off_ct + 1:
            raise WrapError(f"tls-crypt packet of {len(data)} bytes is too short")
        header = data[:_HDR + 8]
        keys = self._keys
        if keys is None:
            keys = self._keys = self.base_key.tls_crypt_keys(self.server)
        try:
            plain = keys[1].open(header, data[_HDR + 8:off_ct], data[off_ct:])
        except CtlCryptAuthError:
            raise WrapError("tls-crypt authentication failed (wrong key or tampered packet)"
                            ) from None
        pid, ts = struct.unpack(">II", header[_HDR:])
        return data[:_HDR] + plain, pid, ts


class TLSCryptV2Client(TLSCrypt):
    """tls-crypt-v2 client: tls-crypt with Kc, WKc appended to V3 resets and WKC_V1 packets.

    The replay counter starts at EARLY_NEG_START so the first id on the wire
    is 0x0f000001, announcing early-negotiation support (spec §3.5, §6.1).
    """

    def __init__(self, client_key: TLSCryptV2ClientKey) -> None:
        super().__init__(client_key.kc, server=False)
        self.wkc = client_key.wkc
        self._send_id = EARLY_NEG_START

    def wrap(self, packet: bytes, now: float) -> bytes:
        out = super().wrap(packet, now)
        if (out[0] >> 3) in WKC_OPCODES:
            out += self.wkc
        return out


class TLSCryptV2ServerSession(TLSCrypt):
    """Server side of one tls-crypt-v2 session: tls-crypt with the client's Kc.

    Later V3/WKC_V1 packets of the same session carry the WKc again; it must
    be the one this session was opened with and is stripped before unwrapping.
    """

    def __init__(self, kc: StaticKey, wkc: bytes, metadata: bytes) -> None:
        super().__init__(kc, server=True)
        self.kc = kc
        self.wkc = bytes(wkc)
        self.metadata = bytes(metadata)

    def _open(self, data: bytes) -> tuple[bytes, int, int]:
        if data and (data[0] >> 3) in WKC_OPCODES:
            n = len(self.wkc)
            if len(data) <= n or data[-n:] != self.wkc:
                raise WrapError("tls-crypt-v2 packet carries a different wrapped client key")
            data = data[:-n]
        return super()._open(data)


def _split_wkc(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 2:
        raise WrapError("tls-crypt-v2 packet too short for a WKc length")
    (wkc_len,) = struct.unpack(">H", data[-2:])
    if wkc_len > MAX_WKC_LEN:
        raise WrapError(f"WKc length {wkc_len} exceeds {MAX_WKC_LEN}")
    if wkc_len + _HDR + TLS_CRYPT_WIRE_OVERHEAD + 1 > len(data):
        raise WrapError(f"WKc length {wkc_len} does not fit a {len(data)}-byte packet")
    return data[:-wkc_len], data[-wkc_len:]


class TLSCryptV2Server:
    """tls-crypt-v2 server key holder: opens a client's first packets and makes its session.

    Not a :class:`ControlWrap` itself: every client has its own Kc, so the
    per-session wrapping is the :class:`TLSCryptV2ServerSession` returned by
    :meth:`unwrap_client`.
    """

    overhead = TLS_CRYPT_OVERHEAD
    wire_overhead = TLS_CRYPT_WIRE_OVERHEAD

    def __init__(self, server_key: TLSCryptV2ServerKey) -> None:
        if not isinstance(server_key, TLSCryptV2ServerKey):
            raise LocalProtocolError("TLSCryptV2Server needs a TLSCryptV2ServerKey")
        self.server_key = server_key

    def unwrap_client(self, data: bytes, now: float
                      ) -> tuple[bytes, TLSCryptV2ServerSession, bytes]:
        """``(plain, client_wrap, metadata)`` of a P_CONTROL_HARD_RESET_CLIENT_V3 / WKC_V1.

        ``client_wrap`` is a fresh session wrapping that has already recorded
        this packet's replay id; the caller keeps it for the session (or
        throws it away on the stateless path).
        """
        data = bytes(data)
        if not data or (data[0] >> 3) not in WKC_OPCODES:
            op = data[0] >> 3 if data else None
            raise WrapError(f"opcode {op} carries no wrapped client key")
        _, wkc = _split_wkc(data)
        try:
            kc, metadata = unwrap_client_key(self.server_key, wkc)
        except WKcError as exc:
            raise WrapError(str(exc)) from None
        session = TLSCryptV2ServerSession(kc, wkc, metadata)
        return session.unwrap(data, now), session, metadata


def early_negotiation_marker(data: bytes) -> bool:
    """True if a tls-crypt(-v2) packet's replay id has the 0x0f early-negotiation top byte."""
    if len(data) < _HDR + 4:
        return False
    (pid,) = struct.unpack_from(">I", data, _HDR)
    return (pid & EARLY_NEG_MASK) == EARLY_NEG_START


def dynamic_tls_crypt(ekm: bytes, base_key: StaticKey | None, server: bool) -> TLSCrypt:
    """Dynamic tls-crypt wrapping for key_id > 0 (spec §5.5).

    ``ekm`` is the 256-byte export "EXPORTER-OpenVPN-dynamic-tls-crypt" of the
    key_id-0 TLS session; ``base_key`` the configured tls-auth / tls-crypt
    key2 or the tls-crypt-v2 Kc (None if no wrapping was configured).
    """
    ekm = bytes(ekm)
    if len(ekm) != StaticKey.SIZE:
        raise LocalProtocolError(f"dynamic tls-crypt needs {StaticKey.SIZE} EKM bytes, "
                                 f"got {len(ekm)}")
    key = StaticKey(ekm) if base_key is None else base_key.xor(ekm)
    return TLSCrypt(key, server=server)
