"""Data-key lifetime on the engine's command path, for both data planes.

Why: an AEAD nonce is the 32-bit packet id + the implicit IV, so a data key
must be replaced before the id wraps.  if_ovpn asks the control plane to
renegotiate with a ROTATE_KEY notification when the primary key's TX counter
reaches 2**31, and the engine must never send a packet id past 2**32-1 (the
kernel would reset the counter and reuse a nonce; the engine refuses
instead).  These tests drive the real :class:`~bsd_ovpn.engine.commands.Engine`
with packed nvlists (NEW_PEER with a real UDP socket, NEW_KEY, SWAP_KEYS,
GET_PKT, GET_STATS) and the real data planes attached to a loopback UDP
socket and a socketpair standing in for the tun; what goes on the wire is
checked independently with ``cryptography``'s AES-GCM.
"""
from __future__ import annotations

import errno as E
import os
import socket
import struct
import time
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bsd_ovpn import nv
from bsd_ovpn.engine.commands import Engine
from bsd_ovpn.engine.dataplane import SEQ_MAX, SEQ_ROTATE
from bsd_ovpn.ifovpn import Command, NotifType
from tests.unit.conftest import PairHost

C = Command
PEER = 7
LO = "127.0.0.1"


def _fast_available() -> bool:
    try:
        from bsd_ovpn.engine.fastpath import FastDataPlane
        FastDataPlane().close()
    except Exception:
        return False
    return True


class Rig:
    """One engine interface with one peer whose far end is a loopback UDP socket."""

    def __init__(self, kind: str) -> None:
        self.host = PairHost(kind)
        self.eng = Engine(self.host)
        assert self.eng.create_interface("ovpn") == (0, "ovpn0")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.udp.bind((LO, 0))
        self.remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.remote.bind((LO, 0))
        self.remote.settimeout(3)
        port = self.remote.getsockname()[1]
        req = nv.NVList()
        req.add("remote", nv.NVList([("af", socket.AF_INET),
                                     ("address", socket.inet_aton(LO)),
                                     ("port", socket.htons(port))]))
        req.add("fd", 5)
        req.add("peerid", PEER)
        assert self.set(C.OVPN_NEW_PEER, req, self.udp.fileno()) == 0
        self.keys: dict[int, tuple[bytes, bytes]] = {}

    @property
    def dp(self):
        return self.eng.interfaces["ovpn0"].dataplane

    def set(self, cmd: int, req: nv.NVList | None, fd: int | None = None) -> int:
        return self.eng.handle_set("ovpn0", cmd, nv.pack(req) if req is not None else None, fd)

    def new_key(self, slot: int, key_id: int) -> None:
        """NEW_KEY with a fresh random AES-256-GCM key per direction."""
        enc_key, enc_iv = os.urandom(32), os.urandom(8)
        req = nv.NVList()
        req.add("slot", slot)
        req.add("keyid", key_id)
        req.add("peerid", PEER)
        req.add("encrypt", nv.NVList([("cipher", "AES-256-GCM"), ("key", enc_key),
                                      ("iv", enc_iv)]))
        req.add("decrypt", nv.NVList([("cipher", "AES-256-GCM"), ("key", os.urandom(32)),
                                      ("iv", os.urandom(8))]))
        assert self.set(C.OVPN_NEW_KEY, req) == 0
        self.keys[key_id] = (enc_key, enc_iv)

    def swap(self) -> None:
        req = nv.NVList()
        req.add("peerid", PEER)
        assert self.set(C.OVPN_SWAP_KEYS, req) == 0

    def send(self) -> tuple[int, int, bytes]:
        """One IPv4 packet into the 'tun'; returns (key_id, seq, plaintext) seen on the wire.

        The datagram is authenticated independently with the key we installed,
        so a wrong nonce (seq) would fail here, not only a wrong header.
        """
        pkt = bytearray(os.urandom(48))
        pkt[0] = 0x45
        self.host.tuns["ovpn0"][1].send(bytes(pkt))
        wire = self.remote.recv(4096)
        op, seq = struct.unpack(">II", wire[:8])
        assert op >> 27 == 9 and op & 0xFFFFFF == PEER
        key_id = (op >> 24) & 7
        key, iv = self.keys[key_id]
        plain = AESGCM(key).decrypt(struct.pack(">I", seq) + iv, wire[24:] + wire[8:24],
                                    wire[:8])
        assert plain == bytes(pkt)
        return key_id, seq, plain

    def send_refused(self, n: int) -> None:
        """n packets into the tun that must not leave (counted as nomem_data out)."""
        before = self.dp.iface_counters().nomem_data_out
        for _ in range(n):
            self.host.tuns["ovpn0"][1].send(bytes([0x45]) + bytes(47))
        deadline = time.monotonic() + 3
        while self.dp.iface_counters().nomem_data_out < before + n:
            assert time.monotonic() < deadline, self.dp.iface_counters()
            time.sleep(0.01)
        self.remote.settimeout(0.3)
        try:
            with pytest.raises(socket.timeout):
                self.remote.recv(4096)
        finally:
            self.remote.settimeout(3)

    def notifications(self) -> list[tuple[int, int]]:
        """Run the engine's timer step and drain GET_PKT: [(peerid, notification)]."""
        deadline = time.monotonic() + 0.5
        out: list[tuple[int, int]] = []
        # the C data plane posts events from its own thread: give it a moment
        while True:
            self.eng.tick()
            while True:
                err, data = self.eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096)
                if err == E.ENOENT:
                    break
                assert err == 0
                n = nv.unpack(data)
                out.append((n["peerid"], n["notification"]))
            if out or time.monotonic() > deadline:
                return out
            time.sleep(0.02)

    def stats_nomem_out(self) -> int:
        err, data = self.eng.handle_get("ovpn0", C.OVPN_GET_STATS, 4096)
        assert err == 0
        return nv.unpack(data)["nomem_data"]["out"]

    def close(self) -> None:
        self.eng.close()
        self.host.close()
        self.udp.close()
        self.remote.close()


KINDS = ["python", pytest.param("fast", marks=pytest.mark.skipif(
    not _fast_available(), reason="the C data plane (bsd_ovpn._native fastpath) is not built"))]


@pytest.fixture(params=KINDS)
def rig(request) -> Iterator[Rig]:
    r = Rig(request.param)
    try:
        yield r
    finally:
        r.close()


def test_default_threshold_is_2_pow_31(rig: Rig) -> None:
    """Out of the box ROTATE_KEY comes exactly when packet id 2**31 is used, once."""
    assert rig.dp.rotate_threshold == SEQ_ROTATE == 2**31
    rig.new_key(0, 0)
    assert rig.set(C.OVPN_START_VPN, None) == 0
    rig.dp.set_tx_seq(PEER, 0, 2**31 - 2)
    assert rig.send()[1] == 2**31 - 2
    assert rig.send()[1] == 2**31 - 1
    assert rig.notifications() == []
    assert rig.send()[1] == 2**31                      # the packet still goes
    assert rig.notifications() == [(PEER, NotifType.ROTATE_KEY)]
    for want in range(2**31 + 1, 2**31 + 4):
        assert rig.send()[1] == want
    assert rig.notifications() == []                   # once per key, not per packet


def test_low_threshold_rotates_once_per_key_and_new_key_restarts_at_1(rig: Rig) -> None:
    rig.dp.rotate_threshold = 5
    rig.new_key(0, 0)
    assert rig.set(C.OVPN_START_VPN, None) == 0
    seqs = []
    for _ in range(4):
        seqs.append(rig.send()[1])
    assert seqs == [1, 2, 3, 4]
    assert rig.notifications() == []
    assert rig.send()[:2] == (0, 5)
    assert rig.notifications() == [(PEER, NotifType.ROTATE_KEY)]
    assert [rig.send()[1] for _ in range(5)] == [6, 7, 8, 9, 10]
    assert rig.notifications() == []
    # the control plane renegotiates: NEW_KEY slot 1 (key id 1), SWAP_KEYS
    rig.new_key(1, 1)
    rig.swap()
    sent = [rig.send()[:2] for _ in range(4)]
    assert sent == [(1, 1), (1, 2), (1, 3), (1, 4)]    # a fresh nonce space
    assert rig.notifications() == []
    assert rig.send()[:2] == (1, 5)
    assert rig.notifications() == [(PEER, NotifType.ROTATE_KEY)]


def test_packet_id_never_passes_2_pow_32_minus_1(rig: Rig) -> None:
    """The last id is 2**32-1; after it the key refuses to send, for good, without wrapping."""
    rig.new_key(0, 0)
    assert rig.set(C.OVPN_START_VPN, None) == 0
    rig.dp.set_tx_seq(PEER, 0, SEQ_MAX - 1)
    assert rig.send()[1] == SEQ_MAX - 1
    assert rig.send()[1] == SEQ_MAX
    assert rig.stats_nomem_out() == 0
    rig.send_refused(3)
    assert rig.stats_nomem_out() == 3
    # still refused later (no wrap to 0 / 1 and nonce reuse)
    rig.send_refused(1)
    assert rig.stats_nomem_out() == 4
    # a renegotiated key works again from 1
    rig.new_key(1, 2)
    rig.swap()
    assert rig.send()[:2] == (2, 1)


def test_keepalive_pings_count_towards_the_threshold(rig: Rig) -> None:
    """SEND_PING packets use the same counter: an idle tunnel still rotates in time."""
    rig.dp.rotate_threshold = 3
    rig.new_key(0, 0)
    assert rig.set(C.OVPN_START_VPN, None) == 0
    rig.dp.send_ping(PEER)
    rig.dp.send_ping(PEER)
    for _ in range(2):
        rig.remote.recv(4096)
    assert rig.notifications() == []
    assert rig.send()[1] == 3
    assert rig.notifications() == [(PEER, NotifType.ROTATE_KEY)]
