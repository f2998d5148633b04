"""Control packet codec: layout, sizes from the spec, every validation rule, fuzz."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError
from bsd_ovpn.proto.packet import (
    CONTROL_SEND_ACK_MAX, MAX_ACKS, ControlPacket, Opcode, PacketBuildError, PacketError,
    ack_size, decode_tlvs, early_neg_flags, encode_tlvs, peek,
)

CSID = bytes.fromhex("1122334455667788")
SSID = bytes.fromhex("a1a2a3a4a5a6a7a8")


def test_opcode_values_match_spec_table():
    expected = {
        "P_CONTROL_HARD_RESET_CLIENT_V1": 1, "P_CONTROL_HARD_RESET_SERVER_V1": 2,
        "P_CONTROL_SOFT_RESET_V1": 3, "P_CONTROL_V1": 4, "P_ACK_V1": 5, "P_DATA_V1": 6,
        "P_CONTROL_HARD_RESET_CLIENT_V2": 7, "P_CONTROL_HARD_RESET_SERVER_V2": 8,
        "P_DATA_V2": 9, "P_CONTROL_HARD_RESET_CLIENT_V3": 10, "P_CONTROL_WKC_V1": 11,
    }
    assert {o.name: o.value for o in Opcode} == expected
    assert MAX_ACKS == 8 and CONTROL_SEND_ACK_MAX == 4


def test_client_reset_is_14_bytes_exact_layout():
    p = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, CSID, message_id=0)
    raw = p.encode()
    assert raw == bytes([0x38]) + CSID + b"\x00" + b"\x00\x00\x00\x00"
    assert len(raw) == 14
    assert ControlPacket.decode(raw) == p


def test_server_reset_acking_client_is_26_bytes():
    p = ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, SSID, acks=(0,),
                      remote_session_id=CSID, message_id=0)
    raw = p.encode()
    assert len(raw) == 26
    assert raw == bytes([0x40]) + SSID + b"\x01" + bytes(4) + CSID + bytes(4)
    assert ControlPacket.decode(raw) == p


def test_ack_v1_layout_newest_first():
    p = ControlPacket(Opcode.P_ACK_V1, 2, CSID, acks=(3, 2, 1), remote_session_id=SSID)
    raw = p.encode()
    assert raw == (bytes([0x2A]) + CSID + b"\x03" + bytes.fromhex("000000030000000200000001")
                   + SSID)
    q = ControlPacket.decode(raw)
    assert q.acks == (3, 2, 1) and q.message_id is None and q.payload == b""
    assert q.key_id == 2 and q.opcode is Opcode.P_ACK_V1


def test_control_v1_with_payload_and_piggybacked_ack():
    p = ControlPacket(Opcode.P_CONTROL_V1, 0, CSID, acks=(0,), remote_session_id=SSID,
                      message_id=1, payload=b"\x16\x03\x01hello")
    q = ControlPacket.decode(p.encode())
    assert q == p and q.payload.startswith(b"\x16\x03\x01")


@pytest.mark.parametrize("n,size", [(0, 1), (1, 13), (4, 25), (8, 41)])
def test_ack_size(n, size):
    assert ack_size(n) == size
    if n:
        p = ControlPacket(Opcode.P_ACK_V1, 0, CSID, acks=tuple(range(n)), remote_session_id=SSID)
        assert len(p.encode()) == 9 + size


def test_ack_size_rejects_out_of_range():
    with pytest.raises(LocalProtocolError):
        ack_size(9)


def test_peek():
    assert peek(b"\x4b") == (9, 3)
    assert peek(bytes([0x58]) + bytes(100)) == (Opcode.P_CONTROL_WKC_V1, 0)
    with pytest.raises(PacketError):
        peek(b"")


# --- decode validation rules -------------------------------------------------------------

def _raw(first: int, rest: bytes) -> bytes:
    return bytes([first]) + rest


@pytest.mark.parametrize("data,fragment", [
    (b"", "shorter"),
    (bytes([0x38]) + CSID[:7], "shorter"),
    (_raw(0x38, CSID), "ACK count"),                                # no ack count byte
    (_raw(0x38, CSID + b"\x00\x00\x00"), "message packet-id"),      # short message id
    (_raw(0x00, CSID + bytes(5)), "unknown opcode 0"),
    (_raw(0x60, CSID + bytes(5)), "unknown opcode 12"),
    (_raw(0xF8, CSID + bytes(5)), "unknown opcode 31"),
    (_raw(0x08, CSID + bytes(5)), "key-method 1"),
    (_raw(0x10, CSID + bytes(5)), "key-method 1"),
    (_raw(0x30, CSID + bytes(5)), "data packet"),
    (_raw(0x48, CSID + bytes(5)), "data packet"),
    (_raw(0x39, CSID + bytes(5)), "key_id 1"),                      # hard reset key_id != 0
    (_raw(0x41, CSID + bytes(5)), "key_id 1"),
    (_raw(0x57, CSID + bytes(5)), "key_id 7"),
    (_raw(0x18, CSID + bytes(5)), "SOFT_RESET_V1 with key_id 0"),
    (_raw(0x20, bytes(8) + bytes(5)), "all zeros"),                 # null session id
    (_raw(0x20, CSID + b"\x09" + bytes(36 + 8 + 4)), "exceeds 8"),  # 9 acks
    (_raw(0x20, CSID + b"\x02" + bytes(8)), "truncated ACK array"),
    (_raw(0x20, CSID + b"\x01" + bytes(4) + SSID), "message packet-id"),
    (_raw(0x28, CSID + b"\x00"), "without any ACK"),
    (_raw(0x28, CSID + b"\x00" + bytes(4)), "without any ACK"),
    (_raw(0x28, CSID + b"\x01" + bytes(4) + SSID + b"\x00\x00\x00\x01"), "trailing"),
])
def test_decode_rejects(data, fragment):
    with pytest.raises(PacketError) as info:
        ControlPacket.decode(data)
    assert fragment in str(info.value)
    assert isinstance(info.value, RemoteProtocolError)


def test_packet_error_names_offset():
    with pytest.raises(PacketError) as info:
        ControlPacket.decode(_raw(0x20, CSID + b"\x09" + bytes(60)))
    assert info.value.offset == 9
    assert "offset 9" in str(info.value)


def test_soft_reset_with_nonzero_key_id_ok():
    p = ControlPacket(Opcode.P_CONTROL_SOFT_RESET_V1, 1, CSID, message_id=0)
    assert ControlPacket.decode(p.encode()) == p
    assert p.encode()[0] == 0x19


def test_max_acks_accepted():
    p = ControlPacket(Opcode.P_ACK_V1, 0, CSID, acks=tuple(range(8)), remote_session_id=SSID)
    assert ControlPacket.decode(p.encode()).acks == tuple(range(8))


# --- construction rules (LocalProtocolError) --------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    (dict(opcode=Opcode.P_DATA_V2, key_id=0, session_id=CSID, message_id=0), "not a control"),
    (dict(opcode=Opcode.P_CONTROL_HARD_RESET_CLIENT_V1, key_id=0, session_id=CSID,
          message_id=0), "not a control"),
    (dict(opcode=99, key_id=0, session_id=CSID, message_id=0), "unknown opcode"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=8, session_id=CSID, message_id=0), "key_id"),
    (dict(opcode=Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, key_id=1, session_id=CSID,
          message_id=0), "key_id 0"),
    (dict(opcode=Opcode.P_CONTROL_SOFT_RESET_V1, key_id=0, session_id=CSID,
          message_id=0), "key_id 0"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=bytes(8), message_id=0), "zeros"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=b"short", message_id=0), "8 bytes"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID, acks=(1,), message_id=0),
     "remote_session_id is required"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID, remote_session_id=SSID,
          message_id=0), "only sent with"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID, acks=tuple(range(9)),
          remote_session_id=SSID, message_id=0), "at most 8"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID, acks=(-1,),
          remote_session_id=SSID, message_id=0), "u32"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID), "message_id"),
    (dict(opcode=Opcode.P_CONTROL_V1, key_id=0, session_id=CSID, message_id=2**32), "message_id"),
    (dict(opcode=Opcode.P_ACK_V1, key_id=0, session_id=CSID), "at least one"),
    (dict(opcode=Opcode.P_ACK_V1, key_id=0, session_id=CSID, acks=(1,),
          remote_session_id=SSID, message_id=3), "no message_id"),
    (dict(opcode=Opcode.P_ACK_V1, key_id=0, session_id=CSID, acks=(1,),
          remote_session_id=SSID, payload=b"x"), "no message_id"),
])
def test_construction_rejects(kwargs, fragment):
    with pytest.raises(PacketBuildError) as info:
        ControlPacket(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, LocalProtocolError)


def test_int_opcode_is_normalised():
    p = ControlPacket(4, 0, CSID, message_id=5)
    assert p.opcode is Opcode.P_CONTROL_V1


# --- TLVs -------------------------------------------------------------------------------

def test_early_neg_tlv_spec_bytes():
    payload = encode_tlvs([(1, b"\x00\x01")])
    assert payload == bytes.fromhex("000100020001")
    assert early_neg_flags(payload) == 1
    assert early_neg_flags(b"") == 0
    # unknown types are skipped
    assert early_neg_flags(encode_tlvs([(7, b"abc"), (1, b"\x00\x01")])) == 1
    assert decode_tlvs(encode_tlvs([(7, b"")])) == [(7, b"")]


@pytest.mark.parametrize("payload", [b"\x00", b"\x00\x01\x00\x05\x00", b"\x00\x01\x00\x01\x00"])
def test_bad_tlvs(payload):
    with pytest.raises(PacketError):
        early_neg_flags(payload)


# --- property tests ---------------------------------------------------------------------

_sids = st.binary(min_size=8, max_size=8).filter(lambda b: b != bytes(8))
_u32 = st.integers(0, 2**32 - 1)


@st.composite
def _packets(draw):
    op = draw(st.sampled_from(sorted({
        Opcode.P_CONTROL_SOFT_RESET_V1, Opcode.P_CONTROL_V1, Opcode.P_ACK_V1,
        Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, Opcode.P_CONTROL_HARD_RESET_SERVER_V2,
        Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, Opcode.P_CONTROL_WKC_V1})))
    if op in (7, 8, 10):
        key_id = 0
    elif op == 3:
        key_id = draw(st.integers(1, 7))
    else:
        key_id = draw(st.integers(0, 7))
    acks = tuple(draw(st.lists(_u32, min_size=1 if op == 5 else 0, max_size=8)))
    remote = draw(st.binary(min_size=8, max_size=8)) if acks else None
    if op == 5:
        return ControlPacket(op, key_id, draw(_sids), acks, remote)
    return ControlPacket(op, key_id, draw(_sids), acks, remote, draw(_u32),
                         draw(st.binary(max_size=64)))


@given(_packets())
@settings(max_examples=300, deadline=None)
def test_roundtrip(p):
    raw = p.encode()
    assert ControlPacket.decode(raw) == p
    assert ControlPacket.decode(raw).encode() == raw
    assert peek(raw) == (p.opcode, p.key_id)


@given(st.binary(max_size=120))
@settings(max_examples=1500, deadline=None)
def test_fuzz_only_packet_error_escapes(data):
    try:
        p = ControlPacket.decode(data)
    except PacketError:
        return
    assert p.encode() == data


@given(_packets(), st.data())
@settings(max_examples=300, deadline=None)
def test_fuzz_mutations(p, data):
    raw = bytearray(p.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        q = ControlPacket.decode(bytes(raw[:cut]))
    except PacketError:
        return
    assert q.encode() == bytes(raw[:cut])


def test_decode_accepts_memoryview_and_bytearray():
    raw = ControlPacket(Opcode.P_CONTROL_V1, 0, CSID, message_id=1, payload=b"x").encode()
    assert ControlPacket.decode(bytearray(raw)).payload == b"x"
    assert ControlPacket.decode(memoryview(raw)).message_id == 1
    assert struct.unpack(">I", raw[10:14]) == (1,)
