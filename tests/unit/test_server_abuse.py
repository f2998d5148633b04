"""ServerEndpoint under abuse, in memory (the netns versions are tests/netns/test_abuse.py).

Why: the server socket faces anyone.  A stock 2.6 server answers a client
reset with an HMAC cookie and keeps nothing until the client proves it can
receive (spec §6.3); so must ours, or 50,000 spoofed resets become 50,000
sessions (memory, TLS objects, peer ids).  Also: replayed control packets
must not disturb an established session, a client that stops mid-handshake
must be forgotten after hand-window, and max-clients holds.

Worst case throughout: the attacker knows the tls-crypt key (a leaked client
config) -- otherwise the wrap's HMAC drops everything before the cookie code.
"""
from __future__ import annotations

import gc
import ipaddress
import os
import time
import tracemalloc

import pytest

from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.cookie import CookieJar
from bsd_ovpn.proto.keyfile import StaticKey
from bsd_ovpn.proto.packet import ControlPacket, Opcode
from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import TLSCrypt
from bsd_ovpn.testbed.pki import PKI

REAL = ("192.0.2.2", 40000)


@pytest.fixture(scope="module")
def tls(pki: PKI) -> tuple[TLSConfig, TLSConfig]:
    srv, cli = pki.server(), pki.client()
    return (TLSConfig(ca=pki.ca_pem, cert=srv.cert_pem, key=srv.key_pem,
                      remote_cert_tls="client"),
            TLSConfig(ca=pki.ca_pem, cert=cli.cert_pem, key=cli.key_pem,
                      remote_cert_tls="server"))


class World:
    def __init__(self, tls: tuple[TLSConfig, TLSConfig], *, hand_window: float = 60.0,
                 max_clients: int = 1024) -> None:
        self.now = 1000.0
        self.key = StaticKey.generate()
        self.tls = tls
        sset = SessionSettings(server=True, tls=tls[0], hand_window=hand_window,
                               push_options=("ping 10",))
        self.ep = ServerEndpoint(
            ServerSettings(sset, pool=ipaddress.ip_network("198.51.100.0/24"),
                           max_clients=max_clients),
            wrap_factory=lambda: TLSCrypt(self.key, server=True),
            cookie_jar=CookieJar(os.urandom(32), int(hand_window)))
        self.events: list[tuple[int, ev.Event]] = []
        self.sent_to: dict = {}

    def client(self, **kw: object) -> Session:
        return Session.connect(SessionSettings(server=False, tls=self.tls[1], **kw),
                               TLSCrypt(self.key, server=False), self.now)

    def pump(self, clients: dict, *, record: list | None = None) -> int:
        """Move datagrams both ways once; clients: addr -> Session (None = black hole)."""
        moved = 0
        for addr, c in clients.items():
            if c is None:
                continue
            for d in c.datagrams_to_send(self.now):
                if record is not None:
                    record.append((addr, d))
                self.ep.receive_datagram(d, addr, self.now)
                moved += 1
        for d, addr in self.ep.datagrams_to_send(self.now):
            c = clients.get(addr)
            if c is not None:
                c.receive_datagram(d, self.now)
                moved += 1
        while (ce := self.ep.next_event()) is not None:
            self.events.append((ce.peer_id, ce.event))
        return moved

    def run(self, clients: dict, until, limit: float = 60.0, record: list | None = None) -> None:
        end = self.now + limit
        while not until():
            if self.pump(clients, record=record):
                continue
            timers = [t for t in [self.ep.get_timer()] +
                      [c.get_timer() for c in clients.values() if c is not None]
                      if t is not None]
            assert timers and self.now < end, "stuck"
            self.now = max(self.now, min(timers))
            self.ep.handle_timer(self.now)
            for c in clients.values():
                if c is not None:
                    c.handle_timer(self.now)

    def established(self, c: Session) -> bool:
        return c.established and any(isinstance(e, ev.KeysReady) for _, e in self.events)


def spoofed_reset(wrap: TLSCrypt, now: float) -> bytes:
    pkt = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, os.urandom(8), (), None, 0, b"")
    return wrap.wrap(pkt.encode(), now)


def source(i: int) -> tuple:
    """Many distinct sources: 192.0.2.0/24 and 2001:db8::/64 hosts, many ports."""
    if i % 2:
        return (f"192.0.2.{1 + (i // 2) % 254}", 1024 + i % 60000)
    return (f"2001:db8::{i:x}", 1024 + i % 60000, 0, 0)


def rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_50000_spoofed_resets_keep_no_state_then_a_real_client_connects(tls) -> None:
    w = World(tls)
    attacker = TLSCrypt(w.key, server=False)
    # the server is stateless, so the same wrapped reset may come from many sources:
    # 500 distinct resets cycled over 50,000 (address, port) pairs
    resets = [spoofed_reset(attacker, w.now) for _ in range(500)]
    for i in range(500):                          # warm-up: lazy imports, caches
        w.ep.receive_datagram(resets[i], source(i), w.now)
    w.ep.datagrams_to_send(w.now)
    gc.collect()
    objects, rss = len(gc.get_objects()), rss_kb()
    t0 = time.monotonic()
    replies = 0
    for i in range(50_000):
        assert w.ep.receive_datagram(resets[i % 500], source(i), w.now)
        if i % 1000 == 999:
            replies += len(w.ep.datagrams_to_send(w.now))   # the daemon sends them at once
    replies += len(w.ep.datagrams_to_send(w.now))
    elapsed = time.monotonic() - t0
    gc.collect()
    grown_objects, grown_rss = len(gc.get_objects()) - objects, rss_kb() - rss
    print(f"50000 spoofed resets in {elapsed:.1f} s; +{grown_objects} objects, "
          f"RSS +{grown_rss} kB")
    assert replies == 50_000                       # each answered once, statelessly
    assert len(w.ep) == 0 and w.ep.clients() == []
    assert w.ep.get_timer() is None                # nothing scheduled for anybody
    assert grown_objects < 500, grown_objects
    assert grown_rss < 5 * 1024, f"RSS grew by {grown_rss} kB"
    # heap growth per reset, precisely, on another 5,000
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(50_000, 55_000):
            w.ep.receive_datagram(resets[i % 500], source(i), w.now)
            if i % 1000 == 999:
                w.ep.datagrams_to_send(w.now)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"heap growth over 5000 more resets: {growth} bytes")
    assert growth < 64 * 1024, f"heap grew by {growth} bytes"
    # a real client still gets in at once
    c = w.client()
    w.run({REAL: c}, lambda: w.established(c), limit=10)
    assert len(w.ep) == 1


def test_replayed_control_packets_are_dropped(tls) -> None:
    w = World(tls)
    c = w.client()
    recorded: list = []
    w.run({REAL: c}, lambda: w.established(c), record=recorded)
    n_events = len(w.events)
    dropped = w.ep.dropped
    session = w.ep.session_for(REAL)
    assert session is not None and len(recorded) >= 4
    for addr, d in recorded:                       # the whole handshake again, verbatim
        accepted = w.ep.receive_datagram(d, addr, w.now)
        if d[0] >> 3 == Opcode.P_CONTROL_HARD_RESET_CLIENT_V2:
            continue        # a retransmitted reset of this session is re-acknowledged, no more
        assert not accepted, f"replayed opcode {d[0] >> 3} was accepted"
        assert "replayed" in (w.ep.last_error or "")
    # the cookie-carrying packet from another address does not make a second session
    for _, d in recorded[1:3]:
        w.ep.receive_datagram(d, ("192.0.2.66", 40000), w.now)
    w.pump({REAL: c})
    assert w.ep.dropped >= dropped + len(recorded) - 1
    assert w.ep.session_for(REAL) is session and len(w.ep) == 1
    new = [e for _, e in w.events[n_events:]
           if isinstance(e, (ev.KeysReady, ev.PeerAuthenticated, ev.ConnectionTerminated))]
    assert new == []
    # and the session still works: a renegotiation completes
    c.renegotiate(w.now)
    w.run({REAL: c}, lambda: sum(isinstance(e, ev.KeysReady) for _, e in w.events) >= 2)


def test_client_that_stops_mid_handshake_is_forgotten_after_hand_window(tls) -> None:
    w = World(tls, hand_window=10)
    c = w.client()
    # reset -> cookie reply -> the client's ack + ClientHello create the session; then silence
    w.pump({REAL: c})
    w.pump({REAL: c})
    assert len(w.ep) == 1, "the cookie exchange should have created the session"
    t_created = w.now
    while w.ep.get_timer() is not None and w.now < t_created + 30:
        w.now = max(w.now, w.ep.get_timer())
        w.ep.handle_timer(w.now)
        w.pump({REAL: None})
    assert len(w.ep) == 0 and w.ep.clients() == []
    assert t_created + 10 <= w.now <= t_created + 12, w.now - t_created
    assert w.ep.get_timer() is None


def test_max_clients_is_enforced(tls) -> None:
    w = World(tls, max_clients=2)
    clients = {(f"192.0.2.{10 + i}", 1194): w.client() for i in range(3)}
    first_two = dict(list(clients.items())[:2])
    w.run(first_two, lambda: all(c.established for c in first_two.values()))
    third_addr, third = list(clients.items())[2]
    dropped = w.ep.dropped
    errors: list[str] = []
    real_drop = w.ep._drop                                   # noqa: SLF001

    def drop(why: str) -> bool:
        errors.append(why)
        return real_drop(why)

    w.ep._drop = drop                                        # noqa: SLF001 - observe reasons
    for _ in range(20):
        w.pump(clients)
        w.now += 1
        for c in clients.values():
            c.handle_timer(w.now)
        w.ep.handle_timer(w.now)
    assert len(w.ep) == 2 and w.ep.session_for(third_addr) is None
    assert not third.established
    assert w.ep.dropped > dropped
    assert any("max-clients 2 reached" in e for e in errors), errors
    # one leaves: the third gets in
    pid = w.ep.clients()[0][0]
    w.ep.disconnect(pid, w.now)
    w.run(clients, lambda: third.established, limit=60)
    assert len(w.ep) == 2


# --------------------------------------------------------------------------- tls-crypt-v2

class V2World(World):
    """The same server with tls-crypt-v2 only; every client holds a v2 client key."""

    def __init__(self, tls, *, force_cookie: bool = False, max_clients: int = 1024) -> None:
        from bsd_ovpn.proto.keyfile import TLSCryptV2ClientKey, TLSCryptV2ServerKey, wrap_client_key
        from bsd_ovpn.proto.wrap import TLSCryptV2Server

        self.now = 1000.0
        self.tls = tls
        skey = TLSCryptV2ServerKey.generate()
        kc = StaticKey.generate()
        self.ckey = TLSCryptV2ClientKey(kc, wrap_client_key(skey, kc, b"\x01" + bytes(8)))
        sset = SessionSettings(server=True, tls=tls[0], push_options=("ping 10",))
        self.ep = ServerEndpoint(
            ServerSettings(sset, pool=ipaddress.ip_network("198.51.100.0/24"),
                           max_clients=max_clients, force_cookie=force_cookie),
            wrap_factory=None, tls_crypt_v2=TLSCryptV2Server(skey),
            cookie_jar=CookieJar(os.urandom(32), 60))
        self.events = []

    def client(self, **kw: object) -> Session:
        from bsd_ovpn.proto.wrap import TLSCryptV2Client
        return Session.connect(SessionSettings(server=False, tls=self.tls[1], **kw),
                               TLSCryptV2Client(self.ckey), self.now)

    def legacy_reset(self) -> bytes:
        """A v3 reset without the early-negotiation marker (what a pre-2.6 client sends)."""
        from bsd_ovpn.proto.wrap import TLSCryptV2Client
        w = TLSCryptV2Client(self.ckey)
        w._send_id = 0                      # noqa: SLF001 - no 0x0f marker: the legacy path
        pkt = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, 0, os.urandom(8), (), None,
                            0, b"")
        return w.wrap(pkt.encode(), self.now)


def test_v2_force_cookie_spoofed_legacy_resets_keep_no_state(tls) -> None:
    w = V2World(tls, force_cookie=True)
    for i in range(2000):
        assert not w.ep.receive_datagram(w.legacy_reset(), source(i), w.now)
    assert len(w.ep) == 0 and w.ep.get_timer() is None
    c = w.client()
    w.run({REAL: c}, lambda: w.established(c), limit=10)


def test_v2_spoofed_legacy_resets_cannot_lock_out_a_real_client(tls) -> None:
    """Without force-cookie a v3 reset lacking the early-negotiation marker gets a
    session at once (a pre-2.6 client cannot resend its WKc).  Spoofed ones never
    answer; they must not be able to fill max-clients and keep a real (cookie-capable)
    client out for a whole hand-window."""
    w = V2World(tls, max_clients=64)
    for i in range(500):                          # from spoofed sources, never answering
        w.ep.receive_datagram(w.legacy_reset(), source(i), w.now)
    w.ep.datagrams_to_send(w.now)
    assert len(w.ep) <= 64                         # bounded at least
    c = w.client()
    try:
        w.run({REAL: c}, lambda: w.established(c), limit=3)
    except AssertionError:
        pytest.fail(f"a real client could not connect within 3 s: {len(w.ep)} half-open "
                    f"sessions of spoofed legacy resets hold max-clients 64")


def test_v2_spoofed_legacy_reset_does_not_kill_an_established_session(tls) -> None:
    """A legacy v3 reset spoofing a connected client's address (any holder of a v2 client
    key can send one) must not replace that client's working session before the new
    attempt has proven anything; OpenVPN keeps the active session until the new one
    authenticates."""
    w = V2World(tls)
    c = w.client()
    w.run({REAL: c}, lambda: w.established(c))
    victim = w.ep.session_for(REAL)
    assert victim is not None
    w.ep.receive_datagram(w.legacy_reset(), REAL, w.now)      # spoofed: never followed up
    w.ep.datagrams_to_send(w.now)
    while (ce := w.ep.next_event()) is not None:
        w.events.append((ce.peer_id, ce.event))
    ended = [e for _, e in w.events if isinstance(e, ev.ConnectionTerminated)]
    assert ended == [] and victim.terminated is None, \
        f"the real client's session was ended by one spoofed packet: {ended}"
