"""Client Session + ServerEndpoint wired in memory: handshake, loss, rekeying, cookies.

Every datagram goes through a little "network" function so tests can drop,
duplicate or reorder packets by plain function calls, with a fake clock.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from bsd_ovpn.errors import LocalProtocolError
from bsd_ovpn.ifovpn import KeySlot
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.cookie import CookieJar
from bsd_ovpn.proto.datachannel import DataChannel
from bsd_ovpn.proto.keyfile import StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, wrap_client_key
from bsd_ovpn.proto.packet import ControlPacket, Opcode
from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.states import KSState
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client, TLSCryptV2Server
from bsd_ovpn.testbed.pki import PKI

CLIENT_ADDR = ("192.0.2.2", 40000)


@pytest.fixture(scope="module")
def tls(pki: PKI) -> tuple[TLSConfig, TLSConfig]:
    srv, cli = pki.server(), pki.client()
    server_tls = TLSConfig(ca=pki.ca_pem, cert=srv.cert_pem, key=srv.key_pem,
                           remote_cert_tls="client")
    client_tls = TLSConfig(ca=pki.ca_pem, cert=cli.cert_pem, key=cli.key_pem,
                           remote_cert_tls="server")
    return server_tls, client_tls


@pytest.fixture(scope="module")
def static_key() -> StaticKey:
    return StaticKey.generate()


def _wraps(kind: str, key: StaticKey
           ) -> tuple[Callable[[], object] | None, object, object, StaticKey | None]:
    """(server wrap factory, server tls-crypt-v2, client wrap, client key2) for a kind."""
    if kind == "none":
        return NoWrap, None, NoWrap(), None
    if kind == "tls-auth":
        return (lambda: TLSAuth(key, 0, "SHA1")), None, TLSAuth(key, 1, "SHA1"), key
    if kind == "tls-crypt":
        return (lambda: TLSCrypt(key, server=True)), None, TLSCrypt(key, server=False), key
    assert kind == "tls-crypt-v2"
    skey = TLSCryptV2ServerKey.generate()
    kc = StaticKey.generate()
    ckey = TLSCryptV2ClientKey(kc, wrap_client_key(skey, kc, b"\x01" + bytes(8)))
    return None, TLSCryptV2Server(skey), TLSCryptV2Client(ckey), kc


class Net:
    """A client, a server endpoint, a clock and a lossy wire between them."""

    def __init__(self, server_tls: TLSConfig, client_tls: TLSConfig, *, wrap: str = "tls-crypt",
                 key: StaticKey | None = None, client_kw: dict | None = None,
                 server_kw: dict | None = None, endpoint_kw: dict | None = None) -> None:
        key = key or StaticKey.generate()
        factory, v2, cwrap, _ = _wraps(wrap, key)
        self.now = 1000.0
        skw = dict(server=True, tls=server_tls, ping=10, ping_restart=120, data_ciphers=("AES-256-GCM", "AES-128-GCM",
                                                                "CHACHA20-POLY1305"),
                   push_options=("ping 10", "ping-restart 60"))
        skw.update(server_kw or {})
        self.server_settings = SessionSettings(**skw)
        self.endpoint = ServerEndpoint(
            ServerSettings(self.server_settings, pool=ipaddress.ip_network("198.51.100.0/24"),
                           **(endpoint_kw or {})),
            wrap_factory=factory, tls_crypt_v2=v2, cookie_jar=CookieJar(b"k" * 32, 60))
        ckw = dict(server=False, tls=client_tls)
        ckw.update(client_kw or {})
        self.client = Session.connect(SessionSettings(**ckw), cwrap, self.now)
        self.c_events: list[ev.Event] = []
        self.s_events: list[ev.Event] = []
        self.to_server: Callable[[int, bytes], list[bytes]] = lambda i, d: [d]
        self.to_client: Callable[[int, bytes], list[bytes]] = lambda i, d: [d]
        self.n_c2s = 0
        self.n_s2c = 0
        self.held: list[tuple[str, bytes]] = []

    def step(self) -> int:
        moved = 0
        for d in self.client.datagrams_to_send(self.now):
            self.n_c2s += 1
            for x in self.to_server(self.n_c2s, d):
                self.endpoint.receive_datagram(x, CLIENT_ADDR, self.now)
                moved += 1
        for d, addr in self.endpoint.datagrams_to_send(self.now):
            assert addr == CLIENT_ADDR
            self.n_s2c += 1
            for x in self.to_client(self.n_s2c, d):
                self.client.receive_datagram(x, self.now)
                moved += 1
        while (e := self.client.next_event()) is not None:
            self.c_events.append(e)
            if isinstance(e, ev.SendPing):          # the data path delivers the ping
                srv = self.endpoint.session_for(CLIENT_ADDR)
                if srv is not None:
                    srv.data_received(self.now)
        while (ce := self.endpoint.next_event()) is not None:
            self.s_events.append(ce.event)
            if isinstance(ce.event, ev.SendPing):
                self.client.data_received(self.now)
        return moved

    def advance(self, seconds: float) -> None:
        """Let time pass, running every timer on the way."""
        end = self.now + seconds
        while True:
            self.step()
            timers = [t for t in (self.client.get_timer(), self.endpoint.get_timer())
                      if t is not None and t <= end]
            if not timers:
                break
            self.now = max(self.now, min(timers))
            self.client.handle_timer(self.now)
            self.endpoint.handle_timer(self.now)
        self.now = end
        self.client.handle_timer(self.now)
        self.endpoint.handle_timer(self.now)
        self.step()

    def run(self, until: Callable[[], bool], max_time: float = 120.0) -> None:
        end = self.now + max_time
        while not until():
            if self.step():
                continue
            timers = [t for t in (self.client.get_timer(), self.endpoint.get_timer())
                      if t is not None]
            if not timers:
                raise AssertionError("deadlock: no timers and nothing to send")
            self.now = max(self.now, min(timers))
            if self.now > end:
                raise AssertionError(f"not done after {max_time} s: client {self.c_events}")
            self.client.handle_timer(self.now)
            self.endpoint.handle_timer(self.now)
            self.step()

    def keys(self, events: list[ev.Event]) -> list[ev.KeysReady]:
        return [e for e in events if isinstance(e, ev.KeysReady)]

    def established(self) -> bool:
        return bool(self.keys(self.c_events)) and bool(self.keys(self.s_events))

    @property
    def server_session(self) -> Session:
        s = self.endpoint.session_for(CLIENT_ADDR)
        assert s is not None
        return s


def _check_keys_match(c: ev.KeysReady, s: ev.KeysReady) -> None:
    assert c.key_id == s.key_id
    assert c.keys.cipher == s.keys.cipher
    assert c.keys.encrypt_key == s.keys.decrypt_key and c.keys.encrypt_iv == s.keys.decrypt_iv
    assert s.keys.encrypt_key == c.keys.decrypt_key and s.keys.encrypt_iv == c.keys.decrypt_iv
    assert c.keys.encrypt_key != c.keys.decrypt_key


@pytest.mark.parametrize("wrap", ["none", "tls-auth", "tls-crypt", "tls-crypt-v2"])
@pytest.mark.parametrize("ekm", [False, True])
def test_full_handshake_keys_agree(tls: tuple[TLSConfig, TLSConfig], wrap: str, ekm: bool) -> None:
    net = Net(*tls, wrap=wrap, client_kw={"ekm": ekm})
    sizes: list[int] = []

    def record(i: int, d: bytes) -> list[bytes]:
        sizes.append(len(d))
        return [d]

    net.to_server = net.to_client = record
    net.run(net.established)
    # max-packet-size 1250 includes the 28 bytes of IPv4 + UDP headers (spec §4.1);
    # the ClientHello (ML-KEM key share) needs more than one packet
    assert max(sizes) <= 1250 - 28 and max(sizes) > 1100
    (ck,), (sk,) = net.keys(net.c_events), net.keys(net.s_events)
    _check_keys_match(ck, sk)
    assert ck.slot is KeySlot.PRIMARY and sk.slot is KeySlot.PRIMARY
    assert ck.key_derivation == sk.key_derivation == ("tls-ekm" if ekm else "prf")
    assert ck.keys.cipher == "AES-256-GCM"
    assert ck.peer_id == sk.peer_id == 0
    push = [e for e in net.c_events if isinstance(e, ev.PushReplyReceived)]
    assert push and "ifconfig 198.51.100.2 255.255.255.0" in push[0].raw
    assert str(push[0].reply.ifconfig[0]) == "198.51.100.2" and push[0].reply.ping == 10
    hs = [e for e in net.c_events if isinstance(e, ev.HandshakeComplete)]
    assert hs[0].peer_common_name == "server"
    auth = [e for e in net.s_events if isinstance(e, ev.PeerAuthenticated)]
    assert auth[0].peer_common_name == "client" and "IV_PROTO" in auth[0].peer_info
    # data both ways with the derived keys (AEAD, P_DATA_V2)
    cdc = DataChannel(ck.keys, peer_id=ck.peer_id)
    sdc = DataChannel(sk.keys, peer_id=sk.peer_id)
    assert sdc.decrypt(cdc.encrypt(b"E" * 40), net.now) == b"E" * 40
    assert cdc.decrypt(sdc.encrypt(b"F" * 40), net.now) == b"F" * 40
    net.run(lambda: net.server_session.primary.state is KSState.GENERATED_KEYS, max_time=5)
    assert net.client.primary is not None
    assert net.client.primary.state is KSState.GENERATED_KEYS
    if wrap == "tls-crypt-v2":
        assert net.client.resend_wkc


def test_cipher_negotiation_follows_server_order(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, client_kw={"data_ciphers": ("CHACHA20-POLY1305", "AES-128-GCM")})
    net.run(net.established)
    assert net.keys(net.c_events)[0].keys.cipher == "AES-128-GCM"


def _lossy(pattern: Callable[[int], bool]) -> Callable[[int, bytes], list[bytes]]:
    return lambda i, d: [] if pattern(i) else [d]


@pytest.mark.parametrize("name,c2s,s2c", [
    ("drop every 3rd", lambda i: i % 3 == 0, lambda i: i % 3 == 0),
    ("drop first 4 from server", lambda i: False, lambda i: i <= 4),
    ("drop every 4th client packet", lambda i: i % 4 == 0, lambda i: False),
    ("drop client packets 2-5", lambda i: 2 <= i <= 5, lambda i: False),
])
def test_handshake_survives_loss(tls: tuple[TLSConfig, TLSConfig], name: str,
                                 c2s: Callable[[int], bool], s2c: Callable[[int], bool]) -> None:
    net = Net(*tls)
    net.to_server, net.to_client = _lossy(c2s), _lossy(s2c)
    net.run(net.established, max_time=60)
    _check_keys_match(net.keys(net.c_events)[0], net.keys(net.s_events)[0])


def test_handshake_survives_duplication_and_reordering(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="none")
    held: dict[str, bytes | None] = {"c": None, "s": None}

    def swap(side: str) -> Callable[[int, bytes], list[bytes]]:
        def f(i: int, d: bytes) -> list[bytes]:
            if i % 2 == 1:          # hold odd packets, send them after the next one
                held[side] = d
                return [d]          # ... and also deliver now: duplication
            prev, held[side] = held[side], None
            return [d, prev] if prev is not None else [d]
        return f

    net.to_server, net.to_client = swap("c"), swap("s")
    net.run(net.established, max_time=60)
    _check_keys_match(net.keys(net.c_events)[0], net.keys(net.s_events)[0])
    assert net.client.terminated is None


def test_retransmit_timing_of_unanswered_reset(tls: tuple[TLSConfig, TLSConfig]) -> None:
    settings = SessionSettings(server=False, tls=tls[1], hand_window=60)
    s = Session.connect(settings, NoWrap(), 0.0)
    sent = []
    t = 0.0
    while s.terminated is None:
        if s.datagrams_to_send(t):
            sent.append(t)
        timer = s.get_timer()
        assert timer is not None
        t = max(t, timer)
        s.handle_timer(t)
    assert sent == [0.0, 2.0, 6.0, 14.0, 30.0]
    assert s.terminated.reason == "hand-window" and t == 60.0


def test_cookie_statelessness(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="none")
    for i in range(50):
        reset = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, bytes([1 + i] * 8),
                              message_id=0).encode()
        assert net.endpoint.receive_datagram(reset, ("192.0.2.99", 1000 + i), net.now)
    assert len(net.endpoint) == 0
    assert net.endpoint.get_timer() is None
    replies = net.endpoint.datagrams_to_send(net.now)
    assert len(replies) == 50
    srv = ControlPacket.decode(replies[0][0])
    assert srv.opcode is Opcode.P_CONTROL_HARD_RESET_SERVER_V2 and srv.acks == (0,)
    # a forged cookie does not create state either
    fake = ControlPacket(Opcode.P_CONTROL_V1, 0, bytes([1] * 8), (0,), b"\x99" * 8, 1,
                         b"\x16\x03\x01").encode()
    assert not net.endpoint.receive_datagram(fake, ("192.0.2.99", 1000), net.now)
    assert len(net.endpoint) == 0
    # the genuine cookie from the right address does
    good = ControlPacket(Opcode.P_CONTROL_V1, 0, bytes([1] * 8), (0,), srv.session_id, 1,
                         b"").encode()
    assert not net.endpoint.receive_datagram(good, ("192.0.2.99", 1001), net.now)  # wrong addr
    assert net.endpoint.receive_datagram(good, ("192.0.2.99", 1000), net.now)
    assert len(net.endpoint) == 1


def test_client_that_stops_is_forgotten_after_hand_window(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    # deliver everything until the server has state, then cut the client off
    net.run(lambda: len(net.endpoint) == 1)
    net.to_server = lambda i, d: []
    net.run(lambda: len(net.endpoint) == 0, max_time=70)
    term = [e for e in net.s_events if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].reason == "hand-window"
    assert net.now - 1000.0 <= 61


def _rekey(net: Net, *, from_client: bool) -> None:
    nc, ns = len(net.keys(net.c_events)), len(net.keys(net.s_events))
    (net.client if from_client else net.server_session).renegotiate(net.now)
    net.run(lambda: len(net.keys(net.c_events)) > nc and len(net.keys(net.s_events)) > ns,
            max_time=30)


def _kernel(events: list[ev.Event]) -> dict[KeySlot, int]:
    """Apply key events to a model of if_ovpn's two slots."""
    slots: dict[KeySlot, int] = {}
    for e in events:
        if isinstance(e, ev.KeysReady):
            slots[e.slot] = e.key_id
        elif isinstance(e, ev.SwapKeys):
            assert slots.get(KeySlot.SECONDARY) == e.key_id
            slots[KeySlot.PRIMARY], slots[KeySlot.SECONDARY] = (
                slots[KeySlot.SECONDARY], slots[KeySlot.PRIMARY])
        elif isinstance(e, ev.DeleteKey):
            assert slots.pop(e.slot) == e.key_id
    return slots


@pytest.mark.parametrize("wrap,ekm", [("tls-crypt", True), ("tls-crypt-v2", True),
                                      ("tls-auth", True), ("none", True), ("tls-crypt", False)])
def test_renegotiation_three_times_and_key_id_wrap(tls: tuple[TLSConfig, TLSConfig],
                                                    wrap: str, ekm: bool) -> None:
    net = Net(*tls, wrap=wrap, client_kw={"reneg_sec": 0, "ekm": ekm},
              server_kw={"reneg_sec": 0})
    net.run(net.established)
    # dynamic tls-crypt is negotiated exactly when EKM is
    assert net.client.dyn_tls_crypt == net.server_session.dyn_tls_crypt == ekm
    # its key is exported at the first renegotiation, not at every handshake
    assert net.server_session._dyn_wrap is None and net.client._dyn_wrap is None
    assert (net.client._wrap_for(1) is not net.client.wrap) == ekm
    seen = [0]
    for i in range(9):                      # 0 -> 1..7 -> 1 -> 2
        _rekey(net, from_client=i % 2 == 0)
        ck, sk = net.keys(net.c_events)[-1], net.keys(net.s_events)[-1]
        _check_keys_match(ck, sk)
        assert ck.slot is KeySlot.SECONDARY
        seen.append(ck.key_id)
        # TX moves to the new key after auth_deferred_expire (min(60, reneg/2) = 60 s here)
        net.advance(61)
        for events in (net.c_events, net.s_events):
            assert _kernel(events)[KeySlot.PRIMARY] == ck.key_id
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 1, 2]
    # keys of the new key_id decrypt data from the peer
    cdc = DataChannel(net.client.tx_keys(), peer_id=0)
    sdc = DataChannel(net.server_session.tx_keys(), peer_id=0)
    assert sdc.decrypt(cdc.encrypt(b"x" * 20), net.now) == b"x" * 20
    assert net.client.terminated is None and net.server_session.terminated is None


def test_reneg_sec_timer_and_lame_duck_expiry(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, client_kw={"reneg_sec": 5, "tran_window": 8},
              server_kw={"reneg_sec": 0, "tran_window": 8})
    net.run(net.established)
    t0 = net.now
    net.run(lambda: len(net.keys(net.c_events)) == 4, max_time=30)   # 3 rekeys by reneg-sec
    assert [k.key_id for k in net.keys(net.c_events)] == [0, 1, 2, 3]
    assert net.now - t0 < 20
    slots = _kernel(net.c_events)
    assert slots[KeySlot.PRIMARY] in (2, 3)
    assert any(isinstance(e, ev.SwapKeys) for e in net.c_events)
    assert any(isinstance(e, ev.DeleteKey) for e in net.c_events)


def test_auth_failed_path(tls: tuple[TLSConfig, TLSConfig]) -> None:
    seen: list[ev.AuthRequest] = []

    def verify(req: ev.AuthRequest) -> tuple[bool, str]:
        seen.append(req)
        return (req.username == "alice" and req.password == "secret", "bad password")

    net = Net(*tls, client_kw={"username": "alice", "password": "wrong"},
              server_kw={"auth_verify": verify})
    net.run(lambda: net.client.terminated is not None, max_time=30)
    assert seen and seen[0].username == "alice" and seen[0].password == "wrong"
    fails = [e for e in net.c_events if isinstance(e, ev.AuthFailed)]
    assert fails and "bad password" in fails[0].reason
    assert net.client.terminated.reason == "auth-failed"
    assert not net.keys(net.c_events) and not net.keys(net.s_events)


def test_deferred_auth(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, client_kw={"username": "bob", "password": "pw"},
              server_kw={"auth_verify": lambda req: None})
    net.run(lambda: any(isinstance(e, ev.AuthRequest) for e in net.s_events), max_time=30)
    assert not net.keys(net.s_events)
    net.server_session.set_auth_result(0, True, now=net.now)
    net.run(net.established, max_time=30)
    _check_keys_match(net.keys(net.c_events)[0], net.keys(net.s_events)[0])


def test_bad_packets_are_dropped_without_killing_the_session(
        tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="none")
    net.run(net.established)
    c = net.client
    assert c.remote_sid is not None
    garbage = [
        b"",
        b"\x20" + b"\x00" * 3,
        b"\xff" * 30,
        ControlPacket(Opcode.P_CONTROL_V1, 0, b"\x42" * 8, message_id=99).encode(),   # wrong sid
        ControlPacket(Opcode.P_CONTROL_V1, 5, c.remote_sid, message_id=1).encode(),   # key id
        ControlPacket(Opcode.P_ACK_V1, 0, c.remote_sid, (3,), b"\x01" * 8).encode(),  # wrong remote
        ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, c.remote_sid,
                      message_id=0).encode(),                                          # direction
        bytes([Opcode.P_CONTROL_V1 << 3]) + c.remote_sid + b"\x09",                    # 9 acks
    ]
    for g in garbage:
        assert c.receive_datagram(g, net.now) is False
    assert c.dropped == len(garbage)
    assert c.terminated is None
    # a TLS-level garbage packet in the window kills only via a clear TLS error
    _rekey(net, from_client=True)
    assert c.terminated is None


def test_exit_is_delivered(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.run(net.established)
    net.client.close(net.now)
    net.run(lambda: net.client.terminated is not None, max_time=10)
    assert any(isinstance(e, ev.ExitReceived) for e in net.s_events)
    assert len(net.endpoint) == 0
    assert net.client.terminated.reason == "closed"


def test_max_clients(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="none", endpoint_kw={"max_clients": 1})
    net.run(net.established)
    # a second client completes the cookie exchange but gets no state
    second = ("192.0.2.3", 40001)
    reset = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, b"\x07" * 8, message_id=0)
    net.endpoint.receive_datagram(reset.encode(), second, net.now)
    (reply, _addr), = net.endpoint.datagrams_to_send(net.now)
    cookie = ControlPacket.decode(reply).session_id
    ack = ControlPacket(Opcode.P_ACK_V1, 0, b"\x07" * 8, (0,), cookie)
    assert not net.endpoint.receive_datagram(ack.encode(), second, net.now)
    assert "max-clients" in (net.endpoint.last_error or "")
    assert len(net.endpoint) == 1


def test_tls_crypt_v2_without_early_negotiation_is_stateful(
        tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="tls-crypt-v2")
    net.client.wrap.send_packet_id = 0      # a 2.5-style client: no 0x0f000000 marker
    (reset,) = net.client.datagrams_to_send(net.now)
    assert net.endpoint.receive_datagram(reset, CLIENT_ADDR, net.now)
    assert len(net.endpoint) == 1           # state right away (spec §6.3, last paragraph)
    assert net.endpoint.cookie_resets_sent == 0
    net.run(net.established)
    _check_keys_match(net.keys(net.c_events)[0], net.keys(net.s_events)[0])
    assert not net.client.resend_wkc


def test_force_cookie_ignores_old_tls_crypt_v2_clients(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="tls-crypt-v2", endpoint_kw={"force_cookie": True})
    net.client.wrap.send_packet_id = 0
    (reset,) = net.client.datagrams_to_send(net.now)
    assert not net.endpoint.receive_datagram(reset, CLIENT_ADDR, net.now)
    assert len(net.endpoint) == 0 and "force-cookie" in net.endpoint.last_error


def test_float_client_moves_the_control_channel(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    new = ("192.0.2.7", 50000)
    net.endpoint.float_client(0, new)
    assert net.endpoint.session_for(CLIENT_ADDR) is None
    s = net.endpoint.session_for(new)
    assert s is not None and net.endpoint.session_by_peer_id(0) is s
    net.client.renegotiate(net.now)
    for d in net.client.datagrams_to_send(net.now):
        assert net.endpoint.receive_datagram(d, new, net.now)
    assert {a for d, a in net.endpoint.datagrams_to_send(net.now)} == {new}
    with pytest.raises(LocalProtocolError):
        net.endpoint.float_client(9, new)


@pytest.mark.parametrize("message,event,reason", [
    ("RESTART", ev.RestartReceived, "restart"),
    ("HALT,maintenance", ev.HaltReceived, "halt"),
    ("AUTH_FAILED,token expired", ev.AuthFailed, "auth-failed"),
])
def test_server_control_messages_end_the_client(tls: tuple[TLSConfig, TLSConfig], message: str,
                                                event: type, reason: str) -> None:
    net = Net(*tls)
    net.run(net.established)
    net.server_session.send_control_message(message)
    net.run(lambda: net.client.terminated is not None, max_time=10)
    assert any(isinstance(e, event) for e in net.c_events)
    assert net.client.terminated.reason == reason
    # the client's kernel keys are removed on the way out
    assert _kernel(net.c_events) == {}


def test_userspace_keepalive(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)                       # server pushes ping 10, ping-restart 60
    net.run(net.established)
    assert net.client.ping == 10 and net.client.ping_restart == 60
    t0 = net.now
    net.advance(35)                       # pings flow both ways: nobody times out
    pings = [e for e in net.c_events if isinstance(e, ev.SendPing)]
    assert len(pings) >= 3 and net.client.terminated is None
    # the server goes silent (its pings are lost): ping-restart after 60 s
    net.to_client = lambda i, d: []
    net.s_events.clear()
    net.client.data_received(net.now)
    end = net.now + 61
    while net.client.terminated is None and net.now < end:
        t = net.client.get_timer()
        net.now = max(net.now, min(t if t is not None else end, end))
        net.client.handle_timer(net.now)
        net.client.datagrams_to_send(net.now)
        while net.client.next_event() is not None:
            pass
    assert net.client.terminated is not None and net.client.terminated.reason == "ping-restart"
    assert net.now - t0 >= 35 + 59


def test_transition_table_rejects_illegal_steps() -> None:
    from bsd_ovpn.proto.states import Trigger, can, transition
    # client: key sent before key received; server: the other way round
    assert transition(KSState.START, Trigger.KEY_SENT, server=False) is KSState.SENT_KEY
    assert transition(KSState.START, Trigger.KEY_RECEIVED, server=True) is KSState.GOT_KEY
    assert not can(KSState.START, Trigger.KEY_SENT, server=True)
    with pytest.raises(LocalProtocolError, match="server key_state cannot go from START"):
        transition(KSState.START, Trigger.KEY_SENT, server=True)
    with pytest.raises(LocalProtocolError):
        transition(KSState.SENT_KEY, Trigger.KEYS_GENERATED, server=False)
    assert transition(KSState.ACTIVE, Trigger.FAIL, server=False) is KSState.ERROR


def test_server_reneg_sec_has_jitter(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, client_kw={"reneg_sec": 100}, server_kw={"reneg_sec": 100})
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    c, s = net.client.primary, net.server_session.primary
    assert c.reneg_at == c.established + 100
    assert s.established + 90 <= s.reneg_at <= s.established + 100


def test_drop_client_frees_state_and_peer_id(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.run(net.established)
    net.endpoint.drop_client(0, "ping-restart", "kernel expired the peer")
    events = []
    while (ce := net.endpoint.next_event()) is not None:
        events.append(ce.event)
    assert isinstance(events[-1], ev.ConnectionTerminated)
    assert events[-1].reason == "ping-restart"
    assert [e.slot for e in events if isinstance(e, ev.DeleteKey)] == [KeySlot.PRIMARY]
    assert len(net.endpoint) == 0 and net.endpoint.session_by_peer_id(0) is None


def test_sessions_refuse_data_packets_and_count_them(tls: tuple[TLSConfig, TLSConfig]) -> None:
    """P_DATA_V1/V2 reaching a session (e.g. a keepalive before NEW_PEER) is refused,
    counted apart from protocol errors, and changes nothing."""
    net = Net(*tls)
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    c, s = net.client, net.server_session
    v2 = bytes([(Opcode.P_DATA_V2 << 3) | 0, 0, 0, 0]) + bytes(24)
    v1 = bytes([(Opcode.P_DATA_V1 << 3) | 1]) + bytes(24)
    for sess in (c, s):
        before = (sess.terminated, sess.primary.state)
        assert not sess.receive_datagram(v2, net.now)
        assert not sess.receive_datagram(v1, net.now)
        assert sess.data_ignored == 2 and sess.dropped == 0
        assert (sess.terminated, sess.primary.state) == before
        assert sess.next_event() is None and sess.datagrams_to_send(net.now) == []
    # the endpoint never hands data packets to a session at all
    assert not net.endpoint.receive_datagram(v2, CLIENT_ADDR, net.now)
    assert s.data_ignored == 2 and net.endpoint.dropped == 0


def test_restart_is_not_followed_by_exit_and_ends_once_acked(
        tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    s = net.server_session
    t0 = net.now
    net.endpoint.disconnect(0, net.now, restart=True)
    net.run(lambda: s.terminated is not None, max_time=10)
    assert s.terminated.reason == "restart" and "RESTART sent" in s.terminated.message
    assert net.now - t0 < 0.5                        # the ACK ended it, no lingering
    assert any(isinstance(e, ev.RestartReceived) for e in net.c_events)
    assert not any(isinstance(e, ev.ExitReceived) for e in net.c_events)
    assert len(net.endpoint) == 0


@pytest.mark.parametrize("how", ["kill", "shutdown-after-exit"])
def test_restart_to_a_silent_client_ends_after_a_short_linger(
        tls: tuple[TLSConfig, TLSConfig], how: str) -> None:
    """A restarting stock client acks nothing more: the server forgets it after
    RESTART_LINGER (one retransmission), not after EXIT_LINGER."""
    from bsd_ovpn.proto.session import EXIT_LINGER, RESTART_LINGER

    assert RESTART_LINGER < EXIT_LINGER
    net = Net(*tls)
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    s = net.server_session
    sent: list[bytes] = []
    net.to_client = lambda i, d: (sent.append(d), [])[1]
    t0 = net.now
    if how == "shutdown-after-exit":
        net.endpoint.disconnect(0, net.now)          # EXIT, waiting up to EXIT_LINGER
        assert s.terminated is None
        net.advance(0.5)
        net.endpoint.disconnect(0, net.now, restart=True)   # shortens, sends nothing new
    else:
        net.endpoint.disconnect(0, net.now, restart=True)
    while s.terminated is None:
        t = net.endpoint.get_timer()
        assert t is not None and t <= t0 + RESTART_LINGER + 0.5, (t, t0)
        net.now = max(net.now, t)
        net.endpoint.handle_timer(net.now)
        net.step()
    assert net.now - t0 <= RESTART_LINGER + 0.5
    assert len(net.endpoint) == 0
    events = [ce.event for ce in iter(net.endpoint.next_event, None)]
    assert not any(isinstance(e, ev.ConnectionTerminated) for e in events)  # already collected
    assert isinstance(net.s_events[-1], ev.ConnectionTerminated)
    assert [e.slot for e in net.s_events[-3:] if isinstance(e, ev.DeleteKey)] == [KeySlot.PRIMARY]
    assert 1 <= len(sent) <= 3                       # RESTART (or EXIT) + at most a resend


def test_restart_before_the_handshake_ends_at_once(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.step()
    net.step()                                      # cookie exchange done, TLS not finished
    assert len(net.endpoint) == 1
    net.endpoint.disconnect(0, net.now, restart=True)
    assert len(net.endpoint) == 0
    with pytest.raises(LocalProtocolError):
        net.endpoint.disconnect(0, net.now, restart=True)


@pytest.mark.parametrize("side", ["client-exit", "server-restart"])
def test_acked_goodbye_makes_the_timer_due_at_once(tls: tuple[TLSConfig, TLSConfig],
                                                   side: str) -> None:
    """Once our EXIT/RESTART is acked, get_timer() is due now: a daemon that runs due
    timers after every wake-up ends the session without lingering (no handle_timer per
    datagram needed)."""
    net = Net(*tls)
    net.run(lambda: net.established()
            and net.server_session.primary.state is KSState.GENERATED_KEYS)
    s = net.client if side == "client-exit" else net.server_session
    now = net.now
    if side == "client-exit":
        net.client.close(now)
        goodbye = net.client.datagrams_to_send(now)
    else:
        net.endpoint.disconnect(0, now, restart=True)
        goodbye = [d for d, _a in net.endpoint.datagrams_to_send(now)]
    assert goodbye and s.terminated is None
    assert s.get_timer() > now                      # sent, waiting for the ACK
    # the peer receives it and acks; no timer runs anywhere
    if side == "client-exit":
        for d in goodbye:
            net.endpoint.receive_datagram(d, CLIENT_ADDR, now)
        for d, _a in net.endpoint.datagrams_to_send(now):
            net.client.receive_datagram(d, now)
    else:
        for d in goodbye:
            net.client.receive_datagram(d, now)
        for d in net.client.datagrams_to_send(now):
            net.endpoint.receive_datagram(d, CLIENT_ADDR, now)
        assert net.endpoint.get_timer() <= now    # what the server daemon's wake() asks
    assert s.terminated is None and s.get_timer() <= now     # due at once
    s.handle_timer(now)
    assert s.terminated is not None


def test_restart_takes_only_restart_messages(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    net.run(net.established)
    s = net.server_session
    with pytest.raises(LocalProtocolError, match="RESTART"):
        s.restart(net.now, message="HALT")
    assert s.terminated is None and s._closing is None        # noqa: SLF001 - untouched
    s.restart(net.now, message="RESTART,[N]")                  # "try the next server"
    net.run(lambda: s.terminated is not None, max_time=5)
    [r] = [e for e in net.c_events if isinstance(e, ev.RestartReceived)]
    assert "[N]" in r.message


def test_refused_client_gets_the_alert_and_fails_fast(pki: PKI) -> None:
    """Server refuses a client cert from another CA: the alert OpenSSL made reaches the
    client at once (not retransmissions until hand-window), and both sides say tls-error."""
    srv = pki.server()
    stranger = pki.unrelated_ca().client("stranger")
    server_tls = TLSConfig(ca=pki.ca_pem, cert=srv.cert_pem, key=srv.key_pem,
                           remote_cert_tls="client")
    client_tls = TLSConfig(ca=pki.ca_pem, cert=stranger.cert_pem, key=stranger.key_pem,
                           remote_cert_tls="server")
    net = Net(server_tls, client_tls)
    start = net.now
    net.run(lambda: net.client.terminated is not None, max_time=10)
    assert net.now - start < 1.0, net.now - start        # no retransmission round needed
    assert net.client.terminated.reason == "tls-error"
    assert "alert" in net.client.terminated.message.lower(), net.client.terminated.message
    # the server reports why it refused, then forgets the session
    net.advance(5)
    [term] = [e for e in net.s_events if isinstance(e, ev.ConnectionTerminated)]
    assert term.reason == "tls-error" and "certificate verify failed" in term.message
    assert len(net.endpoint) == 0
