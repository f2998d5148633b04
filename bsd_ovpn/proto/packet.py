"""OpenVPN control-channel packet codec (the plain layout of spec §2–§3.2, §6.4).

Every wrapping (tls-auth, tls-crypt, tls-crypt-v2) turns its wire form back
into this plain layout, so the reliability layer and the session only ever
see one format.  Decoding mirrors the checks a stock 2.6 receiver applies
(spec §3.6) so that a packet we accept is one OpenVPN would accept too, and a
malformed datagram is always a :class:`PacketError` naming where it broke —
never an IndexError from deep inside the session.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Opcode", "PacketError", "PacketBuildError", "ControlPacket", "peek", "ack_size",
    "MAX_ACKS", "CONTROL_SEND_ACK_MAX", "SID_SIZE", "KEY_ID_MASK", "OPCODE_SHIFT",
    "CONTROL_OPCODES", "HARD_RESET_OPCODES", "CLIENT_HARD_RESETS", "DATA_OPCODES",
    "TLV_EARLY_NEG_FLAGS", "EARLY_NEG_FLAG_RESEND_WKC", "encode_tlvs", "decode_tlvs",
    "early_neg_flags",
]


class Opcode(IntEnum):
    """Top five bits of the first byte of every OpenVPN packet (spec §2)."""

    P_CONTROL_HARD_RESET_CLIENT_V1 = 1
    P_CONTROL_HARD_RESET_SERVER_V1 = 2
    P_CONTROL_SOFT_RESET_V1 = 3
    P_CONTROL_V1 = 4
    P_ACK_V1 = 5
    P_DATA_V1 = 6
    P_CONTROL_HARD_RESET_CLIENT_V2 = 7
    P_CONTROL_HARD_RESET_SERVER_V2 = 8
    P_DATA_V2 = 9
    P_CONTROL_HARD_RESET_CLIENT_V3 = 10
    P_CONTROL_WKC_V1 = 11


OPCODE_SHIFT = 3
KEY_ID_MASK = 0x07
SID_SIZE = 8
MAX_ACKS = 8                 # RELIABLE_ACK_SIZE: receivers reject longer ACK arrays
CONTROL_SEND_ACK_MAX = 4     # ACKs piggybacked on a P_CONTROL_*/reset packet

#: Opcodes a 2.6 peer accepts on the control channel (key-method 1 resets are refused).
CONTROL_OPCODES = frozenset({
    Opcode.P_CONTROL_SOFT_RESET_V1, Opcode.P_CONTROL_V1, Opcode.P_ACK_V1,
    Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, Opcode.P_CONTROL_HARD_RESET_SERVER_V2,
    Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, Opcode.P_CONTROL_WKC_V1,
})
HARD_RESET_OPCODES = frozenset({
    Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, Opcode.P_CONTROL_HARD_RESET_SERVER_V2,
    Opcode.P_CONTROL_HARD_RESET_CLIENT_V3,
})
CLIENT_HARD_RESETS = frozenset({
    Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, Opcode.P_CONTROL_HARD_RESET_CLIENT_V3,
})
DATA_OPCODES = frozenset({Opcode.P_DATA_V1, Opcode.P_DATA_V2})

_U32_MAX = 0xFFFFFFFF
_NULL_SID = bytes(SID_SIZE)


class PacketError(RemoteProtocolError):
    """A received control packet is malformed; says at which byte offset and why."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"bad control packet{where}: {reason}")


class PacketBuildError(LocalProtocolError):
    """Our own code tried to build a control packet OpenVPN would reject."""


def ack_size(n: int) -> int:
    """Bytes an ACK array of ``n`` ids takes on the wire (spec §4.1 ACK_SIZE)."""
    if not 0 <= n <= MAX_ACKS:
        raise PacketBuildError(f"ACK array of {n} ids: must be 0..{MAX_ACKS}")
    return 1 + 4 * n + (SID_SIZE if n else 0)


def peek(data: bytes) -> tuple[int, int]:
    """Return ``(opcode, key_id)`` of any packet (control or data) without validating it.

    Dispatch (data vs. control, tls-crypt-v2 reset vs. other) must happen
    before unwrapping, so this looks at the first byte only.  The opcode is
    returned as a plain int because unknown values are legal input here.
    """
    if not data:
        raise PacketError("empty packet", 0)
    return data[0] >> OPCODE_SHIFT, data[0] & KEY_ID_MASK


def _check_sid(value: object, what: str, *, nonzero: bool) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != SID_SIZE:
        raise PacketBuildError(f"{what} must be {SID_SIZE} bytes, got {value!r}")
    if nonzero and value == _NULL_SID:
        raise PacketBuildError(f"{what} must not be all zeros")


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """One control packet in the plain layout (spec §3.2).

    ``acks`` are the acknowledged message packet-ids, newest first;
    ``remote_session_id`` is the receiver's session id and is present exactly
    when ``acks`` is non-empty; ``message_id`` is the reliability sequence
    number (absent only on P_ACK_V1).
    """

    opcode: Opcode
    key_id: int
    session_id: bytes
    acks: tuple[int, ...] = ()
    remote_session_id: bytes | None = None
    message_id: int | None = None
    payload: bytes = b""

    def __post_init__(self) -> None:
        # Constructing checks everything so that encode() can never emit a
        # packet a stock peer drops; decode() maps these to PacketError.
        try:
            op = Opcode(self.opcode)
        except ValueError:
            raise PacketBuildError(f"unknown opcode {self.opcode!r}") from None
        if op not in CONTROL_OPCODES:
            raise PacketBuildError(f"{op.name} is not a control opcode a 2.6 peer accepts")
        object.__setattr__(self, "opcode", op)
        if not isinstance(self.key_id, int) or not 0 <= self.key_id <= KEY_ID_MASK:
            raise PacketBuildError(f"key_id {self.key_id!r} outside 0..7")
        if op in HARD_RESET_OPCODES and self.key_id != 0:
            raise PacketBuildError(f"{op.name} must carry key_id 0, not {self.key_id}")
        if op is Opcode.P_CONTROL_SOFT_RESET_V1 and self.key_id == 0:
            raise PacketBuildError("P_CONTROL_SOFT_RESET_V1 cannot use key_id 0 (ids wrap to 1)")
        _check_sid(self.session_id, "session_id", nonzero=True)
        object.__setattr__(self, "session_id", bytes(self.session_id))
        acks = tuple(self.acks)
        if len(acks) > MAX_ACKS:
            raise PacketBuildError(f"{len(acks)} ACKs, at most {MAX_ACKS} fit a packet")
        for a in acks:
            if not isinstance(a, int) or not 0 <= a <= _U32_MAX:
                raise PacketBuildError(f"ACK id {a!r} is not a u32")
        object.__setattr__(self, "acks", acks)
        if acks:
            if self.remote_session_id is None:
                raise PacketBuildError("remote_session_id is required when acks are present")
            _check_sid(self.remote_session_id, "remote_session_id", nonzero=False)
            object.__setattr__(self, "remote_session_id", bytes(self.remote_session_id))
        elif self.remote_session_id is not None:
            raise PacketBuildError("remote_session_id is only sent with a non-empty ACK array")
        if op is Opcode.P_ACK_V1:
            if not acks:
                raise PacketBuildError("P_ACK_V1 needs at least one ACK")
            if self.message_id is not None or self.payload:
                raise PacketBuildError("P_ACK_V1 has no message_id and no payload")
        else:
            if not isinstance(self.message_id, int) or not 0 <= self.message_id <= _U32_MAX:
                raise PacketBuildError(f"{op.name} needs a u32 message_id, got {self.message_id!r}")
        if not isinstance(self.payload, (bytes, bytearray)):
            raise PacketBuildError(f"payload must be bytes, got {type(self.payload).__name__}")
        object.__setattr__(self, "payload", bytes(self.payload))

    @property
    def header_byte(self) -> int:
        return (int(self.opcode) << OPCODE_SHIFT) | self.key_id

    def encode(self) -> bytes:
        """The plain §3.2 layout; wrappings take this as their input."""
        parts = [bytes((self.header_byte,)), self.session_id, bytes((len(self.acks),))]
        if self.acks:
            parts.append(struct.pack(f">{len(self.acks)}I", *self.acks))
            assert self.remote_session_id is not None
            parts.append(self.remote_session_id)
        if self.message_id is not None:
            parts.append(struct.pack(">I", self.message_id))
            parts.append(self.payload)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> ControlPacket:
        """Parse and validate a plain-layout packet; any defect is a :class:`PacketError`."""
        data = bytes(data)
        n = len(data)
        if n < 1 + SID_SIZE:
            raise PacketError(f"{n} bytes is shorter than opcode + session id (9)", n)
        raw_op, key_id = data[0] >> OPCODE_SHIFT, data[0] & KEY_ID_MASK
        try:
            op = Opcode(raw_op)
        except ValueError:
            raise PacketError(f"unknown opcode {raw_op}", 0) from None
        if op in (Opcode.P_CONTROL_HARD_RESET_CLIENT_V1, Opcode.P_CONTROL_HARD_RESET_SERVER_V1):
            raise PacketError(f"{op.name}: unsupported key-method 1", 0)
        if op in DATA_OPCODES:
            raise PacketError(f"{op.name} is a data packet, not a control packet", 0)
        if op in HARD_RESET_OPCODES and key_id != 0:
            raise PacketError(f"{op.name} with key_id {key_id} (must be 0)", 0)
        if op is Opcode.P_CONTROL_SOFT_RESET_V1 and key_id == 0:
            raise PacketError("P_CONTROL_SOFT_RESET_V1 with key_id 0", 0)
        sid = data[1:9]
        if sid == _NULL_SID:
            raise PacketError("session id is all zeros", 1)
        pos = 9
        if pos >= n:
            raise PacketError("truncated before ACK count", pos)
        count = data[pos]
        if count > MAX_ACKS:
            raise PacketError(f"ACK count {count} exceeds {MAX_ACKS}", pos)
        pos += 1
        acks: tuple[int, ...] = ()
        remote: bytes | None = None
        if count:
            need = 4 * count + SID_SIZE
            if pos + need > n:
                raise PacketError(f"truncated ACK array ({count} ids + remote session id)", pos)
            acks = struct.unpack_from(f">{count}I", data, pos)
            pos += 4 * count
            remote = data[pos:pos + SID_SIZE]
            pos += SID_SIZE
        message_id: int | None = None
        payload = b""
        if op is Opcode.P_ACK_V1:
            if not count:
                raise PacketError("P_ACK_V1 without any ACK", 9)
            if pos != n:
                raise PacketError(f"{n - pos} trailing bytes after P_ACK_V1", pos)
        else:
            if pos + 4 > n:
                raise PacketError("truncated before message packet-id", pos)
            (message_id,) = struct.unpack_from(">I", data, pos)
            payload = data[pos + 4:]
        try:
            return cls(op, key_id, sid, acks, remote, message_id, payload)
        except PacketBuildError as exc:  # defensive: every rule above should have caught it
            raise PacketError(str(exc)) from None


# --- early-negotiation TLVs (spec §6.4): payload of a HARD_RESET_SERVER_V2 -----------------

TLV_EARLY_NEG_FLAGS = 0x0001
EARLY_NEG_FLAG_RESEND_WKC = 0x0001


def encode_tlvs(tlvs: list[tuple[int, bytes]]) -> bytes:
    """Encode ``u16 type || u16 length || value`` records."""
    out = []
    for typ, value in tlvs:
        if not 0 <= typ <= 0xFFFF or len(value) > 0xFFFF:
            raise PacketBuildError(f"TLV type {typ} / length {len(value)} does not fit u16")
        out.append(struct.pack(">HH", typ, len(value)) + bytes(value))
    return b"".join(out)


def decode_tlvs(payload: bytes) -> list[tuple[int, bytes]]:
    """Split a hard-reset payload into TLV records; malformed input is a :class:`PacketError`."""
    out = []
    pos, n = 0, len(payload)
    while pos < n:
        if pos + 4 > n:
            raise PacketError("truncated TLV header in reset payload", pos)
        typ, length = struct.unpack_from(">HH", payload, pos)
        if pos + 4 + length > n:
            raise PacketError(f"TLV type {typ} length {length} runs past the payload", pos)
        out.append((typ, bytes(payload[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return out


def early_neg_flags(payload: bytes) -> int:
    """The EARLY_NEG_FLAGS value in a server reset payload (0 if absent); unknown TLVs skipped."""
    flags = 0
    for typ, value in decode_tlvs(payload):
        if typ == TLV_EARLY_NEG_FLAGS:
            if len(value) != 2:
                raise PacketError(f"EARLY_NEG_FLAGS TLV has length {len(value)}, expected 2")
            flags = struct.unpack(">H", value)[0]
    return flags
