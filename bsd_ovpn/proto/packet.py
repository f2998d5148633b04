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
#: opcode value -> member, the same lookup ``Opcode(value)`` does minus the Enum call cost
_OPCODE_BY_VALUE: dict[int, Opcode] = {int(op): op for op in Opcode}
_new = object.__new__
_HEAD = struct.Struct(f">B{SID_SIZE}sB")          # header byte, session id, ACK count
_U32 = struct.Struct(">I")
_ACK_STRUCTS = [struct.Struct(f">{n}I") for n in range(MAX_ACKS + 1)]


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


@dataclass(frozen=True, slots=True, init=False)
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

    def __init__(self, opcode: Opcode | int, key_id: int, session_id: bytes,
                 acks: tuple[int, ...] = (), remote_session_id: bytes | None = None,
                 message_id: int | None = None, payload: bytes = b"") -> None:
        # Constructing checks everything so that encode() can never emit a
        # packet a stock peer drops; decode() maps these to PacketError.
        # (Hot path: one call per packet sent, so a hand-written __init__ that
        # validates the arguments and stores each field once, table lookups, no
        # Enum calls.)
        raw_op = opcode
        try:
            op = _OPCODE_BY_VALUE.get(raw_op)
        except TypeError:                      # unhashable: not an opcode either
            op = None
        if op is None:
            raise PacketBuildError(f"unknown opcode {raw_op!r}")
        if op not in CONTROL_OPCODES:
            raise PacketBuildError(f"{op.name} is not a control opcode a 2.6 peer accepts")
        _set = object.__setattr__
        if key_id.__class__ is not int and not isinstance(key_id, int) \
                or not 0 <= key_id <= KEY_ID_MASK:
            raise PacketBuildError(f"key_id {key_id!r} outside 0..7")
        if key_id and op in HARD_RESET_OPCODES:
            raise PacketBuildError(f"{op.name} must carry key_id 0, not {key_id}")
        if not key_id and op is Opcode.P_CONTROL_SOFT_RESET_V1:
            raise PacketBuildError("P_CONTROL_SOFT_RESET_V1 cannot use key_id 0 (ids wrap to 1)")
        sid = session_id
        if sid.__class__ is not bytes:
            _check_sid(sid, "session_id", nonzero=True)
            sid = bytes(sid)
        elif len(sid) != SID_SIZE or sid == _NULL_SID:
            _check_sid(sid, "session_id", nonzero=True)
        if acks.__class__ is not tuple:
            acks = tuple(acks)
        remote = remote_session_id
        if acks:
            if len(acks) > MAX_ACKS:
                raise PacketBuildError(f"{len(acks)} ACKs, at most {MAX_ACKS} fit a packet")
            for a in acks:
                if a.__class__ is not int and not isinstance(a, int) or not 0 <= a <= _U32_MAX:
                    raise PacketBuildError(f"ACK id {a!r} is not a u32")
            if remote is None:
                raise PacketBuildError("remote_session_id is required when acks are present")
            if remote.__class__ is not bytes or len(remote) != SID_SIZE:
                _check_sid(remote, "remote_session_id", nonzero=False)
                remote = bytes(remote)
        elif remote is not None:
            raise PacketBuildError("remote_session_id is only sent with a non-empty ACK array")
        mid = message_id
        if op is Opcode.P_ACK_V1:
            if not acks:
                raise PacketBuildError("P_ACK_V1 needs at least one ACK")
            if mid is not None or payload:
                raise PacketBuildError("P_ACK_V1 has no message_id and no payload")
        elif mid.__class__ is not int and not isinstance(mid, int) or not 0 <= mid <= _U32_MAX:
            raise PacketBuildError(f"{op.name} needs a u32 message_id, got {mid!r}")
        if payload.__class__ is not bytes:
            if not isinstance(payload, (bytes, bytearray)):
                raise PacketBuildError(f"payload must be bytes, got {type(payload).__name__}")
            payload = bytes(payload)
        _set(self, "opcode", op)
        _set(self, "key_id", key_id)
        _set(self, "session_id", sid)
        _set(self, "acks", acks)
        _set(self, "remote_session_id", remote)
        _set(self, "message_id", mid)
        _set(self, "payload", payload)

    @classmethod
    def _trusted(cls, opcode: Opcode, key_id: int, session_id: bytes, acks: tuple[int, ...],
                 remote_session_id: bytes | None, message_id: int | None,
                 payload: bytes) -> ControlPacket:
        """A packet from fields :meth:`decode` has already checked (skips ``__init__``'s checks)."""
        pkt = _new(cls)
        _set = object.__setattr__
        _set(pkt, "opcode", opcode)
        _set(pkt, "key_id", key_id)
        _set(pkt, "session_id", session_id)
        _set(pkt, "acks", acks)
        _set(pkt, "remote_session_id", remote_session_id)
        _set(pkt, "message_id", message_id)
        _set(pkt, "payload", payload)
        return pkt

    @property
    def header_byte(self) -> int:
        return (int(self.opcode) << OPCODE_SHIFT) | self.key_id

    def encode(self) -> bytes:
        """The plain §3.2 layout; wrappings take this as their input."""
        acks = self.acks
        out = _HEAD.pack((self.opcode << OPCODE_SHIFT) | self.key_id, self.session_id, len(acks))
        if acks:
            assert self.remote_session_id is not None
            out += _ACK_STRUCTS[len(acks)].pack(*acks) + self.remote_session_id
        if self.message_id is not None:
            out += _U32.pack(self.message_id) + self.payload
        return out

    @classmethod
    def decode(cls, data: bytes) -> ControlPacket:
        """Parse and validate a plain-layout packet; any defect is a :class:`PacketError`."""
        data = bytes(data)
        n = len(data)
        # fast path: a well-formed packet passes each rule with one test; anything
        # else goes through _decode_error, which names the first rule it breaks
        if n >= 1 + SID_SIZE + 1:
            op = _CONTROL_BY_FIRST_BYTE[data[0]]
            sid = data[1:9]
            count = data[9]
            if op is not None and sid != _NULL_SID and count <= MAX_ACKS:
                pos = 10
                acks: tuple[int, ...] = ()
                remote: bytes | None = None
                if count:
                    end = pos + 4 * count
                    if end + SID_SIZE <= n:
                        acks = _ACK_STRUCTS[count].unpack_from(data, pos)
                        remote = data[end:end + SID_SIZE]
                    pos = end + SID_SIZE
                if pos <= n:
                    if op is Opcode.P_ACK_V1:
                        if count and pos == n:
                            return cls._trusted(op, data[0] & KEY_ID_MASK, sid, acks, remote,
                                                None, b"")
                    elif pos + 4 <= n:
                        return cls._trusted(op, data[0] & KEY_ID_MASK, sid, acks, remote,
                                            _U32.unpack_from(data, pos)[0], data[pos + 4:])
        raise _decode_error(data)

def _decode_error(data: bytes) -> PacketError:
    """The :class:`PacketError` for a packet the fast path of ``decode`` refused."""
    n = len(data)
    if n < 1 + SID_SIZE:
        return PacketError(f"{n} bytes is shorter than opcode + session id (9)", n)
    raw_op, key_id = data[0] >> OPCODE_SHIFT, data[0] & KEY_ID_MASK
    op = _OPCODE_BY_VALUE.get(raw_op)
    if op is None:
        return PacketError(f"unknown opcode {raw_op}", 0)
    if op in (Opcode.P_CONTROL_HARD_RESET_CLIENT_V1, Opcode.P_CONTROL_HARD_RESET_SERVER_V1):
        return PacketError(f"{op.name}: unsupported key-method 1", 0)
    if op in DATA_OPCODES:
        return PacketError(f"{op.name} is a data packet, not a control packet", 0)
    if op in HARD_RESET_OPCODES and key_id != 0:
        return PacketError(f"{op.name} with key_id {key_id} (must be 0)", 0)
    if op is Opcode.P_CONTROL_SOFT_RESET_V1 and key_id == 0:
        return PacketError("P_CONTROL_SOFT_RESET_V1 with key_id 0", 0)
    if data[1:9] == _NULL_SID:
        return PacketError("session id is all zeros", 1)
    pos = 9
    if pos >= n:
        return PacketError("truncated before ACK count", pos)
    count = data[pos]
    if count > MAX_ACKS:
        return PacketError(f"ACK count {count} exceeds {MAX_ACKS}", pos)
    pos += 1
    if count:
        if pos + 4 * count + SID_SIZE > n:
            return PacketError(f"truncated ACK array ({count} ids + remote session id)", pos)
        pos += 4 * count + SID_SIZE
    if op is Opcode.P_ACK_V1:
        if not count:
            return PacketError("P_ACK_V1 without any ACK", 9)
        if pos != n:
            return PacketError(f"{n - pos} trailing bytes after P_ACK_V1", pos)
    elif pos + 4 > n:
        return PacketError("truncated before message packet-id", pos)
    raise AssertionError(f"decode refused a valid packet {data[:32].hex()}")  # pragma: no cover


def _control_by_first_byte(byte: int) -> Opcode | None:
    """The opcode of a first byte whose opcode and key_id a 2.6 peer accepts, else None."""
    op = _OPCODE_BY_VALUE.get(byte >> OPCODE_SHIFT)
    key_id = byte & KEY_ID_MASK
    if op is None or op not in CONTROL_OPCODES:
        return None
    if op in HARD_RESET_OPCODES and key_id != 0:
        return None
    if op is Opcode.P_CONTROL_SOFT_RESET_V1 and key_id == 0:
        return None
    return op


_CONTROL_BY_FIRST_BYTE: list[Opcode | None] = [_control_by_first_byte(b) for b in range(256)]


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
