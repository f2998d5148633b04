"""The engine's command handler against a small model of the kernel's contract.

A hypothesis state machine sends valid and invalid if_ovpn commands (packed
nvlists, raw garbage, wrong command numbers, GETs with small buffers) and
data-plane events (float, rotate_key), advances the clock through keepalive
timeouts, and destroys/recreates the interface.  A plain-Python model
predicts every errno in the kernel's check order (spec if_ovpn.md §1-§4,
§10, plus the engine's documented deviations) and the resulting state:
peers, key slots, the notification queue (32 entries, overflow dropped)
and the interface mode.  After every step the model is compared with what
the engine told its data plane and with what POLL_PKT/GET_PEER_STATS say.
"""
from __future__ import annotations

import errno as E
import os
import socket
import sys
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import targets as T  # noqa: E402
from bsd_ovpn import nv  # noqa: E402
from bsd_ovpn.engine.commands import Engine  # noqa: E402
from bsd_ovpn.ifovpn import (  # noqa: E402
    CIPHER_KEY_SIZES, IFF_BROADCAST, IFF_MULTICAST, IFF_POINTOPOINT, IFMODE_P2P,
    NOTIFICATION_QUEUE_LEN, Command, DelReason, NotifType,
)

U32 = 0xFFFFFFFF
C = Command
PEER_IDS = st.sampled_from([1, 1, 1, 2, 2, 0, 0xFFFFFF, 0x1000000])
RARELY = st.sampled_from([False] * 5 + [True])
FAMILY = {"none": "none", "AES-128-GCM": "gcm", "AES-192-GCM": "gcm", "AES-256-GCM": "gcm",
          "CHACHA20-POLY1305": "chacha"}


def c_int(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v & 0x80000000 else v


def sockaddr(af: int, addr: bytes, port: int) -> nv.NVList:
    return nv.NVList([("af", af), ("address", addr), ("port", socket.htons(port))])


# A key direction: (cipher or None, key length or None, iv length or None)
KEY_DIRS = st.tuples(
    st.sampled_from([None, "none", "AES-128-GCM", "AES-192-GCM", "AES-256-GCM",
                     "CHACHA20-POLY1305", "aes-256-gcm"]),
    st.sampled_from([None, 16, 24, 32, 20, 33]),
    st.sampled_from([None, 8, 7]),
)


VALID_DIRS = st.sampled_from([("none", None, None), ("none", 16, 8), ("AES-128-GCM", 16, 8),
                              ("AES-256-GCM", 32, 8), ("AES-128-GCM", 32, 8),
                              ("AES-192-GCM", 24, 8), ("CHACHA20-POLY1305", 32, 8)])


def key_dir_nvlist(spec: tuple) -> nv.NVList:
    cipher, klen, ivlen = spec
    out = nv.NVList()
    if cipher is not None:
        out.add("cipher", cipher)
    if klen is not None:
        out.add("key", bytes(range(klen)))
    if ivlen is not None:
        out.add("iv", bytes(range(100, 100 + ivlen)))
    return out


def key_dir_errno(spec: tuple) -> int:
    """ovpn_create_kkey_dir's checks, in order (0 = accepted)."""
    cipher, klen, ivlen = spec
    if cipher is None or cipher not in CIPHER_KEY_SIZES:
        return E.EINVAL
    if cipher == "none":
        return 0
    if klen is None:
        return E.EINVAL
    if klen > 32:
        return E.E2BIG
    if ivlen is None:
        return E.EINVAL
    if ivlen != 8:
        return E.E2BIG
    if klen not in ((32,) if cipher == "CHACHA20-POLY1305" else (16, 24, 32)):
        return E.EINVAL
    return 0


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = T.EngineClock()
        self.engine = Engine(T.make_engine_host(self.clock), clock=self.clock)
        self.socks: dict[str, socket.socket] = {}
        for label in ("udpA", "udpB"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", 0))
            self.socks[label] = s
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        self.socks["tcp"] = tcp
        unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socks["unbound"] = unbound
        self.pipe = os.pipe()
        self._create()

    def teardown(self) -> None:
        self.engine.close()
        for s in self.socks.values():
            s.close()
        for fd in self.pipe:
            os.close(fd)

    # ------------------------------------------------------------ model
    def _create(self) -> None:
        rc, self.name = self.engine.create_interface("ovpn")
        assert rc == 0
        self.up = False
        self.flags = IFMODE_P2P
        self.socket: str | None = None
        self.peers: dict[int, dict] = {}
        self.ring: deque = deque()

    def notify(self, entry: tuple) -> bool:
        if len(self.ring) >= NOTIFICATION_QUEUE_LEN:
            return False
        self.ring.append(entry)
        return True

    def delete(self, pid: int, reason: DelReason) -> None:
        del self.peers[pid]
        self.notify((NotifType.DEL_PEER, pid, reason))

    def model_sync(self) -> None:
        now = self.clock.t
        for pid in list(self.peers):
            p = self.peers[pid]
            if p["timeout_at"] is not None and p["timeout_at"] <= now:
                if 0.0 + p["timeout"] > now:        # last_active 0.0: no data ever
                    p["timeout_at"] = 0.0 + p["timeout"]
                else:
                    self.delete(pid, DelReason.TIMEOUT)

    @property
    def ifs(self):  # type: ignore[no-untyped-def]
        return self.engine.interfaces[self.name]

    def fd(self, label: str | None) -> int | None:
        if label is None:
            return None
        if label == "pipe":
            return self.pipe[0]
        if label == "bad":
            return 1 << 20
        return self.socks[label].fileno()

    def send_set(self, cmd: int, payload: bytes | None, fd: int | None = None) -> int:
        rc = self.engine.handle_set(self.name, cmd, payload, fd)
        assert isinstance(rc, int)
        return rc

    # ------------------------------------------------------------ SET commands
    @initialize(peers=st.sampled_from([0, 1, 2, 2]), keys=st.booleans())
    def some_peers(self, peers: int, keys: bool) -> None:
        """Start most runs with live peers (and keys) so the deep paths are reached."""
        for pid in range(1, peers + 1):
            self.new_peer(pid=pid, sock="udpA", variant="ok", ip=pid, port=1194)
            if keys:
                self.install_key(pid, 0, 1, ("AES-256-GCM", 32, 8), ("AES-256-GCM", 32, 8))
                self.install_key(pid, 1, 2, ("CHACHA20-POLY1305", 32, 8),
                                 ("CHACHA20-POLY1305", 32, 8))

    @rule(pid=PEER_IDS, sock=st.sampled_from(["udpA"] * 6 + ["udpB", "tcp", "unbound", "pipe",
                                                             "bad", None]),
          variant=st.sampled_from(["ok"] * 8 + ["no_peerid", "no_fd", "no_remote",
                                   "bad_af", "bad_len", "v6_remote", "vpn4_bad", "local"]),
          ip=st.integers(1, 3), port=st.sampled_from([1194, 1195]))
    def new_peer(self, pid: int, sock: str | None, variant: str, ip: int, port: int) -> None:
        nvl = nv.NVList()
        if variant != "no_peerid":
            nvl.add("peerid", pid)
        if variant != "no_fd":
            nvl.add("fd", 3)
        remote_ip = f"192.0.2.{ip}"
        if variant == "bad_af":
            remote = sockaddr(10, bytes(4), port)
        elif variant == "bad_len":
            remote = sockaddr(2, bytes(5), port)
        elif variant == "v6_remote":
            remote = sockaddr(28, bytes.fromhex("20010db8" + "00" * 11 + "01"), port)
        else:
            remote = sockaddr(2, socket.inet_aton(remote_ip), port)
        if variant != "no_remote":
            nvl.add("remote", remote)
        if variant == "vpn4_bad":
            nvl.add("vpn_ipv4", bytes(3))
        if variant == "local":
            nvl.add("local", sockaddr(2, socket.inet_aton("127.0.0.1"), 0))
        if variant in ("no_peerid", "no_fd", "no_remote"):
            want = E.EINVAL
        elif pid > 0xFFFFFF or variant in ("bad_af", "bad_len"):
            want = E.EINVAL
        elif sock in (None, "bad"):
            want = E.EBADF
        elif sock == "pipe":
            want = E.ENOTSOCK
        elif variant in ("vpn4_bad", "v6_remote") or sock == "unbound":
            want = E.EINVAL                      # bad vpn_ipv4 / af mismatch / local port 0
        elif pid in self.peers:
            want = E.EEXIST
        elif sock == "tcp":
            want = E.EPROTOTYPE
        elif self.socket is not None and self.socket != sock and self.peers:
            want = E.EBUSY
        else:
            want = 0
        rc = self.send_set(C.OVPN_NEW_PEER, nv.pack(nvl), self.fd(sock))
        assert rc == want, (variant, sock, pid, rc, want)
        if rc == 0:
            self.socket = sock
            self.peers[pid] = {"slots": [None, None], "remote": (remote_ip, port),
                               "timeout": 0, "timeout_at": None}

    @rule(pid=PEER_IDS, missing=RARELY)
    def del_peer(self, pid: int, missing: bool) -> None:
        nvl = nv.NVList() if missing else nv.NVList([("peerid", pid)])
        want = E.EINVAL if missing else (0 if pid in self.peers else E.ENOENT)
        assert self.send_set(C.OVPN_DEL_PEER, nv.pack(nvl)) == want
        if want == 0:
            self.delete(pid, DelReason.REQUESTED)

    @rule(pid=PEER_IDS, slot=st.sampled_from([0, 1, 0, 1, 0, 1, 2, 2**32, 2**32 + 1, U32]),
          keyid=st.sampled_from([0, 1, 7, 0, 1, 7, 8]), data=st.data(),
          missing=st.sampled_from([None] * 8 + ["slot", "keyid", "peerid", "encrypt",
                                                "decrypt"]))
    def new_key(self, pid: int, slot: int, keyid: int, data: st.DataObject,
                missing: str | None) -> None:
        if data.draw(st.integers(0, 3), label="random dirs") == 0:
            enc, dec = data.draw(KEY_DIRS, label="enc"), data.draw(KEY_DIRS, label="dec")
        else:
            enc = data.draw(VALID_DIRS, label="enc")
            dec = data.draw(VALID_DIRS.filter(lambda d: FAMILY[d[0]] == FAMILY[enc[0]]),
                            label="dec")
        self.install_key(pid, slot, keyid, enc, dec, missing)

    def install_key(self, pid: int, slot: int, keyid: int, enc: tuple, dec: tuple,
                    missing: str | None = None) -> None:
        fields = [("slot", slot), ("keyid", keyid), ("peerid", pid),
                  ("encrypt", key_dir_nvlist(enc)), ("decrypt", key_dir_nvlist(dec))]
        nvl = nv.NVList([(k, v) for k, v in fields if k != missing])
        if missing in ("slot", "keyid", "peerid"):
            want = E.EINVAL
        elif c_int(slot) not in (0, 1) or keyid > 7 or pid > 0xFFFFFF:
            want = E.EINVAL
        elif missing is not None:
            want = E.EINVAL
        else:
            want = key_dir_errno(enc) or key_dir_errno(dec)
            if not want and FAMILY[enc[0]] != FAMILY[dec[0]]:
                want = E.EINVAL
            if not want and pid not in self.peers:
                want = E.ENOENT
        packed = nv.pack(nvl)
        assert self.send_set(C.OVPN_NEW_KEY, packed) == want, (nvl, want)
        if want == 0:
            self.peers[pid]["slots"][c_int(slot)] = keyid

    @rule(pid=PEER_IDS, missing=RARELY)
    def swap_keys(self, pid: int, missing: bool) -> None:
        nvl = nv.NVList() if missing else nv.NVList([("peerid", pid)])
        if missing:
            want = E.EINVAL
        elif pid not in self.peers:
            want = E.ENOENT
        elif self.peers[pid]["slots"][1] is None:
            want = E.ENOLINK
        else:
            want = 0
        assert self.send_set(C.OVPN_SWAP_KEYS, nv.pack(nvl)) == want
        if want == 0:
            self.peers[pid]["slots"].reverse()

    @rule(pid=PEER_IDS, slot=st.sampled_from([0, 1, 2, 2**32, U32]),
          missing=st.sampled_from([None] * 6 + ["slot", "peerid"]))
    def del_key(self, pid: int, slot: int, missing: str | None) -> None:
        nvl = nv.NVList([(k, v) for k, v in (("slot", slot), ("peerid", pid)) if k != missing])
        if missing or (slot & U32) not in (0, 1):
            want = E.EINVAL
        elif pid not in self.peers:
            want = E.ENOENT
        else:
            want = 0
        assert self.send_set(C.OVPN_DEL_KEY, nv.pack(nvl)) == want
        if want == 0:
            self.peers[pid]["slots"][slot & U32] = None

    @rule(pid=PEER_IDS, interval=st.sampled_from([0, 1, 10]),
          timeout=st.sampled_from([0, 5, 60, 2**32 + 30]),
          missing=st.sampled_from([None] * 6 + ["interval", "timeout", "peerid"]))
    def set_peer(self, pid: int, interval: int, timeout: int, missing: str | None) -> None:
        fields = (("peerid", pid), ("interval", interval), ("timeout", timeout))
        nvl = nv.NVList([(k, v) for k, v in fields if k != missing])
        want = E.EINVAL if missing else (0 if pid in self.peers else E.ENOENT)
        assert self.send_set(C.OVPN_SET_PEER, nv.pack(nvl)) == want
        if want == 0:
            p = self.peers[pid]
            p["timeout"] = timeout & U32
            if p["timeout"] > 0:
                p["timeout_at"] = self.clock.t + p["timeout"]

    @rule(with_nvlist=st.booleans())
    def start_vpn(self, with_nvlist: bool) -> None:
        payload = nv.pack({"ignored": 1}) if with_nvlist else None
        assert self.send_set(C.OVPN_START_VPN, payload) == 0
        self.up = True

    @rule(mode=st.sampled_from([0x8010, 0x8002, 0x10, 0x2, 0x12, 0, 0x8000, 2**32 + 0x10]),
          missing=RARELY)
    def set_ifmode(self, mode: int, missing: bool) -> None:
        nvl = nv.NVList() if missing else nv.NVList([("ifmode", mode)])
        m = mode & U32
        if missing:
            want = E.EINVAL
        elif self.up:
            want = E.EBUSY
        elif m & ~IFF_MULTICAST & U32 not in (IFF_POINTOPOINT, IFF_BROADCAST):
            want = E.EINVAL
        else:
            want = 0
        assert self.send_set(C.OVPN_SET_IFMODE, nv.pack(nvl)) == want
        if want == 0:
            self.flags = (self.flags & ~(IFF_BROADCAST | IFF_POINTOPOINT | IFF_MULTICAST)) | m

    @rule(cmd=st.sampled_from(sorted(Command)), junk=st.binary(max_size=64),
          big=st.booleans())
    def garbage_set(self, cmd: int, junk: bytes, big: bool) -> None:
        """Bytes that are not an nvlist: E2BIG above 4096, else EINVAL; nothing changes."""
        payload = b"\x6c\x00\x00" + junk if not big else bytes(4097)
        try:
            nv.unpack(payload)
            return                              # an accidental valid nvlist: not this rule
        except nv.NVError:
            pass
        assert self.send_set(cmd, payload) == (E.E2BIG if big else E.EINVAL)

    @rule(cmd=st.sampled_from(sorted(set(Command) - {C.OVPN_NEW_PEER, C.OVPN_DEL_PEER,
                                                    C.OVPN_NEW_KEY, C.OVPN_SWAP_KEYS,
                                                    C.OVPN_DEL_KEY, C.OVPN_SET_PEER,
                                                    C.OVPN_START_VPN, C.OVPN_SET_IFMODE})
                              + [0, 0x20004400, 0x2000440E]))
    def not_a_set_command(self, cmd: int) -> None:
        assert self.send_set(cmd, nv.pack({"peerid": 1})) == E.ENOTSUP

    @rule()
    def unknown_interface(self) -> None:
        assert self.engine.handle_set("ovpn99", C.OVPN_START_VPN, None) == E.ENXIO
        assert self.engine.handle_get("ovpn99", C.OVPN_POLL_PKT, 128) == (E.ENXIO, b"")

    # ------------------------------------------------------------ GET commands
    @rule(bufsize=st.sampled_from([4096, 4096, 4096, 16]))
    def get_pkt(self, bufsize: int) -> None:
        rc, reply = self.engine.handle_get(self.name, C.OVPN_GET_PKT, bufsize)
        if not self.ring:
            assert (rc, reply) == (E.ENOENT, b"")
            return
        head = self.ring.popleft()           # dequeued even on ENOSPC (lost)
        if bufsize == 16:
            assert (rc, reply) == (E.ENOSPC, b"")
            return
        assert rc == 0
        got = nv.unpack(reply)
        assert got.get_number("notification") == head[0]
        assert got.get_number("peerid") == head[1]
        if head[0] == NotifType.DEL_PEER:
            assert got.get_number("del_reason") == head[2]
            assert set(got) == {"peerid", "notification", "del_reason", "packets", "bytes"}
        elif head[0] == NotifType.FLOAT:
            addr = got.get_nvlist("address")
            assert list(addr) == ["af", "port", "address"]
            assert (socket.inet_ntoa(addr.get_binary("address")),
                    socket.ntohs(addr.get_number("port"))) == head[2]
        else:
            assert set(got) == {"peerid", "notification"}

    @rule()
    def get_peer_stats(self) -> None:
        rc, reply = self.engine.handle_get(self.name, C.OVPN_GET_PEER_STATS, 4096)
        assert rc == 0
        got = nv.unpack(reply)
        ids = [p.get_number("peerid") for p in got.get_nvlist_array("peers")] \
            if "peers" in got else []
        assert ids == sorted(self.peers)

    @rule(cmd=st.sampled_from([C.OVPN_GET_STATS, C.OVPN_POLL_PKT, C.OVPN_NEW_PEER,
                               C.OVPN_SEND_PKT, C.OVPN_START_VPN]))
    def other_get(self, cmd: int) -> None:
        rc, reply = self.engine.handle_get(self.name, cmd, 4096)
        if cmd == C.OVPN_GET_STATS:
            assert rc == 0 and list(nv.unpack(reply)) == [
                "lost_ctrl", "lost_data", "nomem_data", "data", "ctrl", "tunnel", "transport"]
        elif cmd == C.OVPN_POLL_PKT:
            assert rc == 0 and nv.unpack(reply).get_number("pending") == len(self.ring)
        else:
            assert (rc, reply) == (E.ENOTSUP, b"")

    # ------------------------------------------------------------ events and time
    @rule(pid=PEER_IDS, ip=st.integers(1, 3), port=st.sampled_from([1194, 1195]),
          rotate=st.booleans(), repeat=st.integers(1, 40))
    def data_plane_event(self, pid: int, ip: int, port: int, rotate: bool, repeat: int) -> None:
        """rotate_key / float reported by the data plane ``repeat`` times (fills the ring)."""
        dp = self.ifs.dataplane
        for i in range(repeat):
            if rotate:
                dp.injected.append(("rotate_key", pid))
            else:
                dp.injected.append(("float", pid, (f"192.0.2.{ip + i % 2}", port)))
        self.engine.tick(self.clock.t)
        for i in range(repeat):
            if pid not in self.peers:
                break
            if rotate:
                self.notify((NotifType.ROTATE_KEY, pid, None))
                continue
            addr = (f"192.0.2.{ip + i % 2}", port)
            if addr != self.peers[pid]["remote"] and \
                    self.notify((NotifType.FLOAT, pid, addr)):
                self.peers[pid]["remote"] = addr    # only once the notification is queued
        self.model_sync()

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0, 61.0, 3600.0]))
    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.engine.tick(self.clock.t)
        self.model_sync()

    @precondition(lambda self: bool(self.peers) or bool(self.ring))
    @rule()
    def destroy_and_recreate(self) -> None:
        """Destroy deletes the peers and flushes the queue, their DEL_PEERs included."""
        assert self.engine.destroy_interface(self.name) == 0
        assert self.engine.list_interfaces() == []
        self._create()

    # ------------------------------------------------------------ invariants
    @invariant()
    def matches_model(self) -> None:
        ifs = self.ifs
        dp = ifs.dataplane
        assert {pid: slots for pid, slots in dp.peer_slots.items()} == \
            {pid: p["slots"] for pid, p in self.peers.items()}
        assert len(ifs.ring) == len(self.ring) <= NOTIFICATION_QUEUE_LEN
        assert [(n.type, n.peer_id) for n in ifs.ring] == [(t, p) for t, p, _ in self.ring]
        assert ifs.flags == self.flags and ifs.up == self.up
        for pid, p in self.peers.items():
            r = ifs.peers[pid].remote
            assert (socket.inet_ntoa(r[1]), r[2]) == p["remote"]
            # the engine's own record (what SWAP_KEYS' ENOLINK check reads) agrees too
            engine_slots = [kid if inst else None for kid, inst in
                            zip(ifs.peers[pid].key_ids, ifs.peers[pid].key_installed)]
            assert engine_slots == p["slots"]


TestEngineStateful = EngineMachine.TestCase
TestEngineStateful.settings = settings(max_examples=50, stateful_step_count=50, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


def test_model_predicts_ring_overflow_drop() -> None:
    """A deterministic run of the machine through a full ring (33 rotate_key events)."""
    m = EngineMachine()
    try:
        m.new_peer(pid=1, sock="udpA", variant="ok", ip=1, port=1194)
        m.data_plane_event(pid=1, ip=1, port=1194, rotate=True, repeat=40)
        m.matches_model()
        assert len(m.ring) == NOTIFICATION_QUEUE_LEN
        m.del_peer(pid=1, missing=False)          # its DEL_PEER is dropped: the ring is full
        m.matches_model()
        m.get_pkt(bufsize=4096)
        m.other_get(cmd=C.OVPN_POLL_PKT)
        m.matches_model()
    finally:
        m.teardown()


@pytest.mark.parametrize("steps", [
    [("new_peer", dict(pid=5, sock="udpA", variant="ok", ip=1, port=1194)),
     ("set_peer", dict(pid=5, interval=1, timeout=5, missing=None)),
     ("advance", dict(seconds=5.0)),
     ("get_pkt", dict(bufsize=4096))],
    [("new_peer", dict(pid=1, sock="udpA", variant="ok", ip=1, port=1194)),
     ("new_peer", dict(pid=2, sock="udpB", variant="ok", ip=2, port=1194)),
     ("del_peer", dict(pid=1, missing=False)),
     ("new_peer", dict(pid=2, sock="udpB", variant="ok", ip=2, port=1194)),
     ("del_peer", dict(pid=2, missing=False)),
     ("new_peer", dict(pid=2, sock="udpB", variant="ok", ip=2, port=1194))],
])
def test_model_scenarios(steps: list) -> None:
    """Timeout deletion and the socket hand-over (EBUSY only while peers exist)."""
    m = EngineMachine()
    try:
        for name, kw in steps:
            getattr(m, name)(**kw)
            m.matches_model()
    finally:
        m.teardown()
