"""Both engine data planes (Python and C) behave the same where the kernel defines it.

The engine stands in for if_ovpn, so its two data planes must accept and
refuse the same packets as the kernel: the receive replay window
(``ovpn_check_replay``: a 64-packet bitmap, a jump of more than 64 restarts
the window there), the end of the sequence space (refused for good past
2**32-1), the ROTATE_KEY threshold, and FLOAT (reported, not applied).  Each data plane runs for real here
(its own packet thread(s)) on a loopback UDP socket, with one end of an
AF_UNIX datagram socketpair as the "tun"; datagrams are sealed with
``cryptography`` from the wire format in if_ovpn.md §7, not with engine code.
No root needed.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import time
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from bsd_ovpn.engine.dataplane import SEQ_ROTATE, IfaceCounters, PythonDataPlane

LO = "127.0.0.1"
PEER_ID = 7


def _fast_available() -> bool:
    try:
        from bsd_ovpn.engine.fastpath import FastDataPlane
        FastDataPlane().close()
    except Exception:
        return False
    return True


DATAPLANES = ["python", pytest.param("fast", marks=pytest.mark.skipif(
    not _fast_available(), reason="the C data plane (bsd_ovpn._native) is not built"))]


def ip4(tag: int) -> bytes:
    """An IPv4-looking packet, unique per ``tag`` (data planes read version/destination)."""
    body = bytearray(40)
    body[0] = 0x45
    body[16:20] = bytes([198, 51, 100, 2])
    body[20:28] = tag.to_bytes(8, "big")
    return bytes(body)


class Rig:
    """One data plane with one peer and one AES-256-GCM key, attached to real fds."""

    def __init__(self, kind: str) -> None:
        if kind == "fast":
            from bsd_ovpn.engine.fastpath import FastDataPlane
            self.dp = FastDataPlane()
        else:
            self.dp = PythonDataPlane()
        self.kind = kind
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LO, 0))
        self.addr = self.udp.getsockname()
        self.remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.remote.bind((LO, 0))
        self.remote.settimeout(5)
        self.tun_engine, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.settimeout(5)
        self.tx_key, self.tx_iv = os.urandom(32), os.urandom(8)
        self.rx_key, self.rx_iv = os.urandom(32), os.urandom(8)
        self.dp.add_peer(PEER_ID, self.remote.getsockname(), None, None, None)
        self.dp.set_key(PEER_ID, 0, 0, "AES-256-GCM", self.tx_key, self.tx_iv,
                        self.rx_key, self.rx_iv)
        self.dp.attach(self.udp.fileno(), self.tun_engine.fileno())
        self.dp.set_running(True)
        self._tag = 0

    def close(self) -> None:
        close = getattr(self.dp, "close", None)
        self.dp.detach()
        if close is not None:
            close()
        for s in (self.udp, self.remote, self.tun_engine, self.tun):
            s.close()

    def counters(self, pred, what: str) -> IfaceCounters:
        deadline = time.monotonic() + 5
        while True:
            c = self.dp.iface_counters()
            if pred(c):
                return c
            assert time.monotonic() < deadline, f"{self.kind}: timed out waiting for {what}: {c}"
            time.sleep(0.001)

    def rx(self, seq: int, sender: socket.socket | None = None) -> bool:
        """Send one authentic datagram with ``seq`` (from ``sender``, default the
        peer's socket): True if it reached the tun."""
        self._tag += 1
        packet = ip4(self._tag)
        hdr = struct.pack("!II", (9 << 3) << 24 | PEER_ID, seq)
        ct = AESGCM(self.rx_key).encrypt(hdr[4:8] + self.rx_iv, packet, hdr)
        before = self.dp.iface_counters()
        (sender or self.remote).sendto(hdr + ct[-16:] + ct[:-16], self.addr)
        after = self.counters(lambda c: c.data_in + c.lost_data_in
                              == before.data_in + before.lost_data_in + 1, "the datagram")
        if after.data_in == before.data_in:
            return False
        assert self.tun.recv(70000) == packet
        return True

    def tx(self, count: int, receiver: socket.socket | None = None) -> list[int]:
        """Route ``count`` packets into the tunnel; the sequence numbers that went out
        (received on ``receiver``, default the peer's socket)."""
        before = self.dp.iface_counters()
        for _ in range(count):
            self._tag += 1
            self.tun.send(ip4(self._tag))
        after = self.counters(lambda c: c.data_out + c.nomem_data_out
                              == before.data_out + before.nomem_data_out + count, "TX")
        seqs = []
        for _ in range(after.data_out - before.data_out):
            wire = (receiver or self.remote).recv(2000)
            op, seq = struct.unpack("!II", wire[:8])
            AESGCM(self.tx_key).decrypt(wire[4:8] + self.tx_iv, wire[24:] + wire[8:24], wire[:8])
            assert op == (9 << 3) << 24 | PEER_ID
            seqs.append(seq)
        return seqs


@pytest.fixture(params=DATAPLANES)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    try:
        yield r
    finally:
        r.close()


TOP = 0xFFFFFFFF
#: (sequence number, accepted?) as ovpn_check_replay decides, step by step.
REPLAY_SCRIPT = [
    (1, True), (3, True), (2, True),          # reordering inside the window
    (3, False), (1, False), (0, False),       # duplicates; 0 is never valid
    (67, True),                               # rx_seq 3 + 64: the window's last bit
    (4, True), (67, False), (50, True),
    (69, True),                               # 4 + 65 > 4 + 64: a jump, window restarts at 69
    (68, False), (60, False),                 # older stragglers: refused for good
    (70, True), (134, True),                  # 70 + 64: last bit again
    (135, True),                              # 70 + 65: jump
    (100, False), (134, False),               # OpenVPN's sliding window would take both
    (TOP - 64, True),                         # a jump to 2**32 - 65
    (TOP - 62, True), (TOP - 63, True),       # inside; the window slides to TOP - 62
    (TOP - 58, True),                         # rx_seq + 64 wraps in 32 bits: a jump
    (TOP - 60, False),                        # so this straggler is refused
    (TOP, True), (TOP, False), (TOP - 1, False),
]


def test_replay_window_is_the_kernels(rig: Rig) -> None:
    got = [(seq, rig.rx(seq)) for seq, _ in REPLAY_SCRIPT]
    assert got == REPLAY_SCRIPT
    c = rig.dp.iface_counters()
    assert c.lost_data_in == sum(1 for _, ok in REPLAY_SCRIPT if not ok)


def test_replay_protection_off_accepts_everything_authentic(rig: Rig) -> None:
    rig.dp.replay_protection = False
    assert [rig.rx(s) for s in (5, 5, 1, 0, 500, 2)] == [True] * 6
    rig.dp.replay_protection = True          # the window was not moved meanwhile
    assert [rig.rx(s) for s in (1, 1, 500)] == [True, False, True]


def test_a_forged_packet_does_not_move_the_window(rig: Rig) -> None:
    hdr = struct.pack("!II", (9 << 3) << 24 | PEER_ID, 1000)
    rig.remote.sendto(hdr + os.urandom(16 + 40), rig.addr)          # fails authentication
    rig.counters(lambda c: c.lost_data_in == 1, "the forged datagram")
    assert [rig.rx(s) for s in (2, 1, 3)] == [True, True, True]


def _random_script(seed: int, n: int = 150) -> list[int]:
    rnd = random.Random(seed)
    seq, out = 0, []
    for _ in range(n):
        r = rnd.random()
        if r < 0.05:
            seq += rnd.randint(65, 300)                  # a jump
        elif r < 0.7:
            seq += rnd.randint(1, 5)
        out.append(max(0, seq - rnd.randint(0, 70)) if rnd.random() < 0.3 else seq)
    return out


@pytest.mark.skipif(not _fast_available(), reason="the C data plane is not built")
def test_random_sequences_identical_on_both_data_planes() -> None:
    for seed in (1, 2, 3):
        script = _random_script(seed)
        results = {}
        for kind in ("python", "fast"):
            r = Rig(kind)
            try:
                results[kind] = [r.rx(s) for s in script]
            finally:
                r.close()
        assert results["python"] == results["fast"], seed
        assert False in results["python"] and True in results["python"]


def test_sequence_exhaustion_refuses_for_good(rig: Rig) -> None:
    rig.dp.set_tx_seq(PEER_ID, 0, TOP - 1)
    assert rig.tx(4) == [TOP - 1, TOP]               # the last two numbers go out
    c = rig.dp.iface_counters()
    assert (c.data_out, c.nomem_data_out) == (2, 2)
    assert rig.tx(3) == []                           # still refused, never wraps to 0/1
    c = rig.dp.iface_counters()
    assert (c.data_out, c.nomem_data_out) == (2, 5)
    assert rig.dp.peer_counters(PEER_ID).pkt_out == 2
    rig.remote.settimeout(0.2)
    with pytest.raises(socket.timeout):
        rig.remote.recv(2000)
    # a new key in the slot starts again at 1
    rig.dp.set_key(PEER_ID, 0, 0, "AES-256-GCM", rig.tx_key, rig.tx_iv, rig.rx_key, rig.rx_iv)
    rig.remote.settimeout(5)
    assert rig.tx(1) == [1]


def test_rotate_threshold(rig: Rig) -> None:
    assert rig.dp.rotate_threshold == SEQ_ROTATE == 2 ** 31
    rig.dp.set_tx_seq(PEER_ID, 0, SEQ_ROTATE - 2)
    assert rig.tx(1) == [SEQ_ROTATE - 2]
    assert rig.dp.events() == []
    assert rig.tx(3) == [SEQ_ROTATE - 1, SEQ_ROTATE, SEQ_ROTATE + 1]   # packets still go
    assert rig.dp.events() == [("rotate_key", PEER_ID)]
    assert rig.dp.events() == []
    rig.dp.rotate_threshold = SEQ_ROTATE + 3                          # a lower/higher mark
    assert rig.tx(2) == [SEQ_ROTATE + 2, SEQ_ROTATE + 3]
    assert rig.dp.events() == [("rotate_key", PEER_ID)]
    assert rig.tx(2) and rig.dp.events() == []


def test_float_is_reported_once_with_the_latest_address_and_not_applied(rig: Rig) -> None:
    movers = []
    try:
        for ip in ("127.0.0.2", "127.0.0.3"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, 0))
            s.settimeout(5)
            movers.append(s)
        a, b = movers
        assert rig.rx(1, a) and rig.rx(2, b)
        assert rig.dp.events() == [("float", PEER_ID, b.getsockname())]
        assert rig.dp.events() == []
        assert rig.tx(1) == [1]                    # still to the old remote: the engine decides
        rig.dp.set_remote(PEER_ID, b.getsockname())
        assert rig.tx(1, receiver=b) == [2]
        assert rig.rx(3, b) and rig.dp.events() == []      # at the remote now: no float
    finally:
        for s in movers:
            s.close()


class _SetModel:
    """ovpn_check_replay restated with a set instead of a bitmap (an independent check
    of KernelReplayWindow's bit arithmetic)."""

    def __init__(self) -> None:
        self.floor, self.seen = 0, set()

    def accept(self, seq: int) -> bool:
        if seq <= self.floor or seq in self.seen:
            return False
        if seq > (self.floor + 64) % 2**32:
            self.floor, self.seen = seq, set()
            return True
        self.seen.add(seq)
        while self.floor + 1 in self.seen:
            self.floor += 1
            self.seen.discard(self.floor)
        return True


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(-80, 200), max_size=120))
def test_kernel_window_matches_a_set_model(start: int, deltas: list[int]) -> None:
    from bsd_ovpn.engine.dataplane import KernelReplayWindow
    window, model = KernelReplayWindow(), _SetModel()
    seq = start
    for d in deltas:
        seq = min(max(seq + d, 0), 2**32 - 1)
        assert window.check_and_accept(seq) == model.accept(seq), seq
        assert window.rx_seq == model.floor
