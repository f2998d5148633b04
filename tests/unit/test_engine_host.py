"""LinuxHost's socket edge on real loopback sockets (no root, no tun device).

Two per-NEW_PEER costs are skipped in the common case and must stay exact:
the steering program is re-attached only when its 64-id blocks change (and
the kernel then steers by the new blocks), and the hooked socket is
recognised by fstat instead of being inspected again, while any other
socket is still inspected in full.
"""
from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import pytest

from bsd_ovpn.engine import daemon as daemon_mod, steering
from bsd_ovpn.engine.commands import inspect_socket
from bsd_ovpn.engine.daemon import LinuxHost
from bsd_ovpn.engine.steering import PeerIdSet, make_udp_socket

NAME = "ovpn0"


class StubDataPlane:
    """Records attach/detach; LinuxHost only hands it the two descriptors."""

    def __init__(self) -> None:
        self.attached: tuple[int, int] | None = None

    def attach(self, sock_fd: int, tun_fd: int) -> None:
        self.attached = (sock_fd, tun_fd)

    def detach(self) -> None:
        self.attached = None


@pytest.fixture
def host(monkeypatch):
    """A LinuxHost with a stand-in tun, counting attach_program and full inspections."""
    h = LinuxHost()
    h.tuns[NAME] = SimpleNamespace(fd=-1)              # type: ignore[assignment]
    calls = SimpleNamespace(attach=0, inspect=0)
    real_attach, real_inspect = steering.attach_program, daemon_mod.inspect_socket

    def attach(sock, prog):
        calls.attach += 1
        real_attach(sock, prog)

    def inspect(fd):
        calls.inspect += 1
        return real_inspect(fd)

    monkeypatch.setattr(steering, "attach_program", attach)
    monkeypatch.setattr(daemon_mod, "inspect_socket", inspect)
    h.calls = calls                                     # type: ignore[attr-defined]
    dp = StubDataPlane()
    yield h, dp
    h.unhook_socket(NAME, dp)


def recv_all(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(100))
        except BlockingIOError:
            return out


def data(peer_id: int) -> bytes:
    return bytes([9 << 3]) + peer_id.to_bytes(3, "big") + bytes(20)


def test_steering_reattaches_per_block_and_steers_by_blocks(host):
    h, dp = host
    ctl = make_udp_socket(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        h.hook_socket(NAME, ctl.fileno(), dp)
        assert dp.attached is not None
        base = h.calls.attach                        # the all-to-control program
        ids = PeerIdSet()
        for pid in range(130):                       # blocks 0, 1, 2
            ids.add(pid)
            h.set_steering(NAME, ids)
        assert h.calls.attach - base == 3
        ids.discard(5)
        h.set_steering(NAME, ids)                    # block 0 still holds peers
        assert h.calls.attach - base == 3
        for pid in range(128, 130):
            ids.discard(pid)
            h.set_steering(NAME, ids)
        assert h.calls.attach - base == 4            # block 2 emptied
        eng = h.sockets[NAME][1]
        ctl.setblocking(False)
        cases = {5: 1, 0: 1, 127: 1, 128: 0, 129: 0, 1000: 0}
        for _ in range(20):
            for pid in cases:
                tx.sendto(data(pid), ctl.getsockname())
        time.sleep(0.2)
        got_ctl, got_eng = recv_all(ctl), recv_all(eng)
        assert sorted(got_eng) == sorted(data(p) for p, w in cases.items() if w for _ in range(20))
        assert sorted(got_ctl) == sorted(data(p) for p, w in cases.items() if not w
                                         for _ in range(20))
    finally:
        tx.close()
        ctl.close()


def test_hooked_socket_is_recognised_and_others_inspected(host):
    h, dp = host
    ctl = make_udp_socket(("127.0.0.1", 0))
    other = make_udp_socket(("127.0.0.1", 0))
    try:
        first = h.inspect_socket(ctl.fileno())
        assert h.calls.inspect == 1
        h.hook_socket(NAME, ctl.fileno(), dp)
        n = h.calls.inspect
        dup = socket.socket(fileno=os.dup(ctl.fileno()))   # another fd, same socket
        try:
            assert h.inspect_socket(dup.fileno()) == first
            assert h.inspect_socket(ctl.fileno()) == first
        finally:
            dup.close()
        assert h.calls.inspect == n                  # no dup/getsockname per NEW_PEER
        info = h.inspect_socket(other.fileno())       # a different socket: read in full
        assert h.calls.inspect == n + 1
        assert info == inspect_socket(other.fileno()) and info.ident != first.ident
        with pytest.raises(OSError):
            h.inspect_socket(-1)
        h.unhook_socket(NAME, dp)
        h.inspect_socket(ctl.fileno())               # no longer hooked: inspected again
        assert h.calls.inspect == n + 2
    finally:
        other.close()
        ctl.close()


def test_unbound_hooked_socket_is_not_remembered(host):
    """An unbound socket's name changes when it is bound: it is always read afresh."""
    h, dp = host
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        h.hook_socket(NAME, s.fileno(), dp)
        n = h.calls.inspect
        assert h.inspect_socket(s.fileno()).local[2] == 0
        assert h.calls.inspect == n + 1
    finally:
        s.close()


def test_rename_keeps_the_hooked_socket_known(host):
    h, dp = host
    ctl = make_udp_socket(("127.0.0.1", 0))
    try:
        h.hook_socket(NAME, ctl.fileno(), dp)
        h.tuns[NAME].rename = lambda new: None       # type: ignore[attr-defined]
        h.rename_link(NAME, "tun7")
        n = h.calls.inspect
        h.inspect_socket(ctl.fileno())
        assert h.calls.inspect == n
        h.unhook_socket("tun7", dp)
    finally:
        ctl.close()


class PairLinuxHost(LinuxHost):
    """LinuxHost whose "tun" is a socketpair end: everything else (steering,
    engine socket, data plane) is the production code."""

    def __init__(self, factory) -> None:
        super().__init__(factory)
        self.pairs: list[socket.socket] = []

    def create_link(self, name: str) -> str:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.pairs += [a, b]
        self.tuns[name] = SimpleNamespace(fd=a.fileno(), header=0,  # type: ignore[assignment]
                                          close=lambda: None)
        return name

    def set_link_up(self, name: str) -> None:
        pass

    def link_exists(self, name: str) -> bool:
        return name in self.tuns


def _factory(kind: str):
    if kind == "fast":
        from bsd_ovpn.engine.fastpath import FastDataPlane
        try:
            FastDataPlane().close()
        except Exception as exc:                         # pragma: no cover - no C module
            pytest.skip(f"no C data plane: {exc}")
        return FastDataPlane
    from bsd_ovpn.engine.dataplane import PythonDataPlane
    return PythonDataPlane


@pytest.mark.parametrize("kind", ["python", "fast"])
def test_unknown_id_in_a_steered_block_is_dropped_and_counted(kind):
    """Peer 0 known: P_DATA_V2 for id 5 (block 0) reaches the engine, which drops it
    as lost_data in; id 64 (block 1, no peer) still reaches the control socket."""
    from bsd_ovpn import nv
    from bsd_ovpn.engine.commands import Engine
    from bsd_ovpn.ifovpn import Command

    host = PairLinuxHost(_factory(kind))
    eng = Engine(host)
    ctl = make_udp_socket(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        err, name = eng.create_interface("ovpn7")
        assert err == 0
        req = nv.pack({"peerid": 0, "fd": ctl.fileno(),
                       "remote": {"af": 2, "address": socket.inet_aton("127.0.0.1"),
                                  "port": socket.htons(tx.getsockname()[1] or 9)}})
        assert eng.handle_set_many(name, [(Command.OVPN_NEW_PEER, req, ctl.fileno()),
                                          (Command.OVPN_START_VPN, None, None)]) == [0, 0]
        before = eng.interfaces[name].dataplane.iface_counters().lost_data_in
        ctl.setblocking(False)
        for _ in range(3):
            tx.sendto(data(5), ctl.getsockname())
            tx.sendto(data(64), ctl.getsockname())
        deadline = time.monotonic() + 5
        lost = before
        while time.monotonic() < deadline:
            lost = eng.interfaces[name].dataplane.iface_counters().lost_data_in
            if lost - before >= 3:
                break
            time.sleep(0.02)
        assert lost - before == 3
        time.sleep(0.1)
        assert recv_all(ctl) == [data(64)] * 3
    finally:
        eng.close()
        tx.close()
        ctl.close()
        for s in host.pairs:
            s.close()
