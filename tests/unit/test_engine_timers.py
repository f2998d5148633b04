"""The engine's keepalive timers: a deadline heap that behaves exactly like a walk.

Why: :meth:`Engine.sync` used to walk every peer on every request (O(peers)
per request, O(peers^2) per connect burst).  It now pops due entries from a
heap with lazy invalidation.  These tests pin that nothing observable
changed: a reference implementation of the former walk (over all peers, in
creation order) is run side by side with the engine on random sequences of
NEW_PEER / SET_PEER / DEL_PEER / traffic / clock steps, and the pings sent,
the DEL_PEER(TIMEOUT) notifications (and their order) and the deadline
:meth:`Engine.tick` returns must agree at every step.
"""
from __future__ import annotations

import errno as E
import socket

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bsd_ovpn import nv
from bsd_ovpn.engine.commands import Engine
from bsd_ovpn.ifovpn import Command as C, DelReason, NotifType

U32 = 0xFFFFFFFF


class WalkModel:
    """The former Engine.sync timer code, over plain dicts (creation order)."""

    def __init__(self) -> None:
        self.peers: dict[int, dict] = {}
        self.pings: list[int] = []
        self.deleted: list[int] = []

    def walk(self, now: float, last_active) -> None:
        for pid in list(self.peers):
            p = self.peers[pid]
            if p["next_ping"] is not None and p["next_ping"] <= now:
                if p["interval"] > 0:
                    self.pings.append(pid)
                    p["next_ping"] += p["interval"]
                    if p["next_ping"] <= now:
                        p["next_ping"] = now + p["interval"]
                else:
                    p["next_ping"] = None
            if p["timeout_at"] is not None and p["timeout_at"] <= now:
                last = last_active(pid)
                if last + p["timeout"] > now:
                    p["timeout_at"] = last + p["timeout"]
                else:
                    del self.peers[pid]
                    self.deleted.append(pid)

    def deadline(self) -> float | None:
        ts = [t for p in self.peers.values() for t in (p["next_ping"], p["timeout_at"])
              if t is not None]
        return min(ts) if ts else None


class Rig:
    def __init__(self, host, clock) -> None:
        self.clock = clock
        self.eng = Engine(host, clock=clock)
        assert self.eng.create_interface("ovpn") == (0, "ovpn0")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.model = WalkModel()
        self.last: dict[int, float] = {}
        self.pings: list[int] = []
        self.deleted: list[int] = []
        self._dp = None

    @property
    def ifs(self):  # type: ignore[no-untyped-def]
        return self.eng.interfaces["ovpn0"]

    def _patch(self) -> None:
        dp = self.ifs.dataplane
        if dp is not self._dp:                  # record pings, control last_active
            dp.send_ping = self.pings.append
            dp.last_active = lambda pid: self.last.get(pid, 0.0)
            self._dp = dp

    def set(self, cmd: int, nvl, fd=None) -> int:
        self._patch()
        self.model.walk(self.clock.t, lambda pid: self.last.get(pid, 0.0))
        rc = self.eng.handle_set("ovpn0", cmd, nv.pack(nvl), fd)
        self.drain()
        return rc

    def drain(self) -> None:
        while True:
            self.model.walk(self.clock.t, lambda pid: self.last.get(pid, 0.0))
            err, data = self.eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096)
            if err == E.ENOENT:
                return
            n = nv.unpack(data)
            if n["notification"] == NotifType.DEL_PEER and \
                    n["del_reason"] == DelReason.TIMEOUT:
                self.deleted.append(n["peerid"])

    def add(self, pid: int) -> None:
        n = nv.NVList([("remote", nv.NVList([("af", 2), ("address", b"\xc0\x00\x02\x01"),
                                              ("port", 43524)])),
                       ("fd", 5), ("peerid", pid)])
        self.model.walk(self.clock.t, lambda p: self.last.get(p, 0.0))
        want = E.EEXIST if pid in self.model.peers else 0
        assert self.set(C.OVPN_NEW_PEER, n, self.sock.fileno()) == want
        if want == 0:
            self.last.pop(pid, None)
            self.model.peers[pid] = {"interval": 0, "timeout": 0, "next_ping": None,
                                     "timeout_at": None}

    def set_peer(self, pid: int, interval: int, timeout: int) -> None:
        self.model.walk(self.clock.t, lambda p: self.last.get(p, 0.0))
        want = 0 if pid in self.model.peers else E.ENOENT
        assert self.set(C.OVPN_SET_PEER, nv.NVList([("peerid", pid), ("interval", interval),
                                                    ("timeout", timeout)])) == want
        if want == 0:
            p = self.model.peers[pid]
            p["interval"], p["timeout"] = interval & U32, timeout & U32
            p["next_ping"] = self.clock.t + p["interval"] if p["interval"] > 0 else None
            if p["timeout"] > 0:
                p["timeout_at"] = self.clock.t + p["timeout"]

    def delete(self, pid: int) -> None:
        self.model.walk(self.clock.t, lambda p: self.last.get(p, 0.0))
        want = 0 if pid in self.model.peers else E.ENOENT
        assert self.set(C.OVPN_DEL_PEER, nv.NVList([("peerid", pid)])) == want
        self.model.peers.pop(pid, None)

    def advance(self, dt: float) -> None:
        self._patch()
        self.clock.t += dt
        got = self.eng.tick()
        self.model.walk(self.clock.t, lambda p: self.last.get(p, 0.0))
        assert got == self.model.deadline()
        self.drain()

    def check(self) -> None:
        assert self.pings == self.model.pings
        assert self.deleted == self.model.deleted
        assert sorted(self.ifs.peers) == sorted(self.model.peers)
        assert list(self.ifs.peers) == list(self.model.peers)         # same order

    def close(self) -> None:
        self.eng.close()
        self.sock.close()


@pytest.fixture
def rig(fake_host, engine_clock):
    r = Rig(fake_host, engine_clock)
    yield r
    r.close()


PIDS = st.integers(0, 4)
INTERVALS = st.sampled_from([0, 1, 3, 10])
TIMEOUTS = st.sampled_from([0, 2, 5, 12, 60, 2**32 + 4])
START = st.lists(st.tuples(INTERVALS, TIMEOUTS), min_size=4, max_size=4)
STEPS = st.lists(st.one_of(
    st.tuples(st.just("add"), PIDS),
    st.tuples(st.just("set"), PIDS, INTERVALS, TIMEOUTS),
    st.tuples(st.just("del"), PIDS),
    st.tuples(st.just("active"), PIDS, st.sampled_from([-3.0, 0.0, 1.0, 4.5, 30.0])),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 11.0, 61.0])),
), max_size=60)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(START, STEPS)
def test_heap_timers_match_the_former_walk(fake_host, engine_clock, start, steps):
    r = Rig(fake_host, engine_clock)
    try:
        for pid, (interval, timeout) in enumerate(start):     # peers 0..3, armed
            r.add(pid)
            r.set_peer(pid, interval, timeout)
        for step in steps:
            if step[0] == "add":
                r.add(step[1])
            elif step[0] == "set":
                r.set_peer(*step[1:])
            elif step[0] == "del":
                r.delete(step[1])
            elif step[0] == "active":
                r.last[step[1]] = engine_clock.t + step[2]
            else:
                r.advance(step[1])
            r.check()
        for _ in range(4):
            r.advance(61.0)
            r.check()
        event("pings sent" if r.pings else "no ping")
        event("timeouts" if r.deleted else "no timeout")
    finally:
        r.close()


def test_same_time_timeouts_are_reported_in_creation_order(rig):
    for pid in (5, 3, 9):
        rig.add(pid)
    for pid in (9, 3, 5):                        # armed in another order, same deadline
        rig.set_peer(pid, 0, 10)
    rig.advance(10.0)
    rig.check()
    assert rig.deleted == [5, 3, 9]


def test_rearmed_and_recycled_peers_leave_no_live_stale_timer(rig):
    rig.add(1)
    rig.set_peer(1, 10, 120)
    rig.set_peer(1, 20, 60)                      # the +10 ping entry is now stale
    assert rig.eng.tick() == rig.clock.t + 20
    rig.advance(10.0)
    assert rig.pings == []
    rig.delete(1)
    rig.add(1)                                   # same id, a new peer without timers
    assert rig.eng.tick() is None
    rig.advance(60.0)
    rig.check()
    assert rig.pings == [] and rig.deleted == [] and 1 in rig.ifs.peers


def test_heap_stays_bounded_under_repeated_set_peer(rig):
    for pid in range(3):
        rig.add(pid)
    for i in range(2000):
        rig.eng.handle_set("ovpn0", C.OVPN_SET_PEER,
                           nv.pack(nv.NVList([("peerid", i % 3), ("interval", 10),
                                              ("timeout", 60)])))
    assert len(rig.ifs.timers) <= 4 * 3 + 64 + 1
    rig.clock.t += 10
    assert rig.eng.tick() == rig.clock.t + 10
    assert sorted(rig.pings) == [0, 1, 2]


def test_tick_touches_only_due_peers(rig):
    """With many peers armed, a tick at which one is due asks the data plane about one."""
    for pid in range(300):
        rig.add(pid)
        rig.set_peer(pid, 0, 100 + pid)
    calls: list[int] = []
    rig.ifs.dataplane.last_active = lambda pid: calls.append(pid) or 0.0
    rig.clock.t += 100
    assert rig.eng.tick() == rig.clock.t + 1
    assert calls == [0]
    assert len(rig.ifs.peers) == 299
