"""The C data plane (cdefs/fastpath.c via bsd_ovpn.engine.fastpath), without root.

The "tun" is one end of an AF_UNIX datagram socketpair (read/write keep packet
boundaries, as a tun does) and the peer is a plain UDP socket on loopback, so
the real C threads run.  Every expected packet is computed independently with
``cryptography``'s AEADs from the wire format in shared/spec/if_ovpn.md §7.
Negative checks use a barrier: packets are handled in order, so when a later
valid packet comes out first, the earlier one was dropped.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import sys
import time
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bsd_ovpn import binding
from bsd_ovpn.engine.dataplane import DataPlane, IfaceCounters, PeerCounters
from bsd_ovpn.engine.fastpath import FastDataPlane
from bsd_ovpn.errors import IfOvpnError, ValidationError
from bsd_ovpn.ifovpn import PING_MAGIC

LO = "127.0.0.1"


def op32(key_id: int, peer_id: int) -> int:
    return ((9 << 3 | key_id) << 24) | peer_id


def seal(cipher: str, key: bytes, iv: bytes, key_id: int, peer_id: int, seq: int,
         plaintext: bytes) -> bytes:
    """A P_DATA_V2 datagram computed with `cryptography` (tag before ciphertext)."""
    hdr = struct.pack(">II", op32(key_id, peer_id), seq)
    if cipher == "none":
        return hdr + plaintext
    aead = ChaCha20Poly1305(key) if cipher.startswith("CHACHA") else AESGCM(key)
    ct = aead.encrypt(struct.pack(">I", seq) + iv, plaintext, hdr)
    return hdr + ct[-16:] + ct[:-16]


def ip4(dst: str = "198.51.100.2", size: int = 60) -> bytes:
    """An IPv4-looking packet (the data plane reads only version and destination)."""
    body = bytearray(os.urandom(size))
    body[0] = 0x45
    body[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(body)


def ip6(dst: str = "2001:db8:1::2", size: int = 80) -> bytes:
    body = bytearray(os.urandom(size))
    body[0] = 0x60
    body[24:40] = ipaddress.IPv6Address(dst).packed
    return bytes(body)


class Rig:
    """One FastDataPlane on loopback with a fake tun and remote peer sockets."""

    def __init__(self) -> None:
        self.dp = FastDataPlane()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LO, 0))
        self.addr = self.udp.getsockname()
        self.tun_engine, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.settimeout(5)
        self.remotes: list[socket.socket] = []
        self.dp.attach(self.udp.fileno(), self.tun_engine.fileno())

    def remote(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((LO, 0))
        s.settimeout(5)
        self.remotes.append(s)
        return s

    def close(self) -> None:
        self.dp.close()
        for s in [self.udp, self.tun_engine, self.tun, *self.remotes]:
            s.close()

    def to_tun(self, packet: bytes) -> None:
        """A packet the host routes into the tunnel (the engine reads it from the tun)."""
        self.tun.send(packet)

    def from_tun(self) -> bytes:
        return self.tun.recv(70000)

    def wait_counters(self, pred, timeout: float = 5.0) -> IfaceCounters:
        deadline = time.monotonic() + timeout
        while True:
            c = self.dp.iface_counters()
            if pred(c) or time.monotonic() > deadline:
                return c
            time.sleep(0.005)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


KEYS = {
    "AES-128-GCM": 16,
    "AES-192-GCM": 24,
    "AES-256-GCM": 32,
    "CHACHA20-POLY1305": 32,
    "none": 0,
}


def install(rig: Rig, peer_id: int, cipher: str = "AES-256-GCM", slot: int = 0,
            key_id: int = 0, remote: socket.socket | None = None, vpn4: str | None = None,
            vpn6: str | None = None, add: bool = True) -> dict:
    remote = remote or rig.remote()
    if add:
        rig.dp.add_peer(peer_id, remote.getsockname(), None,
                        ipaddress.IPv4Address(vpn4).packed if vpn4 else None,
                        ipaddress.IPv6Address(vpn6).packed if vpn6 else None)
    n = KEYS[cipher]
    k = {"cipher": cipher, "enc_key": os.urandom(n), "enc_iv": os.urandom(8) if n else b"",
         "dec_key": os.urandom(n), "dec_iv": os.urandom(8) if n else b"", "remote": remote,
         "key_id": key_id, "peer_id": peer_id}
    rig.dp.set_key(peer_id, slot, key_id, cipher, k["enc_key"], k["enc_iv"], k["dec_key"],
                   k["dec_iv"])
    return k


def expect_tx(k: dict, seq: int, plaintext: bytes) -> bytes:
    return seal(k["cipher"], k["enc_key"], k["enc_iv"], k["key_id"], k["peer_id"], seq, plaintext)


def make_rx(k: dict, seq: int, plaintext: bytes, key_id: int | None = None) -> bytes:
    return seal(k["cipher"], k["dec_key"], k["dec_iv"],
                k["key_id"] if key_id is None else key_id, k["peer_id"], seq, plaintext)


def test_is_a_dataplane() -> None:
    dp = FastDataPlane()
    try:
        assert isinstance(dp, DataPlane)
        assert dp.replay_protection is True
        assert dp.rotate_threshold == 2**31
    finally:
        dp.close()


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_tx_byte_exact(rig: Rig, cipher: str) -> None:
    k = install(rig, 0x123456, cipher, key_id=5)
    pkts = [ip4(size=20), ip4(size=1400), ip6(size=1280)]
    for seq, pkt in enumerate(pkts, start=1):
        rig.to_tun(pkt)
        assert k["remote"].recv(70000) == expect_tx(k, seq, pkt)
    c = rig.dp.peer_counters(0x123456)
    assert c == PeerCounters(0, 3, 0, sum(map(len, pkts)))
    ic = rig.wait_counters(lambda c: c.data_out == 3)
    hdr = 8 if cipher == "none" else 24
    assert ic.data_out == 3 and ic.tunnel_out == sum(map(len, pkts))
    assert ic.transport_out == sum(len(p) + hdr + 8 + 20 for p in pkts)


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_rx_byte_exact(rig: Rig, cipher: str) -> None:
    k = install(rig, 7, cipher, key_id=2)
    pkts = [ip4(size=20), ip6(size=1400)]
    for seq, pkt in enumerate(pkts, start=1):
        k["remote"].sendto(make_rx(k, seq, pkt), rig.addr)
        assert rig.from_tun() == pkt
    c = rig.dp.peer_counters(7)
    assert (c.pkt_in, c.bytes_in) == (2, sum(map(len, pkts)))
    ic = rig.dp.iface_counters()
    hdr = 8 if cipher == "none" else 24
    assert ic.data_in == 2 and ic.tunnel_in == sum(map(len, pkts))
    assert ic.transport_in == sum(len(p) + hdr + 8 for p in pkts)
    assert abs(rig.dp.last_active(7) - time.monotonic()) < 2


def test_auth_failure_and_wrong_key_are_lost(rig: Rig) -> None:
    k = install(rig, 1)
    good = ip4()
    bad = bytearray(make_rx(k, 1, ip4()))
    bad[-1] ^= 1
    k["remote"].sendto(bytes(bad), rig.addr)
    k["remote"].sendto(make_rx(k, 2, ip4(), key_id=3), rig.addr)   # no key with id 3
    k["remote"].sendto(make_rx(k, 3, good), rig.addr)
    assert rig.from_tun() == good
    ic = rig.dp.iface_counters()
    assert ic.lost_data_in == 2 and ic.data_in == 1
    assert rig.dp.peer_counters(1).pkt_in == 1


def test_short_and_unknown_peer_datagrams(rig: Rig) -> None:
    k = install(rig, 1)
    k["remote"].sendto(b"\x48\0\0", rig.addr)
    k["remote"].sendto(make_rx({**k, "peer_id": 2}, 1, ip4()), rig.addr)
    good = ip4()
    k["remote"].sendto(make_rx(k, 1, good), rig.addr)
    assert rig.from_tun() == good
    assert rig.dp.iface_counters().lost_data_in == 2


def test_replay_window(rig: Rig) -> None:
    k = install(rig, 1)
    marks: dict[bytes, int] = {}

    def rx(seq: int) -> None:
        pkt = ip4()
        marks[pkt] = seq
        k["remote"].sendto(make_rx(k, seq, pkt), rig.addr)

    def delivered(barrier: int) -> list[int]:
        """Sequence numbers delivered since the last call (up to the barrier)."""
        rx(barrier)
        got = []
        while True:
            pkt = rig.from_tun()
            seq = marks[pkt]
            if seq == barrier:
                return got
            got.append(seq)

    rx(1); rx(3); rx(2); rx(3); rx(1)
    assert delivered(4) == [1, 3, 2]
    rx(0)                          # 0 is never valid
    rx(70)                         # a jump past the window restarts it at 70
    rx(10)                         # now behind the window: refused
    rx(69)                         # also behind (the kernel's window restarts)
    assert delivered(71) == [70]
    assert rig.dp.iface_counters().lost_data_in == 5

    rig.dp.replay_protection = False
    rx(5); rx(5)
    assert delivered(72) == [5, 5]


def test_slots_swap_and_delete(rig: Rig) -> None:
    k0 = install(rig, 9, key_id=0)
    k1 = install(rig, 9, slot=1, key_id=1, remote=k0["remote"], add=False)
    r = k0["remote"]
    # RX finds the key by key id in either slot.
    p0, p1 = ip4(), ip4()
    r.sendto(make_rx(k1, 1, p1), rig.addr)
    r.sendto(make_rx(k0, 1, p0), rig.addr)
    assert [rig.from_tun(), rig.from_tun()] == [p1, p0]
    # TX always uses slot 0.
    pkt = ip4()
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k0, 1, pkt)
    rig.dp.swap_keys(9)
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k1, 1, pkt)
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k1, 2, pkt)
    rig.dp.swap_keys(9)
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k0, 2, pkt)   # the old key keeps its sequence
    rig.dp.del_key(9, 1)
    with pytest.raises(IfOvpnError) as ei:
        rig.dp.swap_keys(9)
    assert ei.value.errno == errno.ENOLINK
    rig.dp.del_key(9, 0)
    # No primary key: TX silently dropped (ENOLINK), RX with key id 0 is lost.
    rig.to_tun(pkt)
    r.sendto(make_rx(k0, 9, ip4()), rig.addr)
    rig.wait_counters(lambda c: c.lost_data_in == 1)
    rig.dp.set_key(9, 0, 0, "AES-256-GCM", k0["enc_key"], k0["enc_iv"], k0["dec_key"],
                   k0["dec_iv"])
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k0, 1, pkt)   # a new key starts at 1


def test_rotate_threshold_once_per_key(rig: Rig) -> None:
    k = install(rig, 4)
    rig.dp.rotate_threshold = 3
    assert rig.dp.events() == []
    for seq in range(1, 6):
        pkt = ip4()
        rig.to_tun(pkt)
        assert k["remote"].recv(2000) == expect_tx(k, seq, pkt)   # the packet still goes
        if seq == 2:
            assert rig.dp.events() == []
    r, _, _ = select.select([rig.dp.event_fd], [], [], 2)
    assert r, "event fd not readable"
    assert rig.dp.events() == [("rotate_key", 4)]
    assert rig.dp.events() == []
    assert not select.select([rig.dp.event_fd], [], [], 0)[0]


def test_sequence_exhaustion_drops_for_good(rig: Rig) -> None:
    k = install(rig, 4)
    rig.dp.set_tx_seq(4, 0, 2**32 - 1)
    pkt = ip4()
    rig.to_tun(pkt)
    assert k["remote"].recv(2000) == expect_tx(k, 2**32 - 1, pkt)
    rig.to_tun(ip4())
    rig.to_tun(ip4())
    c = rig.wait_counters(lambda c: c.nomem_data_out == 2)
    assert c.nomem_data_out == 2 and c.data_out == 1
    k["remote"].settimeout(0.2)
    with pytest.raises(socket.timeout):
        k["remote"].recv(2000)


def test_ping_and_non_ip_plaintext(rig: Rig) -> None:
    k = install(rig, 3)
    rig.dp.send_ping(3)
    assert k["remote"].recv(2000) == expect_tx(k, 1, PING_MAGIC)
    k["remote"].sendto(make_rx(k, 1, PING_MAGIC), rig.addr)
    k["remote"].sendto(make_rx(k, 2, b""), rig.addr)
    good = ip6()
    k["remote"].sendto(make_rx(k, 3, good), rig.addr)
    assert rig.from_tun() == good
    c = rig.dp.iface_counters()
    assert (c.lost_data_in, c.nomem_data_in, c.data_in) == (1, 1, 3)
    assert rig.dp.peer_counters(3) == PeerCounters(3, 1, 16 + len(good), 16)
    rig.dp.del_key(3, 0)
    rig.dp.send_ping(3)          # no key: nothing sent, no error (the kernel's callout)
    with pytest.raises(IfOvpnError) as ei:
        rig.dp.send_ping(1234)
    assert ei.value.errno == errno.ENOENT


def test_float_event_and_set_remote(rig: Rig) -> None:
    k = install(rig, 6)
    old = k["remote"]
    new1, new2 = rig.remote(), rig.remote()
    for seq, sock in ((1, new1), (2, new2)):
        sock.sendto(make_rx(k, seq, ip4()), rig.addr)
        rig.from_tun()
    # One pending float per peer carrying the newest address; remote unchanged.
    assert rig.dp.events() == [("float", 6, new2.getsockname())]
    pkt = ip4()
    rig.to_tun(pkt)
    assert old.recv(2000) == expect_tx(k, 1, pkt)
    rig.dp.set_remote(6, new2.getsockname())
    new2.sendto(make_rx(k, 3, ip4()), rig.addr)
    rig.from_tun()
    assert rig.dp.events() == []
    rig.to_tun(pkt)
    assert new2.recv(2000) == expect_tx(k, 2, pkt)


def test_routing_by_vpn_address_and_gateway(rig: Rig) -> None:
    a = install(rig, 10, vpn4="198.51.100.10", vpn6="2001:db8:1::10")
    b = install(rig, 11, vpn4="198.51.100.11")
    pa, pb, pa6 = ip4("198.51.100.10"), ip4("198.51.100.11"), ip6("2001:db8:1::10")
    for pkt, k in ((pa, a), (pb, b), (pa6, a)):
        rig.to_tun(pkt)
    assert a["remote"].recv(2000) == expect_tx(a, 1, pa)
    assert a["remote"].recv(2000) == expect_tx(a, 2, pa6)
    assert b["remote"].recv(2000) == expect_tx(b, 1, pb)
    rig.to_tun(ip4("198.51.100.99"))
    rig.to_tun(b"\x00\x01\x02")                       # not IP, several peers: no route
    rig.wait_counters(lambda c: c.lost_data_out == 2)
    # iroute-style: a subnet via a peer's VPN address; longest prefix wins.
    rig.dp.set_routes([
        (ipaddress.ip_network("192.0.2.0/24"), ipaddress.IPv4Address("198.51.100.10").packed),
        (ipaddress.ip_network("192.0.2.128/25"), ipaddress.IPv4Address("198.51.100.11").packed),
    ])
    p1, p2 = ip4("192.0.2.5"), ip4("192.0.2.200")
    rig.to_tun(p1)
    rig.to_tun(p2)
    assert a["remote"].recv(2000) == expect_tx(a, 3, p1)
    assert b["remote"].recv(2000) == expect_tx(b, 2, p2)
    rig.dp.set_routes([])
    rig.to_tun(ip4("192.0.2.5"))
    rig.wait_counters(lambda c: c.lost_data_out == 3)
    # Back to one peer: everything goes to it, whatever the destination.
    rig.dp.del_peer(11)
    rig.to_tun(p2)
    assert a["remote"].recv(2000) == expect_tx(a, 4, p2)


def test_link_down_counts_lost(rig: Rig) -> None:
    k = install(rig, 1)
    rig.dp.set_running(False)
    rig.to_tun(ip4())
    rig.wait_counters(lambda c: c.lost_data_out == 1)
    rig.dp.send_ping(1)           # counted for the peer, then lost at encapsulation
    assert rig.dp.iface_counters().lost_data_out == 2
    assert rig.dp.peer_counters(1).pkt_out == 1
    rig.dp.set_running(True)
    pkt = ip4()
    rig.to_tun(pkt)
    assert k["remote"].recv(2000) == expect_tx(k, 2, pkt)


def test_del_peer_returns_counters_and_errors(rig: Rig) -> None:
    k = install(rig, 2)
    pkt = ip4()
    rig.to_tun(pkt)
    k["remote"].recv(2000)
    assert rig.dp.del_peer(2) == PeerCounters(0, 1, 0, len(pkt))
    with pytest.raises(binding.IfOvpnNotFound):
        rig.dp.del_peer(2)
    rig.dp.add_peer(5, (LO, 1), None, None, None)
    with pytest.raises(binding.IfOvpnExists):
        rig.dp.add_peer(5, (LO, 1), None, None, None)
    with pytest.raises(ValidationError):
        rig.dp.set_key(5, 0, 0, "AES-256-CBC", b"k" * 32, b"i" * 8, b"k" * 32, b"i" * 8)
    with pytest.raises(IfOvpnError) as ei:
        rig.dp.set_key(5, 0, 0, "AES-256-GCM", b"k" * 20, b"i" * 8, b"k" * 20, b"i" * 8)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(ValidationError):
        rig.dp.add_peer(6, ("not-an-ip", 1), None, None, None)
    with pytest.raises(ValidationError):
        rig.dp.add_peer(6, (LO, 1), None, b"\x01\x02", None)
    with pytest.raises(binding.IfOvpnNotFound):
        rig.dp.peer_counters(77)


def test_ipv6_socket_and_remote() -> None:
    dp = FastDataPlane()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    remote = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tun_e, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        udp.bind(("::1", 0))
        remote.bind(("::1", 0))
        remote.settimeout(5)
        tun.settimeout(5)
        dp.attach(udp.fileno(), tun_e.fileno())
        dp.add_peer(1, remote.getsockname(), None, None, None)
        key, iv = os.urandom(32), os.urandom(8)
        dp.set_key(1, 0, 0, "CHACHA20-POLY1305", key, iv, key, iv)
        k = {"cipher": "CHACHA20-POLY1305", "enc_key": key, "enc_iv": iv, "key_id": 0,
             "peer_id": 1}
        pkt = ip6()
        tun.send(pkt)
        assert remote.recv(2000) == expect_tx(k, 1, pkt)
        remote.sendto(expect_tx(k, 1, pkt), udp.getsockname())
        assert tun.recv(2000) == pkt
        c = dp.iface_counters()
        assert c.transport_out == len(pkt) + 24 + 8 + 40
        assert dp.events() == []
    finally:
        dp.close()
        for s in (udp, remote, tun_e, tun):
            s.close()


def test_many_peers_and_detach_reattach(rig: Rig) -> None:
    r = rig.remote()
    for pid in range(1, 1001):
        vpn4 = ipaddress.IPv4Address(f"198.51.100.{pid}").packed if pid < 250 else None
        rig.dp.add_peer(pid, r.getsockname(), None, vpn4, None)
    assert rig.dp.peer_count() == 1000
    for pid in range(1, 1001, 2):
        rig.dp.del_peer(pid)
    assert rig.dp.peer_count() == 500
    k = install(rig, 100, remote=r, add=False)      # peer 100 has vpn4 198.51.100.100
    pkt = ip4("198.51.100.100")
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k, 1, pkt)
    rig.dp.detach()
    rig.dp.detach()                     # idempotent
    rig.dp.attach(rig.udp.fileno(), rig.tun_engine.fileno())
    rig.to_tun(pkt)
    assert r.recv(2000) == expect_tx(k, 2, pkt)


UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)   # Linux


def test_burst_through_udp_offload(rig: Rig) -> None:
    """Bursts in both directions: GSO runs (equal sizes, a short last one) and GRO input.

    The engine's own sends are coalesced when it finds several same-size
    datagrams in one batch; a sender using UDP_SEGMENT hands the engine one
    coalesced datagram (UDP_GRO), which must come out as separate packets.
    """
    k = install(rig, 12)
    gso, gro = rig.dp.offload_state()
    sizes = [1000] * 20 + [400] + [1000] * 5 + [1200, 1200, 1100]
    pkts = [ip4(size=n) for n in sizes]
    for p in pkts:
        rig.to_tun(p)
    got = [k["remote"].recv(2000) for _ in pkts]
    assert got == [expect_tx(k, seq, p) for seq, p in enumerate(pkts, start=1)]
    assert rig.wait_counters(lambda c: c.data_out == len(pkts)).transport_out == sum(
        n + 24 + 8 + 20 for n in sizes)
    # A GSO burst towards the engine: 6 datagrams of equal size, the last one shorter.
    plain = [ip4(size=600) for _ in range(5)] + [ip4(size=100)]
    wire = [make_rx(k, seq, p) for seq, p in enumerate(plain, start=1)]
    if sys.platform.startswith("linux"):
        k["remote"].sendmsg([b"".join(wire)],
                            [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", len(wire[0])))],
                            0, rig.addr)
    else:
        for w in wire:
            k["remote"].sendto(w, rig.addr)
    assert [rig.from_tun() for _ in plain] == plain
    c = rig.dp.iface_counters()
    assert (c.data_in, c.tunnel_in) == (6, sum(map(len, plain)))
    assert c.transport_in == sum(len(w) + 8 for w in wire)
    if sys.platform.startswith("linux"):
        assert gso and gro, "Linux >= 5.0 has UDP GSO and GRO"


def test_offload_can_be_switched_off() -> None:
    dp = FastDataPlane()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tun_e, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        udp.bind((LO, 0))
        dp.offload = False
        dp.attach(udp.fileno(), tun_e.fileno())
        assert dp.offload_state() == (False, False)
    finally:
        dp.close()
        for s in (udp, tun_e, tun):
            s.close()


def test_control_changes_under_traffic(rig: Rig) -> None:
    """Keys, peers and routes change while both data threads are busy: no crash, no stall.

    Checks the locking (shared lock per batch, exclusive for changes) rather
    than packet contents: afterwards the tunnel still carries a packet
    byte-exact, and every packet handed in is accounted for.
    """
    import threading

    k = install(rig, 1, vpn4="198.51.100.1")
    stop = threading.Event()
    sent = {"tun": 0, "udp": 0}

    def pump() -> None:
        pkt = ip4("198.51.100.1", size=200)
        seq = 1
        while not stop.is_set():
            rig.to_tun(pkt)
            k["remote"].sendto(make_rx(k, seq, pkt), rig.addr)
            sent["tun"] += 1
            sent["udp"] += 1
            seq += 1

    def drain() -> None:
        rig.tun.settimeout(0.05)
        k["remote"].settimeout(0.05)
        while not stop.is_set():
            for s in (rig.tun, k["remote"]):
                try:
                    s.recv(70000)
                except OSError:
                    pass

    threads = [threading.Thread(target=pump), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            i += 1
            rig.dp.add_peer(1000 + i, (LO, 9), None, None, None)
            rig.dp.set_key(1, 1, 1, "AES-128-GCM", os.urandom(16), os.urandom(8),
                           os.urandom(16), os.urandom(8))
            rig.dp.swap_keys(1)
            rig.dp.swap_keys(1)
            rig.dp.set_routes([(ipaddress.ip_network("192.0.2.0/24"),
                                ipaddress.IPv4Address("198.51.100.1").packed)])
            rig.dp.peer_counters(1)
            rig.dp.del_peer(1000 + i)
            rig.dp.send_ping(1)
            rig.dp.events()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert i > 20
    # The engine reads everything written to the fake tun (a socketpair, whose
    # sender blocks when full), so every packet is accounted for (pings add to
    # data_out).  Datagrams may drop in the engine's full UDP socket buffer, and
    # a full fake tun makes a decrypted packet count data_in *and* lost_data_in.
    c = rig.wait_counters(lambda c: c.data_out + c.lost_data_out + c.nomem_data_out
                          >= sent["tun"])
    assert c.data_out + c.lost_data_out + c.nomem_data_out >= sent["tun"] > 100
    assert 100 < c.data_in <= sent["udp"]
    for sock in (rig.tun, k["remote"]):       # what is still in flight
        sock.settimeout(0.2)
        try:
            while True:
                sock.recv(70000)
        except OSError:
            sock.settimeout(5)
    rig.dp.replay_protection = False
    pkt = ip4("198.51.100.1")
    k["remote"].sendto(make_rx(k, 1, pkt), rig.addr)
    assert rig.from_tun() == pkt


def test_local_address_chooses_the_source() -> None:
    """A socket bound to the wildcard sends from the peer's ``local`` (IP_PKTINFO)."""
    dp = FastDataPlane()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tun_e, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        udp.bind(("0.0.0.0", 0))
        port = udp.getsockname()[1]
        remote.bind((LO, 0))
        remote.settimeout(5)
        dp.attach(udp.fileno(), tun_e.fileno())
        key, iv = os.urandom(16), os.urandom(8)
        dp.add_peer(1, remote.getsockname(), None, None, None)
        dp.set_key(1, 0, 0, "AES-128-GCM", key, iv, key, iv)
        tun.send(ip4())
        _, src = remote.recvfrom(2000)
        assert src == (LO, port)              # no local: the kernel's choice
        dp.del_peer(1)
        dp.add_peer(1, remote.getsockname(), ("127.0.0.2", port), None, None)
        dp.set_key(1, 0, 0, "AES-128-GCM", key, iv, key, iv)
        tun.send(ip4())
        _, src = remote.recvfrom(2000)
        assert src == ("127.0.0.2", port)     # the peer's local address
    finally:
        dp.close()
        for s in (udp, remote, tun_e, tun):
            s.close()
