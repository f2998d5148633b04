"""The daemons' glue, in memory: which if_ovpn calls happen, in which order.

The server daemon runs against a RecordingTransport (the kernel stand-in that
records every request) with a real client Session talking to it through a
list; the client daemon runs against a real ServerEndpoint the same way.
Notifications (DEL_PEER/TIMEOUT, ROTATE_KEY, FLOAT) are scripted GET_PKT
replies, packed exactly as the kernel packs them.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

import pytest

from bsd_ovpn import config as configmod
from bsd_ovpn import nv
from bsd_ovpn.daemon.client import ClientDaemon
from bsd_ovpn.daemon.netcfg import RecordingNetConfig
from bsd_ovpn.daemon.server import ServerDaemon
from bsd_ovpn.daemon.status import render_prometheus, render_status_file, render_text
from bsd_ovpn.errors import ConfigError, IfOvpnError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Interface
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.cookie import CookieJar
from bsd_ovpn.proto.keyfile import StaticKey
from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import TLSCrypt
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.transport import RecordingTransport

CLIENT_ADDR = ("192.0.2.2", 40000)
SERVER_ADDR = ("192.0.2.1", 1194)
C = Command


@pytest.fixture(scope="module")
def files(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("daemon")
    srv, cli = pki.server(), pki.client("alice")
    key = StaticKey.generate()
    out = {"dir": d, "ca": Path(pki.ca_path), "scert": Path(srv.cert_path),
           "skey": Path(srv.key_path), "ccert": Path(cli.cert_path), "ckey": Path(cli.key_path),
           "tc": d / "tc.key"}
    out["tc"].write_text(key.format())
    out["tc"].chmod(0o600)
    return out


def server_config(files: dict[str, Path], extra: str = "") -> configmod.Config:
    text = f"""port 1194
proto udp
dev tun
topology subnet
server 198.51.100.0 255.255.255.0
keepalive 10 60
ca {files['ca']}
cert {files['scert']}
key {files['skey']}
dh none
tls-crypt {files['tc']}
data-ciphers AES-256-GCM:AES-128-GCM
{extra}
"""
    path = files["dir"] / "server.conf"
    path.write_text(text)
    return configmod.load(str(path))


def client_config(files: dict[str, Path], extra: str = "") -> configmod.Config:
    text = f"""client
dev tun
proto udp
remote 192.0.2.1 1194
nobind
ca {files['ca']}
cert {files['ccert']}
key {files['ckey']}
tls-crypt {files['tc']}
remote-cert-tls server
data-ciphers AES-256-GCM
connect-retry 1
{extra}
"""
    path = files["dir"] / "client.conf"
    path.write_text(text)
    return configmod.load(str(path))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def calls(tr: RecordingTransport) -> list[str]:
    """The transport calls as short names: NEW_PEER, create_interface, ..."""
    out = []
    for c in tr.calls:
        if c.method == "request":
            out.append(Command(c.command).name.removeprefix("OVPN_"))
        elif c.method == "query":
            continue
        else:
            out.append(c.method)
    return out


def last(tr: RecordingTransport, cmd: Command):
    return [c for c in tr.calls if c.method == "request" and c.command == cmd][-1].nvlist()


def notif(**kw) -> bytes:
    return nv.pack(kw)


def stats_reply(peer_id: int = 0, *, bytes_in: int = 500, bytes_out: int = 600,
                packets_in: int = 5, packets_out: int = 6) -> bytes:
    return nv.pack({"peers": [{"peerid": peer_id, "packets": {"in": packets_in,
                                                              "out": packets_out},
                               "bytes": {"in": bytes_in, "out": bytes_out}}]})


# --------------------------------------------------------------------------- server side

class ServerNet:
    """ServerDaemon (recording kernel) <-> real client Sessions, through lists."""

    def __init__(self, files: dict[str, Path], extra: str = "", *, username: str | None = None,
                 password: str | None = None, engine: str = "test") -> None:
        self.files = files
        self.clock = Clock()
        self.cfg = server_config(files, extra)
        self.tr = RecordingTransport(["tun0"])
        self.ifc = Interface("tun0", self.tr)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))          # NEW_PEER needs a bound socket
        self.net = RecordingNetConfig()
        self.out: list[tuple[bytes, tuple]] = []
        self.pending: list = []
        self.d = ServerDaemon(self.cfg, ifc=self.ifc, sock=self.sock,
                              send=lambda data, addr: self.out.append((data, addr)),
                              netcfg=self.net, engine=engine, clock=self.clock,
                              wall=lambda: 1.7e9 + self.clock.t,
                              call_soon=self.pending.append, cookie_jar=CookieJar(b"k" * 32, 60))
        self.clients: dict[tuple, tuple[Session, list[ev.Event]]] = {}
        self.client_addr = CLIENT_ADDR
        self.client, self.c_events = self.add_client(CLIENT_ADDR, username=username,
                                                     password=password)

    def add_client(self, addr: tuple, *, username: str | None = None,
                   password: str | None = None) -> tuple[Session, list[ev.Event]]:
        f = self.files
        ctls = TLSConfig(ca=f["ca"].read_text(), cert=f["ccert"].read_text(),
                         key=f["ckey"].read_text(), remote_cert_tls="server")
        key = StaticKey.parse(f["tc"].read_text())
        s = Session.connect(
            SessionSettings(server=False, tls=ctls, data_ciphers=("AES-256-GCM",),
                            username=username, password=password),
            TLSCrypt(key, server=False), self.clock.t)
        events: list[ev.Event] = []
        self.clients[addr] = (s, events)
        return s, events

    def move(self, old: tuple, new: tuple) -> None:
        self.clients[new] = self.clients.pop(old)

    def step(self) -> int:
        now = self.clock.t
        moved = 0
        for addr, (s, _e) in list(self.clients.items()):
            for d in s.datagrams_to_send(now):
                self.d.datagram_received(d, addr, now)
                moved += 1
        out, self.out = self.out, []
        for d, addr in out:
            if addr in self.clients:
                self.clients[addr][0].receive_datagram(d, now)
            moved += 1
        for s, events in self.clients.values():
            while (e := s.next_event()) is not None:
                events.append(e)
        while self.pending:
            self.pending.pop(0)()
            moved += 1
        return moved

    def advance(self, seconds: float, until=None) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            while self.step():
                pass
            if until is not None and until():
                return
            ctimers = [s.get_timer() for s, _e in self.clients.values()]
            timers = [t for t in (*ctimers, self.d.deadline()) if t is not None]
            nxt = min([end, self.clock.t + 0.5, *[t for t in timers if t > self.clock.t]])
            self.clock.t = nxt
            for s, _e in self.clients.values():
                t = s.get_timer()
                if t is not None and t <= nxt:
                    s.handle_timer(nxt)
            self.d.wake(nxt)
        while self.step():
            pass

    def connect(self, events: list[ev.Event] | None = None) -> None:
        events = self.c_events if events is None else events
        self.advance(10, until=lambda: any(isinstance(e, ev.KeysReady) for e in events))
        assert any(isinstance(e, ev.KeysReady) for e in events), events


def test_server_connect_sequence(files) -> None:
    n = ServerNet(files)
    n.connect()
    # dco spec §4.2: NEW_PEER, SET_PEER, NEW_KEY PRIMARY, START_VPN -- before the PUSH_REPLY
    assert calls(n.tr) == ["NEW_PEER", "SET_PEER", "NEW_KEY", "START_VPN"]
    peer = last(n.tr, C.OVPN_NEW_PEER)
    assert peer["peerid"] == 0
    assert peer["vpn_ipv4"] == ipaddress.IPv4Address("198.51.100.2").packed
    assert peer["remote"]["port"] == socket.htons(CLIENT_ADDR[1])
    assert [c.fd for c in n.tr.calls if c.command == C.OVPN_NEW_PEER] == [n.sock.fileno()]
    ka = last(n.tr, C.OVPN_SET_PEER)
    assert (ka["interval"], ka["timeout"]) == (10, 120)      # keepalive 10 60: timeout x2
    key = last(n.tr, C.OVPN_NEW_KEY)
    assert (key["slot"], key["keyid"], key["peerid"]) == (0, 0, 0)
    assert key["encrypt"]["cipher"] == "AES-256-GCM"
    [push] = [e for e in n.c_events if isinstance(e, ev.PushReplyReceived)]
    assert push.reply.peer_id == 0 and push.reply.ping == 10 and push.reply.ping_restart == 60
    assert str(push.reply.ifconfig[0]) == "198.51.100.2"
    assert str(push.reply.ifconfig[1]) == "255.255.255.0"
    assert push.reply.route_gateway == "198.51.100.1" and push.reply.topology == "subnet"
    # the client's keys are the server's, mirrored
    ck = [e for e in n.c_events if isinstance(e, ev.KeysReady)][0].keys
    assert key["encrypt"]["key"] == ck.decrypt_key and key["decrypt"]["key"] == ck.encrypt_key


def test_server_interface_setup(files) -> None:
    n = ServerNet(files)
    n.d.setup_interface()
    assert n.net.calls == [("mtu", "tun0", 1500), ("addr", "tun0", "198.51.100.1/24", None)]


@pytest.mark.parametrize("c2c,forwarding,expect", [
    (True, False, "IP forwarding is off"),
    (True, True, None),
    (False, True, "IP forwarding is on"),
    (False, None, "IP forwarding is unknown"),
    (False, False, None),
])
def test_server_says_what_decides_client_to_client(files, caplog, c2c: bool,
                                                   forwarding: bool | None,
                                                   expect: str | None) -> None:
    """ovpnctl never forwards between clients itself (the host's IP stack does, as with
    OpenVPN's DCO): it warns when the host will not do what the config asks for."""
    n = ServerNet(files, "client-to-client\n" if c2c else "")
    assert n.cfg.client_to_client is c2c
    n.net.forwarding = forwarding
    with caplog.at_level("INFO", logger="bsd_ovpn.daemon"):
        n.d.setup_interface()
    text = "\n".join(r.getMessage() for r in caplog.records if "client" in r.getMessage())
    if expect is None:
        assert text == ""
    else:
        assert expect in text and "tun0" in text


def test_server_rekey_slot_dance(files) -> None:
    n = ServerNet(files, "tran-window 100\nreneg-sec 0")
    n.connect()
    n.tr.calls.clear()
    n.client.renegotiate(n.clock.t)
    n.advance(5)
    # new key -> SECONDARY; TX stays on the old key for now
    assert calls(n.tr) == ["NEW_KEY", "START_VPN"]
    k = last(n.tr, C.OVPN_NEW_KEY)
    assert (k["slot"], k["keyid"]) == (1, 1)
    n.advance(60)                                # auth_deferred_expire: swap
    assert calls(n.tr) == ["NEW_KEY", "START_VPN", "SWAP_KEYS"]
    n.advance(45)                                # the lame duck dies after tran-window
    assert calls(n.tr) == ["NEW_KEY", "START_VPN", "SWAP_KEYS", "DEL_KEY"]
    assert last(n.tr, C.OVPN_DEL_KEY)["slot"] == 1
    n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
    assert n.d.status().clients[0].key_id == 1


def test_server_keepalive_timeout_forgets_client(files) -> None:
    n = ServerNet(files)
    n.connect()
    n.tr.calls.clear()
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=0, del_reason=1,
                                      packets={"in": 1, "out": 2}, bytes={"in": 3, "out": 4}))
    n.out.clear()
    n.d.wake(n.clock.t)
    assert n.d.records == {} and len(n.d.endpoint) == 0
    assert "DEL_PEER" not in calls(n.tr)          # the kernel already deleted it
    assert n.out == []                            # nobody to say EXIT to
    # the address goes back to the pool: the next client gets .2 again
    n2 = ServerNet(files)
    n2.connect()
    assert last(n2.tr, C.OVPN_NEW_PEER)["vpn_ipv4"] == bytes([198, 51, 100, 2])


def test_server_spaces_notification_drains_over_the_engine(files) -> None:
    """Over the userspace engine a GET_PKT is a round trip even when the queue is
    empty: wake-ups closer than ENGINE_DRAIN_SPACING do not drain, and the skipped
    drain becomes a deadline so a quiet loop still makes it."""
    from bsd_ovpn.daemon.loop import ENGINE_DRAIN_SPACING

    def get_pkts(tr: RecordingTransport) -> int:
        return sum(1 for c in tr.calls if c.method == "query" and c.command == C.OVPN_GET_PKT)

    n = ServerNet(files, engine="userspace")
    n.connect()
    n.clock.t += ENGINE_DRAIN_SPACING
    n.tr.calls.clear()
    n.d.wake(n.clock.t)
    assert get_pkts(n.tr) == 1                         # queue empty: one ENOENT
    assert n.d.dc.drain_deadline() is None
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=0, del_reason=1,
                                      packets={"in": 1, "out": 2}, bytes={"in": 3, "out": 4}))
    n.clock.t += ENGINE_DRAIN_SPACING / 4
    n.d.wake(n.clock.t)
    assert get_pkts(n.tr) == 1                         # too soon: not asked
    assert 0 in n.d.records
    due = n.d.deadline()
    assert due is not None and n.clock.t < due <= n.clock.t + ENGINE_DRAIN_SPACING
    n.clock.t = due
    n.d.wake(n.clock.t)
    assert get_pkts(n.tr) >= 2
    assert n.d.records == {}                           # the timeout arrived
    # the kernel transport drains on every wake-up (its GET_PKT is an ioctl)
    k = ServerNet(files)
    k.connect()
    k.tr.calls.clear()
    k.d.wake(k.clock.t)
    k.d.wake(k.clock.t)
    assert get_pkts(k.tr) == 2


def test_server_rotate_key_starts_renegotiation(files) -> None:
    n = ServerNet(files, "reneg-sec 0")
    n.connect()
    n.tr.calls.clear()
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=1))
    n.advance(5)
    assert calls(n.tr)[:2] == ["NEW_KEY", "START_VPN"]
    assert last(n.tr, C.OVPN_NEW_KEY)["keyid"] == 1


def test_server_float_moves_control_channel(files) -> None:
    n = ServerNet(files)
    n.connect()
    new = ("192.0.2.77", 50000)
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=2, address={
        "af": 2, "address": bytes([192, 0, 2, 77]), "port": socket.htons(50000)}))
    n.d.wake(n.clock.t)
    n.move(CLIENT_ADDR, new)
    assert n.d.endpoint.session_for(new) is not None
    n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
    assert n.d.status().clients[0].real_address == "192.0.2.77:50000"
    n.d.kill("alice", n.clock.t)                  # control packets now go to the new address
    n.advance(3)
    assert any(isinstance(e, ev.RestartReceived) for e in n.c_events)


def test_server_kill_sends_restart_then_del_peer(files) -> None:
    n = ServerNet(files)
    n.connect()
    n.tr.calls.clear()
    assert n.d.kill("alice", n.clock.t) == [0]
    n.advance(6)
    assert any(isinstance(e, ev.RestartReceived) for e in n.c_events)
    assert calls(n.tr) == ["DEL_PEER"]
    assert n.d.records == {}
    with pytest.raises(Exception, match="no client"):
        n.d.kill("alice", n.clock.t)


def test_server_kill_of_a_silent_client_ends_promptly(files) -> None:
    """A stock client restarts on RESTART without acking it (or anything after): the
    server must not keep the session (and its if_ovpn peer) for EXIT_LINGER."""
    from bsd_ovpn.proto.session import RESTART_LINGER

    n = ServerNet(files)
    n.connect()
    n.tr.calls.clear()
    del n.clients[CLIENT_ADDR]                   # gone: nothing reaches it, nothing comes back
    t0 = n.clock.t
    n.d.kill("alice", n.clock.t)
    n.advance(6, until=lambda: not n.d.records)
    assert n.d.records == {} and calls(n.tr) == ["DEL_PEER"]
    assert n.clock.t - t0 <= RESTART_LINGER + 0.5


def test_server_shutdown_with_silent_clients_is_done_within_the_linger(files) -> None:
    from bsd_ovpn.daemon.server import SHUTDOWN_LINGER

    n = ServerNet(files)
    n.connect()
    del n.clients[CLIENT_ADDR]
    t0 = n.clock.t
    n.d.begin_shutdown(n.clock.t)
    n.advance(6, until=n.d.shutdown_done)
    assert n.d.shutdown_done() and n.clock.t - t0 < SHUTDOWN_LINGER


def test_server_status_uses_peer_stats(files) -> None:
    n = ServerNet(files)
    n.connect()
    n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
    st = n.d.status()
    [c] = st.clients
    assert (c.common_name, c.vpn_ipv4, c.peer_id, c.cipher, c.key_id) == \
        ("alice", "198.51.100.2", 0, "AES-256-GCM", 0)
    assert (c.bytes_in, c.bytes_out, c.packets_in, c.packets_out) == (500, 600, 5, 6)
    assert c.real_address == "192.0.2.2:40000"
    d = st.as_dict()
    assert d["clients"][0]["bytes_in"] == 500 and d["role"] == "server"
    prom = render_prometheus(st)
    assert 'ovpnctl_peer_bytes_received_total{role="server",interface="tun0",peer_id="0",' \
           'common_name="alice"} 500' in prom
    assert "alice" in render_text(st)
    v2 = render_status_file(st, 2)
    assert "CLIENT_LIST,alice,192.0.2.2:40000,198.51.100.2,,500,600," in v2
    v1 = render_status_file(st, 1)
    assert v1.startswith("OpenVPN CLIENT LIST\n") and "alice,192.0.2.2:40000,500,600," in v1


def test_server_ccd_iroute_and_fixed_address(files) -> None:
    ccd = files["dir"] / "ccd"
    ccd.mkdir(exist_ok=True)
    (ccd / "alice").write_text("ifconfig-push 198.51.100.50 255.255.255.0\n"
                               "iroute 192.0.2.128 255.255.255.128\npush \"route 192.0.2.0\"\n")
    n = ServerNet(files, f"client-config-dir {ccd}")
    n.connect()
    assert last(n.tr, C.OVPN_NEW_PEER)["vpn_ipv4"] == bytes([198, 51, 100, 50])
    assert ("route-add", "tun0", "192.0.2.128/25", "198.51.100.50", 100) in n.net.calls
    [push] = [e for e in n.c_events if isinstance(e, ev.PushReplyReceived)]
    assert str(push.reply.ifconfig[0]) == "198.51.100.50"
    assert any(r.network == "192.0.2.0" for r in push.reply.routes)
    n.d.kill("0", n.clock.t)
    n.advance(6)
    assert ("route-del", "tun0", "192.0.2.128/25", "198.51.100.50", 100) in n.net.calls


def test_server_ccd_disable_rejects(files) -> None:
    ccd = files["dir"] / "ccd-off"
    ccd.mkdir(exist_ok=True)
    (ccd / "alice").write_text("disable\n")
    n = ServerNet(files, f"client-config-dir {ccd}")
    n.advance(10)
    assert any(isinstance(e, ev.AuthFailed) for e in n.c_events)
    assert "NEW_PEER" not in calls(n.tr)


@pytest.mark.parametrize("good", [True, False])
def test_server_auth_user_pass_verify_via_file(files, good: bool) -> None:
    script = files["dir"] / "verify.sh"
    script.write_text('#!/bin/sh\n[ "$(sed -n 1p "$1")" = alice ] && '
                      '[ "$(sed -n 2p "$1")" = secret ] && [ "$common_name" = alice ]\n')
    script.chmod(0o755)
    n = ServerNet(files, f"script-security 2\nauth-user-pass-verify {script} via-file",
                  username="alice", password="secret" if good else "wrong")
    # the script runs on a worker thread; its answer comes back through call_soon
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n.advance(0.5)
        if any(isinstance(e, (ev.KeysReady, ev.AuthFailed)) for e in n.c_events):
            break
        time.sleep(0.02)
    if good:
        assert any(isinstance(e, ev.KeysReady) for e in n.c_events)
        n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
        assert n.d.status().clients[0].username == "alice"
    else:
        assert any(isinstance(e, ev.AuthFailed) for e in n.c_events)
        assert "NEW_PEER" not in calls(n.tr)


def test_server_verify_script_needs_script_security(files) -> None:
    with pytest.raises(ConfigError, match="script-security 2"):
        ServerNet(files, "auth-user-pass-verify /bin/true via-file")


def test_server_rejects_net30_topology(files) -> None:
    cfg = server_config(files)
    cfg.topology = "net30"
    with pytest.raises(ConfigError, match="topology subnet"):
        ServerDaemon(cfg, ifc=Interface("tun0", RecordingTransport(["tun0"])), sock=None,
                     send=lambda d, a: None, netcfg=RecordingNetConfig())


def test_server_max_clients(files) -> None:
    n = ServerNet(files, "max-clients 1")
    n.connect()
    _s2, events2 = n.add_client(("192.0.2.3", 40001))
    n.advance(5)
    assert not any(isinstance(e, ev.KeysReady) for e in events2)
    assert len(n.d.endpoint) == 1 and calls(n.tr).count("NEW_PEER") == 1
    assert n.d.endpoint.dropped > 0


def test_server_shutdown_says_restart_and_destroys(files) -> None:
    n = ServerNet(files)
    n.connect()
    n.tr.calls.clear()
    n.d.begin_shutdown(n.clock.t)
    n.advance(6, until=n.d.shutdown_done)
    assert n.d.shutdown_done()
    assert any(isinstance(e, ev.RestartReceived) for e in n.c_events)
    n.ifc.destroy_on_exit = True
    n.d.close()
    assert "destroy_interface" in calls(n.tr) and n.tr.interfaces == []


def test_server_sighup_reload_keeps_clients(files) -> None:
    n = ServerNet(files)
    n.connect()
    server_config(files, 'push "route 192.0.2.0 255.255.255.0"\nport 1195')
    kept = n.d.reload_from_disk()
    assert kept == ["port"]
    n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
    assert len(n.d.records) == 1 and n.d.status().clients[0].common_name == "alice"
    # a new client gets the new push
    _s2, events2 = n.add_client(("192.0.2.3", 40001))
    n.connect(events2)
    [push] = [e for e in events2 if isinstance(e, ev.PushReplyReceived)]
    assert any(r.network == "192.0.2.0" for r in push.reply.routes)
    assert str(push.reply.ifconfig[0]) == "198.51.100.2"       # alice again: replaced
    server_config(files)


# --------------------------------------------------------------------------- client side

class ClientNet:
    """ClientDaemon (recording kernel) <-> a real ServerEndpoint, through lists."""

    def __init__(self, files: dict[str, Path], extra: str = "") -> None:
        self.clock = Clock()
        self.cfg = client_config(files, extra)
        self.tr = RecordingTransport()
        self.net = RecordingNetConfig()
        self.out: list[bytes] = []
        self.socks: list[socket.socket] = []
        self.d = ClientDaemon(self.cfg, transport=self.tr, open_socket=self._sock,
                              send=lambda s, data, addr: self.out.append(data),
                              netcfg=self.net, engine="test", clock=self.clock,
                              wall=lambda: 1.7e9 + self.clock.t,
                              resolve=lambda h, p, proto: (socket.AF_INET, (h, p)))
        stls = TLSConfig(ca=files["ca"].read_text(), cert=files["scert"].read_text(),
                         key=files["skey"].read_text())
        key = StaticKey.parse(files["tc"].read_text())
        self.ss = SessionSettings(server=True, tls=stls, data_ciphers=("AES-256-GCM",),
                                  push_options=("ping 10", "ping-restart 60"))
        self.ep = ServerEndpoint(
            ServerSettings(self.ss, pool=ipaddress.ip_network("198.51.100.0/24")),
            wrap_factory=lambda: TLSCrypt(key, server=True), cookie_jar=CookieJar(b"k" * 32, 60))
        self.s_events: list[ev.Event] = []
        self.reachable = {SERVER_ADDR[0]}

    def _sock(self, family: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        self.socks.append(s)
        return s

    def step(self) -> int:
        now = self.clock.t
        moved = 0
        out, self.out = self.out, []
        for d in out:
            if self.d.remote is not None and self.d.remote[0] not in self.reachable:
                continue                          # a remote that does not answer
            self.ep.receive_datagram(d, CLIENT_ADDR, now)
            moved += 1
        for d, _addr in self.ep.datagrams_to_send(now):
            self.d.datagram_received(d, (self.d.remote[0], SERVER_ADDR[1]), now)
            moved += 1
        while (ce := self.ep.next_event()) is not None:
            self.s_events.append(ce.event)
        return moved

    def advance(self, seconds: float, until=None) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            while self.step():
                pass
            if until is not None and until():
                return
            timers = [t for t in (self.ep.get_timer(), self.d.deadline()) if t is not None]
            nxt = min([end, self.clock.t + 0.5, *[t for t in timers if t > self.clock.t]])
            self.clock.t = nxt
            t = self.ep.get_timer()
            if t is not None and t <= nxt:
                self.ep.handle_timer(nxt)
            self.d.wake(nxt)
        while self.step():
            pass

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_client_connect_sequence(files) -> None:
    n = ClientNet(files)
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    assert n.d.state == "connected"
    # dco spec §4.3: create, SET_IFMODE, NEW_PEER, NEW_KEY, START_VPN, SET_PEER
    assert calls(n.tr) == ["create_interface", "rename_interface", "SET_IFMODE", "NEW_PEER",
                           "NEW_KEY", "START_VPN", "SET_PEER"]
    assert n.tr.interfaces == ["tun0"]
    assert last(n.tr, C.OVPN_SET_IFMODE)["ifmode"] == 0x8002          # pushed topology subnet
    peer = last(n.tr, C.OVPN_NEW_PEER)
    assert peer["peerid"] == 0 and peer["remote"]["address"] == bytes([192, 0, 2, 1])
    ka = last(n.tr, C.OVPN_SET_PEER)
    assert (ka["interval"], ka["timeout"]) == (10, 60)                # pushed values
    assert n.net.calls == [("mtu", "tun0", 1500), ("addr", "tun0", "198.51.100.2/24", None)]
    assert n.d.session is not None and n.d.session.ping == 0          # kernel keepalive only
    n.close()


def test_client_ping_restart_reconnects(files) -> None:
    n = ClientNet(files)
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    n.tr.calls.clear()
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=0, del_reason=1))
    n.d.wake(n.clock.t)
    assert calls(n.tr)[:1] == ["destroy_interface"]       # the tunnel is gone at once
    assert n.d.state == "reconnecting" and n.net.calls[-1] == ("undo-all",)
    n.advance(15, until=lambda: n.d.state == "connected")
    assert n.d.state == "connected"
    assert calls(n.tr)[1:] == ["create_interface", "rename_interface", "SET_IFMODE", "NEW_PEER",
                               "NEW_KEY", "START_VPN", "SET_PEER"]
    n.close()


def test_client_restart_from_server_reconnects(files) -> None:
    n = ClientNet(files)
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    [(pid, _a, _s)] = n.ep.clients()
    t0 = n.clock.t
    n.ep.disconnect(pid, n.clock.t, restart=True)
    n.advance(2, until=lambda: n.d.state != "connected")
    assert n.d.state == "reconnecting" and n.tr.interfaces == []
    # our client acked the RESTART: the server forgot it at once, not after RESTART_LINGER
    n.advance(0.1)
    assert len(n.ep) == 0 and n.clock.t - t0 < 1.0
    [term] = [e for e in n.s_events if isinstance(e, ev.ConnectionTerminated)]
    assert term.reason == "restart"
    n.advance(15, until=lambda: n.d.state == "connected")
    assert n.d.state == "connected" and n.tr.interfaces == ["tun0"]
    n.close()


def test_client_rekey_and_sigterm(files) -> None:
    n = ClientNet(files)
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    n.tr.calls.clear()
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=1))      # ROTATE_KEY
    n.advance(70)
    assert calls(n.tr)[:3] == ["NEW_KEY", "START_VPN", "SWAP_KEYS"]
    assert last(n.tr, C.OVPN_NEW_KEY)["slot"] == 1
    n.d.begin_shutdown(n.clock.t)
    n.advance(3, until=n.d.finished)
    assert n.d.finished() and n.d.exit_status() == 0
    assert any(isinstance(e, ev.ExitReceived) for e in n.s_events)    # EXIT reached the server
    assert n.tr.interfaces == [] and "destroy_interface" in calls(n.tr)
    n.close()


def test_client_auth_failed_ends_daemon(files) -> None:
    n = ClientNet(files)
    n.ss.auth_verify = lambda req: (False, "nope")
    n.d.start(n.clock.t)
    n.advance(10, until=n.d.finished)
    assert n.d.finished() and n.d.exit_status() == 1
    assert n.tr.interfaces == []
    n.close()


def test_client_config_checks(files) -> None:
    with pytest.raises(ConfigError, match="UDP only"):
        cfg = client_config(files)
        cfg.remotes = [configmod.Remote("192.0.2.1", 1194, "tcp-client")]
        ClientDaemon(cfg, transport=RecordingTransport(), open_socket=lambda f: None)


def test_server_rejects_client_without_data_v2(files) -> None:
    n = ServerNet(files)
    n.client.settings.peer_info = "IV_VER=2.3.18\nIV_PLAT=linux\nIV_NCP=2\n"
    n.advance(10)
    [fail] = [e for e in n.c_events if isinstance(e, ev.AuthFailed)]
    assert "DATA_V2" in fail.reason
    assert "NEW_PEER" not in calls(n.tr)


def test_client_ignores_data_packets_and_strangers(files) -> None:
    n = ClientNet(files)
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    s = n.d.session
    # a server keepalive that beat our NEW_PEER to the socket, and a packet from elsewhere
    n.d.datagram_received(bytes([0x48, 0, 0, 0]) + bytes(20), SERVER_ADDR, n.clock.t)
    n.d.datagram_received(b"\x38" + bytes(40), ("192.0.2.99", 1194), n.clock.t)
    # the session itself refused the data packet (no daemon-side filter any more)
    assert s.data_ignored == 1 and s.dropped == 0 and n.d.state == "connected"
    n.close()


def test_client_tries_the_next_remote(files) -> None:
    n = ClientNet(files, "hand-window 5")
    n.d.remotes.insert(0, configmod.Remote("192.0.2.50", 1194, "udp"))   # a dead one first
    n.d.start(n.clock.t)
    assert n.d.remote[0] == "192.0.2.50"
    n.advance(30, until=lambda: n.d.state == "connected")
    assert n.d.state == "connected" and n.d.remote[0] == "192.0.2.1"
    assert last(n.tr, C.OVPN_NEW_PEER)["remote"]["address"] == bytes([192, 0, 2, 1])
    n.close()


def test_client_persist_tun_keeps_interface_across_reconnects(files) -> None:
    n = ClientNet(files, "persist-tun")
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    n.tr.calls.clear()
    n.tr.script(C.OVPN_GET_PKT, notif(peerid=0, notification=0, del_reason=1))
    n.d.wake(n.clock.t)
    assert n.tr.interfaces == ["tun0"] and "destroy_interface" not in calls(n.tr)
    n.advance(15, until=lambda: n.d.state == "connected")
    # the kernel already deleted the old peer; the new one goes onto the same interface
    assert calls(n.tr) == ["NEW_PEER", "NEW_KEY", "START_VPN", "SET_PEER"]
    n.d.close()
    assert n.tr.interfaces == []
    n.close()


def test_server_same_cn_replaces_old_session_and_keeps_address(files) -> None:
    n = ServerNet(files)
    n.connect()
    n.tr.calls.clear()
    _s2, events2 = n.add_client(("192.0.2.2", 40002))     # alice again, new source port
    n.connect(events2)
    assert any(isinstance(e, ev.RestartReceived) for e in n.c_events)    # the old one is told
    assert calls(n.tr)[:2] == ["DEL_PEER", "NEW_PEER"]
    assert last(n.tr, C.OVPN_DEL_PEER)["peerid"] == 0
    assert last(n.tr, C.OVPN_NEW_PEER)["peerid"] == 1
    [push] = [e for e in events2 if isinstance(e, ev.PushReplyReceived)]
    assert str(push.reply.ifconfig[0]) == "198.51.100.2"
    n.advance(8)                                   # the old session's tail changes nothing
    assert sorted(n.d.records) == [1] and calls(n.tr).count("DEL_PEER") == 1


def test_server_duplicate_cn_allows_both(files) -> None:
    n = ServerNet(files, "duplicate-cn")
    n.connect()
    _s2, events2 = n.add_client(("192.0.2.2", 40002))
    n.connect(events2)
    assert sorted(n.d.records) == [0, 1] and "DEL_PEER" not in calls(n.tr)


def test_client_needs_credentials_in_a_file(files) -> None:
    with pytest.raises(ConfigError, match="cannot prompt") as info:
        ClientDaemon(client_config(files, "auth-user-pass"), transport=RecordingTransport(),
                     open_socket=lambda f: None)
    assert info.value.directive == "auth-user-pass"


def test_server_logs_a_refused_tls_handshake(files, pki: PKI, caplog) -> None:
    """A client the server refuses in TLS never gets a record; the reason must still be logged,
    and the refused client gets the alert and gives up at once."""
    net = ServerNet(files)
    stranger = pki.unrelated_ca().client("stranger")
    key = StaticKey.parse(files["tc"].read_text())
    s = Session.connect(
        SessionSettings(server=False, data_ciphers=("AES-256-GCM",),
                        tls=TLSConfig(ca=files["ca"].read_text(), cert=stranger.cert_pem,
                                      key=stranger.key_pem, remote_cert_tls="server")),
        TLSCrypt(key, server=False), net.clock.t)
    addr = ("192.0.2.9", 40009)
    net.clients = {addr: (s, [])}
    start = net.clock.t
    caplog.set_level("INFO", logger="bsd_ovpn.daemon")
    net.advance(10, until=lambda: s.terminated is not None)
    assert s.terminated is not None and s.terminated.reason == "tls-error"
    assert net.clock.t - start <= 1.0, net.clock.t - start
    net.advance(3)
    lines = [r.getMessage() for r in caplog.records
             if "TLS handshake failed" in r.getMessage()]
    assert lines and lines[0].startswith("client 192.0.2.9:40009: TLS handshake failed: "), lines
    assert "certificate verify failed" in lines[0], lines
    assert not net.d.records


def test_client_records_and_releases_its_interface_owner(files, tmp_path) -> None:
    """The owner record exists exactly while the client holds an interface (crash cleanup)."""
    from bsd_ovpn.daemon.stale import InterfaceLedger
    n = ClientNet(files)
    owners = tmp_path / "owners"
    n.d.ledger = InterfaceLedger(n.tr, config=n.cfg.path, control=None, directory=str(owners))
    n.d.start(n.clock.t)
    n.advance(10, until=lambda: n.d.state == "connected")
    assert n.d.state == "connected"
    [rec] = [r for _p, r in n.d.ledger.records()]
    assert (rec.ifname, rec.pid) == ("tun0", os.getpid())
    n.d.close()
    assert list(owners.iterdir()) == []
    n.close()


def test_server_sends_replies_during_a_long_batch(files) -> None:
    """A batch that takes longer than PUMP_INTERVAL to process does not hold every reply
    until its end: the first client's answer leaves before the last datagram is read."""
    from bsd_ovpn.daemon.server import PUMP_INTERVAL
    n = ServerNet(files)
    addrs = [("192.0.2.2", 41000 + i) for i in range(4)]
    sessions = [n.add_client(a)[0] for a in addrs]
    batch = [(d, a, None) for s, a in zip(sessions, addrs) for d in s.datagrams_to_send(n.clock.t)]
    assert len(batch) == 4
    seen: list[int] = []
    processed = 0
    real_receive = n.d.endpoint.receive_datagram

    def receive(*args, **kw):
        nonlocal processed
        processed += 1
        return real_receive(*args, **kw)

    n.d.endpoint.receive_datagram = receive
    n.d.send = lambda data, addr: seen.append(processed)
    ticks = iter(range(10_000))
    n.d.clock = lambda: 1000.0 + next(ticks) * PUMP_INTERVAL   # each look: one interval later
    n.d.datagrams_received(batch, n.clock.t)
    assert len(seen) == 4                        # one reset answer per client ...
    assert seen[0] < 4                           # ... the first sent mid-batch
    # a clock that stands still (a fast batch): everything goes out once, at the end
    seen.clear()
    processed = 0
    more = [n.add_client(("192.0.2.3", 42000 + i))[0] for i in range(4)]
    batch = [(d, ("192.0.2.3", 42000 + i), None) for i, s in enumerate(more)
             for d in s.datagrams_to_send(n.clock.t)]
    n.d.clock = n.clock
    n.d.datagrams_received(batch, n.clock.t)
    assert seen == [4, 4, 4, 4]


def test_server_batches_clients_steps_and_drops_only_the_failed_one(files) -> None:
    """Clients that finish their handshakes in one batch of datagrams get their if_ovpn
    steps in one pipelined round trip; a failed step drops its own client only."""
    n = ServerNet(files)
    second = ("192.0.2.3", 40001)
    _s2, events2 = n.add_client(second)
    rounds: list[int] = []

    def request_many(ifname, reqs):          # what the engine transport offers
        rounds.append(len(reqs))
        errors = []
        for command, data, fd in reqs:
            try:
                n.tr.request(ifname, command, data, fd=fd)
                errors.append(None)
            except IfOvpnError as exc:
                errors.append(exc)
        return errors

    n.tr.request_many = request_many        # type: ignore[attr-defined]
    n.tr.fail(C.OVPN_NEW_PEER, errno.ENOMEM)  # the first NEW_PEER of the batch fails
    now = n.clock.t
    for _ in range(40):                      # every client's datagrams in one batch
        batch = [(d, addr, None) for addr, (s, _e) in n.clients.items()
                 for d in s.datagrams_to_send(now)]
        if not batch and not n.out:
            break
        n.d.datagrams_received(batch, now)
        out, n.out = n.out, []
        for d, addr in out:
            n.clients[addr][0].receive_datagram(d, now)
        for s, events in n.clients.values():
            while (e := s.next_event()) is not None:
                events.append(e)
    assert calls(n.tr).count("NEW_PEER") == 2
    # both clients' steps left together: NEW_PEER+SET_PEER+NEW_KEY+START_VPN twice
    assert max(rounds) >= 8, rounds
    assert len(n.d.records) == 1
    [(pid, rec)] = n.d.records.items()
    assert rec.connected_since is not None
    assert any(isinstance(e, ev.KeysReady) for e in (n.c_events + events2))
