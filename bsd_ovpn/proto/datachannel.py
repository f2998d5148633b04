"""The OpenVPN data-channel packet codec (sans-IO), byte-compatible with if_ovpn.

One :class:`DataChannel` holds one key_state's keys (one key_id) for both
directions, exactly what an OVPN_NEW_KEY installs in a kernel slot.  The
userspace engine uses it as its data path, the tests use it to check packets
produced by the kernel or by stock OpenVPN.  Layout (protocol spec §10):

    header (P_DATA_V1: 1 byte, P_DATA_V2: 4 bytes incl. 24-bit peer_id)
    u32 packet id | 16-byte tag | ciphertext          (AEAD, tag BEFORE ciphertext)
    u32 packet id | plaintext                          (cipher "none", as if_ovpn)

AEAD nonce = packet id || 8-byte implicit IV; AD = V2 header || packet id
(V1: packet id only).  Replay protection runs after authentication.
"""
from __future__ import annotations

import collections
import enum
import struct
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from bsd_ovpn.ifovpn import MAX_KEY_ID, MAX_PEER_ID, PING_MAGIC
from bsd_ovpn.proto.keys import DataKeys

__all__ = [
    "AEAD_TAG_SIZE", "OCC_MAGIC", "P_DATA_V1", "P_DATA_V2", "PACKET_ID_MAX",
    "PACKET_ID_WRAP_TRIGGER", "PEER_ID_UNDEF", "PING_MAGIC",
    "DataAuthError", "DataChannel", "DataChannelError", "DataHeader", "DataKeyIdError",
    "DataMalformedError", "DataReplayError", "OccType", "PacketIdExhaustedError",
    "ReplayWindow", "build_occ_exit", "data_header", "is_occ_exit", "is_ping", "parse_data_header",
    "parse_occ",
]

P_DATA_V1 = 6
P_DATA_V2 = 9
PEER_ID_UNDEF = MAX_PEER_ID        # 0xFFFFFF: "no peer-id" on the wire
AEAD_TAG_SIZE = 16
PACKET_ID_SIZE = 4
PACKET_ID_MAX = 0xFFFFFFFF
#: A sender renegotiates once its packet id reaches this (§10.4).
PACKET_ID_WRAP_TRIGGER = 0xFF000000

#: OCC message prefix inside a data packet's plaintext (§10.5).
OCC_MAGIC = bytes.fromhex("287f346bd4ef7a812d56b8d3afc5459c")


class OccType(enum.IntEnum):
    REQUEST = 0
    REPLY = 1
    MTU_LOAD_REQUEST = 2
    MTU_LOAD = 3
    MTU_REQUEST = 4
    MTU_REPLY = 5
    EXIT = 6


# --------------------------------------------------------------------------- errors

class DataChannelError(RemoteProtocolError):
    """A received data packet was dropped; the subclass says why."""


class DataMalformedError(DataChannelError):
    """Not a data packet, or too short for its header/packet id/tag."""


class DataKeyIdError(DataMalformedError):
    """The packet's key_id is not the key_id of this DataChannel."""


class DataAuthError(DataChannelError):
    """AEAD tag verification failed (wrong key, corrupted or forged packet)."""


class DataReplayError(DataChannelError):
    """Authentic packet whose packet id is a replay, too old, expired or 0."""


class PacketIdExhaustedError(LocalProtocolError):
    """The send packet id would pass 2**32-1: a nonce would repeat; renegotiate first."""


# --------------------------------------------------------------------------- headers

class DataHeader(NamedTuple):
    """What the first bytes of a data packet say (enough to route it to a key)."""

    opcode: int            # P_DATA_V1 (6) or P_DATA_V2 (9)
    key_id: int            # 0..7
    peer_id: int | None    # 24-bit peer id (V2) or None (V1)
    size: int              # header length: 1 or 4


def data_header(opcode_key_id: int, peer_id: int | None) -> bytes:
    """The data-packet header: P_DATA_V2 with ``peer_id``, else the P_DATA_V1 byte.

    ``opcode_key_id`` is the key_id (0..7); a full first byte
    (``opcode << 3 | key_id`` with a data opcode) is accepted as well, in
    which case its opcode must agree with ``peer_id`` being set or not.
    """
    if not isinstance(opcode_key_id, int) or not 0 <= opcode_key_id <= 0xFF:
        raise ValidationError(f"data header: key_id must be 0..{MAX_KEY_ID}, "
                              f"got {opcode_key_id!r}")
    key_id = opcode_key_id & 0x07
    if opcode_key_id > MAX_KEY_ID:
        opcode = opcode_key_id >> 3
        want = P_DATA_V2 if peer_id is not None else P_DATA_V1
        if opcode != want:
            raise ValidationError(f"data header: opcode {opcode} given, but peer_id "
                                  f"{peer_id!r} needs opcode {want}")
    if peer_id is None:
        return bytes([P_DATA_V1 << 3 | key_id])
    if not isinstance(peer_id, int) or not 0 <= peer_id <= MAX_PEER_ID:
        raise ValidationError(f"peer_id must be 0..{MAX_PEER_ID:#x}, got {peer_id!r}")
    return struct.pack("!I", (P_DATA_V2 << 3 | key_id) << 24 | peer_id)


def parse_data_header(packet: bytes) -> DataHeader:
    """Opcode, key_id, peer_id and header size of a data packet (for routing to a key)."""
    if not packet:
        raise DataMalformedError("empty data packet")
    opcode, key_id = packet[0] >> 3, packet[0] & 0x07
    if opcode == P_DATA_V1:
        return DataHeader(opcode, key_id, None, 1)
    if opcode == P_DATA_V2:
        if len(packet) < 4:
            raise DataMalformedError(f"P_DATA_V2 packet of {len(packet)} bytes is shorter "
                                     "than its 4-byte header")
        return DataHeader(opcode, key_id, int.from_bytes(packet[1:4], "big"), 4)
    raise DataMalformedError(f"opcode {opcode} is not a data opcode (P_DATA_V1=6, "
                             "P_DATA_V2=9)")


# --------------------------------------------------------------------------- plaintext kinds

def is_ping(plaintext: bytes) -> bool:
    """True for the 16-byte keepalive ping payload (any other length is data)."""
    return plaintext == PING_MAGIC


def build_occ_exit() -> bytes:
    """OCC_EXIT plaintext (explicit-exit-notify without cc-exit)."""
    return OCC_MAGIC + bytes([OccType.EXIT])


def parse_occ(plaintext: bytes) -> tuple[int, bytes] | None:
    """``(type, body)`` if the plaintext is an OCC message, else ``None``.

    ``type`` is an :class:`OccType` when known, the raw byte otherwise (OpenVPN
    ignores unknown OCC types, so callers should too).
    """
    if len(plaintext) <= len(OCC_MAGIC) or not plaintext.startswith(OCC_MAGIC):
        return None
    raw = plaintext[len(OCC_MAGIC)]
    kind: int = OccType(raw) if raw in OccType._value2member_map_ else raw
    return kind, plaintext[len(OCC_MAGIC) + 1:]


def is_occ_exit(plaintext: bytes) -> bool:
    parsed = parse_occ(plaintext)
    return parsed is not None and parsed[0] == OccType.EXIT


# --------------------------------------------------------------------------- replay

class ReplayWindow:
    """Sliding replay window with time backtrack, as OpenVPN's ``--replay-window n t``.

    Accepts an id higher than any seen; otherwise one within the last ``size``
    ids not yet seen, unless it is older than an id first seen more than
    ``time_backtrack`` seconds ago (such ids are expired).  For long-form ids
    (tls-auth / tls-crypt) pass the sender's ``timestamp``: a newer timestamp
    restarts the window, an older one is rejected.  Call :meth:`check` before
    and :meth:`accept` after authentication, or :meth:`check_and_accept` once
    the packet is known to be authentic.
    """

    __slots__ = ("size", "time_backtrack", "_top", "_times", "_stamp", "_expired_upto",
                 "_last_reap")

    def __init__(self, size: int = 64, time_backtrack: float = 15.0) -> None:
        if not isinstance(size, int) or not 1 <= size <= 65536:
            raise ValidationError(f"replay window size must be 1..65536, got {size!r}")
        if time_backtrack < 0:
            raise ValidationError(f"replay time must be >= 0, got {time_backtrack}")
        self.size = size
        self.time_backtrack = float(time_backtrack)
        self._top = 0                # highest id accepted (0 = none yet)
        # _times[d] = when id (_top - d) was accepted, or None if not seen.
        self._times: collections.deque[float | None] = collections.deque(maxlen=size)
        self._stamp = 0              # sender timestamp of the current sequence
        self._expired_upto = 0       # ids <= this are expired by time backtrack
        self._last_reap = float("-inf")

    @property
    def highest(self) -> int:
        """Highest packet id accepted so far (0 before the first)."""
        return self._top

    def _reap(self, now: float) -> None:
        # At most once per second, like OpenVPN: find the newest entry seen
        # longer ago than time_backtrack; it and everything older expire.
        if not self.time_backtrack or now < self._last_reap + 1.0:
            return
        self._last_reap = now
        limit = now - self.time_backtrack
        for d, t in enumerate(self._times):
            if t is not None and t < limit:
                self._expired_upto = max(self._expired_upto, self._top - d)
                break

    def check(self, packet_id: int, now: float, timestamp: int = 0) -> None:
        """Raise :class:`DataReplayError` unless ``packet_id`` would be accepted now."""
        if packet_id == 0:
            raise DataReplayError("packet id 0 is never valid")
        if timestamp != self._stamp:
            if timestamp < self._stamp:
                raise DataReplayError(f"packet timestamp {timestamp} is older than the "
                                      f"current sequence's {self._stamp} (time backtrack)")
            return  # a newer sender timestamp starts a new sequence
        if packet_id > self._top:
            return
        d = self._top - packet_id
        if d >= len(self._times):
            raise DataReplayError(f"packet id {packet_id} is too old (highest {self._top}, "
                                  f"window {self.size})")
        if self._times[d] is not None:
            raise DataReplayError(f"packet id {packet_id} is a replay")
        self._reap(now)
        if packet_id <= self._expired_upto:
            raise DataReplayError(f"packet id {packet_id} arrived more than "
                                  f"{self.time_backtrack:g} s after newer ones (expired)")

    def accept(self, packet_id: int, now: float, timestamp: int = 0) -> None:
        """Record ``packet_id`` as seen (call only after :meth:`check` passed)."""
        if timestamp > self._stamp:  # sender restarted its counter: new sequence
            self._stamp = timestamp
            self._times.clear()
            self._top = 0
            self._expired_upto = 0
        if packet_id > self._top:
            # Ids skipped over stay acceptable (unseen) while inside the window;
            # the deque's maxlen drops what falls out of it.
            self._times.extendleft([None] * min(packet_id - self._top, self.size))
            self._top = packet_id
        d = self._top - packet_id
        if d < len(self._times):
            self._times[d] = now

    def check_and_accept(self, packet_id: int, now: float, timestamp: int = 0) -> None:
        self.check(packet_id, now, timestamp)
        self.accept(packet_id, now, timestamp)


# --------------------------------------------------------------------------- codec

def _make_aead(cipher: str, key: bytes) -> AESGCM | ChaCha20Poly1305 | None:
    if cipher == "none":
        return None
    if cipher == "CHACHA20-POLY1305":
        return ChaCha20Poly1305(key)
    return AESGCM(key)  # AES-128/192/256-GCM: the key length selects the variant


class DataChannel:
    """Encrypt/decrypt data packets of one key_state (sans-IO, no clock of its own).

    ``peer_id`` set → we send P_DATA_V2 with it, else P_DATA_V1.  Both formats
    are accepted on receive (a client sends V1 until it learned its peer-id).
    Send packet ids start at 1; past 2**32-1 :meth:`encrypt` raises
    :class:`PacketIdExhaustedError` (renegotiate at
    :data:`PACKET_ID_WRAP_TRIGGER`, see :attr:`needs_renegotiation`).
    """

    def __init__(self, keys: DataKeys, *, peer_id: int | None, replay_window: int = 64,
                 replay_time: float = 15) -> None:
        if peer_id is not None and (not isinstance(peer_id, int)
                                    or not 0 <= peer_id <= MAX_PEER_ID):
            raise ValidationError(f"peer_id must be 0..{MAX_PEER_ID:#x} or None, "
                                  f"got {peer_id!r}")
        self.keys = keys
        self.peer_id = peer_id
        self.key_id = keys.key_id
        self.replay = ReplayWindow(replay_window, replay_time)
        self._enc = _make_aead(keys.cipher, keys.encrypt_key)
        self._dec = _make_aead(keys.cipher, keys.decrypt_key)
        self._enc_iv = keys.encrypt_iv
        self._dec_iv = keys.decrypt_iv
        self._header = data_header(self.key_id, peer_id)
        self._send_id = 0

    @property
    def send_packet_id(self) -> int:
        """The packet id of the last packet encrypted (0 before the first)."""
        return self._send_id

    @send_packet_id.setter
    def send_packet_id(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= PACKET_ID_MAX:
            raise ValidationError(f"send packet id must be 0..{PACKET_ID_MAX:#x}, got {value!r}")
        self._send_id = value

    @property
    def needs_renegotiation(self) -> bool:
        return self._send_id >= PACKET_ID_WRAP_TRIGGER

    @property
    def overhead(self) -> int:
        """Bytes a packet adds to its plaintext."""
        return len(self._header) + PACKET_ID_SIZE + (AEAD_TAG_SIZE if self._enc else 0)

    def encrypt(self, plaintext: bytes) -> bytes:
        if self._send_id >= PACKET_ID_MAX:
            raise PacketIdExhaustedError(
                f"data channel key_id {self.key_id}: packet id space exhausted "
                f"({PACKET_ID_MAX:#x} packets sent); a new key is required")
        self._send_id += 1
        pid = self._send_id.to_bytes(4, "big")
        if self._enc is None:
            return self._header + pid + plaintext
        ad = self._header + pid if self.peer_id is not None else pid
        sealed = self._enc.encrypt(pid + self._enc_iv, plaintext, ad)
        return self._header + pid + sealed[-AEAD_TAG_SIZE:] + sealed[:-AEAD_TAG_SIZE]

    def decrypt(self, packet: bytes, now: float) -> bytes:
        """Authenticate, then replay-check, then return the plaintext."""
        hdr = parse_data_header(packet)
        if hdr.key_id != self.key_id:
            raise DataKeyIdError(f"data packet for key_id {hdr.key_id} given to the "
                                 f"key_id {self.key_id} data channel")
        body = hdr.size + PACKET_ID_SIZE
        need = body + (AEAD_TAG_SIZE if self._dec else 0)
        if len(packet) < need:
            raise DataMalformedError(f"data packet of {len(packet)} bytes is shorter than "
                                     f"its {need}-byte header, packet id and tag")
        pid_raw = packet[hdr.size:body]
        packet_id = int.from_bytes(pid_raw, "big")
        if self._dec is None:
            plaintext = packet[body:]
        else:
            ad = packet[:body] if hdr.opcode == P_DATA_V2 else pid_raw
            try:
                plaintext = self._dec.decrypt(pid_raw + self._dec_iv,
                                              packet[need:] + packet[body:need], ad)
            except InvalidTag:
                raise DataAuthError(f"data packet (key_id {self.key_id}, packet id "
                                    f"{packet_id}) failed authentication") from None
        self.replay.check_and_accept(packet_id, now)
        return plaintext
