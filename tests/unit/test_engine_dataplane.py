"""The Python data plane's packet semantics, without a tun or root.

Two data planes with mirrored keys exchange datagrams through their
bytes-in/bytes-out entry points (handle_tun_packet / handle_datagram).  Wire
bytes are checked against an AEAD decryptor written here from the spec
(if_ovpn.md §7), not against the engine's code.
"""
from __future__ import annotations

import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bsd_ovpn.engine.dataplane import PythonDataPlane, SEQ_ROTATE
from bsd_ovpn.ifovpn import PING_MAGIC

A_ADDR = ("192.0.2.1", 1194)
B_ADDR = ("192.0.2.2", 1194)
KEYS = {
    "AES-128-GCM": 16, "AES-192-GCM": 24, "AES-256-GCM": 32, "CHACHA20-POLY1305": 32, "none": 0,
}


def ip4(dst: str, src: str = "198.51.100.1", payload: bytes = b"hello") -> bytes:
    total = 20 + len(payload)
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
            + payload)


def ip6(dst: str, payload: bytes = b"hello6") -> bytes:
    return (struct.pack("!IHBB16s16s", 0x60000000, len(payload), 17, 64,
                        ipaddress.IPv6Address("2001:db8::1").packed,
                        ipaddress.IPv6Address(dst).packed) + payload)


class Clock:
    t = 500.0

    def __call__(self) -> float:
        return self.t


def pair(cipher: str = "AES-256-GCM", *, key_id: int = 0, peer_id: int = 5):
    n = KEYS[cipher]
    ka, kb = bytes(range(n)), bytes(range(100, 100 + n))
    iva, ivb = (b"\x01" * 8, b"\x02" * 8) if n else (b"", b"")
    clock = Clock()
    a, b = PythonDataPlane(clock=clock), PythonDataPlane(clock=clock)
    a.add_peer(peer_id, B_ADDR, A_ADDR, None, None)
    b.add_peer(peer_id, A_ADDR, B_ADDR, None, None)
    a.set_key(peer_id, 0, key_id, cipher, ka, iva, kb, ivb)
    b.set_key(peer_id, 0, key_id, cipher, kb, ivb, ka, iva)
    a.set_running(True)
    b.set_running(True)
    return a, b, (ka, iva), clock


def spec_open(cipher: str, key: bytes, iv: bytes, wire: bytes) -> tuple[int, int, int, bytes]:
    """Independent reading of §7: op32 seq32 tag16 ciphertext; nonce seq||iv; AAD 8 bytes."""
    op, seq = struct.unpack("!II", wire[:8])
    if cipher == "none":
        return op, seq, 0, wire[8:]
    aead = ChaCha20Poly1305(key) if cipher.startswith("CHACHA") else AESGCM(key)
    pt = aead.decrypt(wire[4:8] + iv, wire[24:] + wire[8:24], wire[:8])
    return op, seq, 0, pt


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_round_trip_and_wire_format(cipher):
    a, b, (ka, iva), _ = pair(cipher, key_id=3, peer_id=0x123456)
    for i in range(1, 4):
        pkt = ip4("198.51.100.2", payload=bytes([i]) * 50)
        wire, dest, local = a.handle_tun_packet(pkt)
        assert dest == (4, bytes([192, 0, 2, 2]), 1194, 0)
        op, seq, _, pt = spec_open(cipher, ka, iva, wire)
        assert op == ((9 << 3 | 3) << 24) | 0x123456
        assert seq == i                                     # TX sequence from 1
        assert pt == pkt
        assert len(wire) == len(pkt) + 8 + (0 if cipher == "none" else 16)
        assert b.handle_datagram(wire, A_ADDR) == pkt
    assert a.peer_counters(0x123456).pkt_out == 3
    assert b.peer_counters(0x123456).bytes_in == 3 * 70
    cb = b.iface_counters()
    assert (cb.data_in, cb.tunnel_in, cb.lost_data_in) == (3, 210, 0)
    assert cb.transport_in == sum(70 + 8 + (0 if cipher == "none" else 16) + 8 for _ in range(3))


def test_replay_dropped_by_default_and_switchable():
    a, b, _, _ = pair()
    wire, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    assert b.handle_datagram(wire, A_ADDR) is not None
    assert b.handle_datagram(wire, A_ADDR) is None
    assert b.iface_counters().lost_data_in == 1
    assert b.peer_counters(5).pkt_in == 1
    b.replay_protection = False                 # the FreeBSD sysctl's default
    assert b.handle_datagram(wire, A_ADDR) is not None
    assert b.peer_counters(5).pkt_in == 2


def test_replay_window_accepts_reordering():
    a, b, _, _ = pair()
    wires = [a.handle_tun_packet(ip4("198.51.100.2"))[0] for _ in range(5)]
    for w in (wires[1], wires[0], wires[4], wires[2], wires[3]):
        assert b.handle_datagram(w, A_ADDR) is not None
    for w in wires:
        assert b.handle_datagram(w, A_ADDR) is None


def test_tampered_and_unknown_key_id_are_lost():
    a, b, _, _ = pair()
    wire, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    bad = wire[:30] + bytes([wire[30] ^ 1]) + wire[31:]
    assert b.handle_datagram(bad, A_ADDR) is None
    other_key = bytes([wire[0] ^ 1]) + wire[1:]                  # key id 1: no such key
    assert b.handle_datagram(other_key, A_ADDR) is None
    short = wire[:20]
    assert b.handle_datagram(short, A_ADDR) is None
    assert b.iface_counters().lost_data_in == 3
    assert b.last_active(5) == 0.0                               # nothing valid arrived


def test_rx_uses_either_slot_and_slot0_shadows():
    a, b, (ka, iva), _ = pair()
    # b installs a second key (id 1) in slot 1; a sends with it after its own swap
    k2a, k2b = b"\x33" * 32, b"\x44" * 32
    a.set_key(5, 1, 1, "AES-256-GCM", k2a, iva, k2b, iva)
    b.set_key(5, 1, 1, "AES-256-GCM", k2b, iva, k2a, iva)
    old, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    a.swap_keys(5)
    new, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    assert new[0] & 7 == 1 and struct.unpack("!I", new[4:8])[0] == 1   # new key starts at 1
    assert b.handle_datagram(new, A_ADDR) is not None            # slot 1 on b
    assert b.handle_datagram(old, A_ADDR) is not None            # slot 0 on b
    # DEL_KEY resets slot 0's key id to 0 without a key: key id 0 is now shadowed
    a.swap_keys(5)
    fresh, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))      # key id 0, never seen by b
    b.del_key(5, 0)
    assert b.handle_datagram(fresh, A_ADDR) is None
    assert b.iface_counters().lost_data_in == 1


def test_rotate_key_event_and_sequence_exhaustion():
    a, b, _, _ = pair()
    a.rotate_threshold = 3
    for _ in range(2):
        assert a.handle_tun_packet(ip4("198.51.100.2")) is not None
    assert a.events() == []
    assert a.handle_tun_packet(ip4("198.51.100.2")) is not None   # seq 3: still sent
    assert a.events() == [("rotate_key", 5)]
    a.handle_tun_packet(ip4("198.51.100.2"))
    assert a.events() == []                                       # once per key
    a.set_tx_seq(5, 0, 0xFFFFFFFF)
    wire, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    assert struct.unpack("!I", wire[4:8])[0] == 0xFFFFFFFF
    for _ in range(3):                                            # refused for good
        assert a.handle_tun_packet(ip4("198.51.100.2")) is None
    assert a.iface_counters().nomem_data_out == 3
    assert SEQ_ROTATE == 2 ** 31


def test_ping_is_encrypted_counted_and_dropped_as_non_ip():
    a, b, _, clock = pair()
    sent = []
    a._send = lambda wire, dest, local: sent.append(wire)        # no socket attached
    a.send_ping(5)
    (wire,) = sent
    clock.t = 777.0
    assert b.handle_datagram(wire, A_ADDR) is None
    c = b.iface_counters()
    assert (c.data_in, c.lost_data_in, c.tunnel_in) == (1, 1, len(PING_MAGIC))
    assert b.last_active(5) == 777.0                              # keepalive counts
    assert b.peer_counters(5).pkt_in == 1


def test_float_reported_not_applied():
    a, b, _, _ = pair()
    wire, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    assert b.handle_datagram(wire, ("192.0.2.77", 4000)) is not None
    assert b.events() == [("float", 5, ("192.0.2.77", 4000))]
    out = b.handle_tun_packet(ip4("198.51.100.1"))
    assert out[1] == (4, bytes([192, 0, 2, 1]), 1194, 0)         # still the old remote
    b.set_remote(5, ("192.0.2.77", 4000))
    assert b.handle_tun_packet(ip4("198.51.100.1"))[1][1] == bytes([192, 0, 2, 77])
    # a dual-stack socket's v4-mapped source is the same IPv4 address
    wire, _, _ = a.handle_tun_packet(ip4("198.51.100.2"))
    assert b.handle_datagram(wire, ("::ffff:192.0.2.77", 4000, 0, 0)) is not None
    assert b.events() == []


def test_link_down_and_missing_key():
    a, _, _, _ = pair()
    a.set_running(False)
    assert a.handle_tun_packet(ip4("198.51.100.2")) is None
    assert a.iface_counters().lost_data_out == 1
    assert a.peer_counters(5).pkt_out == 0
    a.set_running(True)
    a.del_key(5, 0)
    assert a.handle_tun_packet(ip4("198.51.100.2")) is None       # ENOLINK: not counted
    assert a.iface_counters().lost_data_out == 1


def test_routing_among_peers():
    dp = PythonDataPlane()
    dp.set_running(True)
    dp.add_peer(1, ("192.0.2.11", 1194), None, bytes([198, 51, 100, 202]), None)
    k = bytes(32)
    dp.set_key(1, 0, 0, "AES-256-GCM", k, bytes(8), k, bytes(8))
    # one peer: everything goes to it, vpn address or not
    assert dp.handle_tun_packet(ip4("198.51.100.9"))[1][1] == \
        bytes([192, 0, 2, 11])
    dp.add_peer(2, ("192.0.2.12", 1194), None, bytes([198, 51, 100, 203]),
                ipaddress.IPv6Address("2001:db8:8::3").packed)
    dp.set_key(2, 0, 0, "AES-256-GCM", k, bytes(8), k, bytes(8))
    assert dp.handle_tun_packet(ip4("198.51.100.203"))[1][1] == bytes([192, 0, 2, 12])
    assert dp.handle_tun_packet(ip4("198.51.100.202"))[1][1] == bytes([192, 0, 2, 11])
    assert dp.handle_tun_packet(ip6("2001:db8:8::3"))[1][1] == bytes([192, 0, 2, 12])
    assert dp.handle_tun_packet(ip4("198.51.100.77")) is None      # no route
    # an iroute: 198.51.100.0/24 via the second peer's tunnel address
    dp.set_routes([(ipaddress.ip_network("198.51.100.0/24"), bytes([198, 51, 100, 203])),
                   (ipaddress.ip_network("198.51.100.64/26"), bytes([198, 51, 100, 202]))])
    assert dp.handle_tun_packet(ip4("198.51.100.7"))[1][1] == bytes([192, 0, 2, 12])
    assert dp.handle_tun_packet(ip4("198.51.100.70"))[1][1] == bytes([192, 0, 2, 11])  # longest
    assert dp.iface_counters().lost_data_out == 1
    assert dp.handle_tun_packet(b"\x10garbage") is None
