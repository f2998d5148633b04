"""The userspace engine end to end: two namespaces, an engine daemon in each.

Keys are installed by hand through the typed Interface API over
EngineTransport (no control plane), exactly as a control plane would drive
if_ovpn: NEW_PEER with the caller's own UDP socket (bound with SO_REUSEPORT
by the library's helper), NEW_KEY, START_VPN.  Wire captures use AF_PACKET
sockets on the veth and are decrypted with a decryptor written here from the
spec (if_ovpn.md §7), not with the engine's code.  Tests run against both data
planes ("python", and "fast" = the C one when it is built); each engine's log
must name the data plane it runs.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bsd_ovpn.engine.steering import make_udp_socket
from bsd_ovpn.engine.transport import EngineTransport
from bsd_ovpn.ifovpn import DelReason
from bsd_ovpn.interface import Interface, KeyMaterial, PeerDeleted
from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.hosts import Host

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
PORT = 1194
PEER_ID = 1
TUN = {"server": "198.51.100.1", "client": "198.51.100.2"}
ETH_P_ALL = 0x0003
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(host: Host, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a thread that entered ``host``'s network namespace.

    A socket keeps the namespace it was created in, so this is how the test
    process gets a UDP socket (for NEW_PEER) or a packet socket inside a host.
    """
    result: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{host.ident}", os.O_RDONLY)
        try:
            if _libc.setns(fd, 0x40000000) != 0:           # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
            result["value"] = fn()
        except BaseException as exc:                        # handed to the caller
            result["error"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclass
class Side:
    name: str
    host: Host
    proc: subprocess.Popen
    path: str
    transport: EngineTransport
    ifc: Interface
    sock: socket.socket
    tx_key: bytes
    tx_iv: bytes


def spawn_engine(host: Host, workdir: str, name: str, dataplane: str) -> tuple[subprocess.Popen, str]:
    """Start ``python3 -m bsd_ovpn.engine`` inside ``host``; wait for its socket."""
    path = os.path.join(workdir, f"{name}.sock")
    logname = os.path.join(workdir, f"{name}.log")
    with open(logname, "w") as log:
        proc = host.popen([sys.executable, "-m", "bsd_ovpn.engine", "--socket", path,
                           "--dataplane", dataplane],
                          stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"engine in {host.name} exited:\n{open(logname).read()}")
        assert time.monotonic() < deadline, "engine did not start"
        time.sleep(0.05)
    return proc, path


class Tunnel:
    def __init__(self, two: TwoHosts, workdir: str, dataplane: str) -> None:
        self.two = two
        self.dataplane = dataplane
        self.sides: dict[str, Side] = {}
        self.workdir = workdir
        self.keys = {n: (os.urandom(32), os.urandom(8)) for n in ("server", "client")}

    def start(self, *, outer6: bool = False, client_bind: str | None = None,
              server_dual_stack: bool = False, server_local: str | None = None,
              start_client: bool = True) -> None:
        two = self.two
        srv_ip, cli_ip = (two.server_ip6, two.client_ip6) if outer6 else (two.server_ip,
                                                                          two.client_ip)
        for name, host, me, other in (("server", two.server, srv_ip, cli_ip),
                                      ("client", two.client, cli_ip, srv_ip)):
            proc, path = spawn_engine(host, self.workdir, name, self.dataplane)
            tr = EngineTransport(path)
            ifc = Interface.create("ovpn", transport=tr)
            bind = client_bind if (name == "client" and client_bind) else me
            remote, local = other, None
            if name == "server" and server_dual_stack:
                bind, remote = "::", f"::ffff:{other}"
                local = (f"::ffff:{server_local}", 0) if server_local else None
            sock = in_netns(host, lambda bind=bind: make_udp_socket(
                (bind, PORT), v6only=False if bind == "::" else None))
            ifc.new_peer(PEER_ID, sock, (remote, PORT), local=local)
            self.sides[name] = Side(name, host, proc, path, tr, ifc, sock, *self.keys[name])
        for name, other in (("server", "client"), ("client", "server")):
            s = self.sides[name]
            self.install(s, slot=0, key_id=0, tx=self.keys[name], rx=self.keys[other])
            if name == "server" or start_client:
                s.ifc.start_vpn()
            s.host.run(["ip", "addr", "add", TUN[name], "peer", TUN[other], "dev", s.ifc.name])

    @staticmethod
    def install(s: Side, *, slot: int, key_id: int, tx: tuple[bytes, bytes],
                rx: tuple[bytes, bytes]) -> None:
        s.ifc.new_key(PEER_ID, slot, key_id, "AES-256-GCM", KeyMaterial(*tx), KeyMaterial(*rx))

    def close(self) -> None:
        for s in self.sides.values():
            try:
                s.ifc.close()
            finally:
                s.transport.close()
                s.sock.close()
        for s in self.sides.values():
            if s.proc.poll() is None:
                s.proc.terminate()
                s.proc.wait(timeout=10)


def _fast_available() -> bool:
    try:
        from bsd_ovpn.engine.fastpath import FastDataPlane
        FastDataPlane().close()
    except Exception:
        return False
    return True


DATAPLANES = ["python", pytest.param("fast", marks=pytest.mark.skipif(
    not _fast_available(), reason="the C data plane (bsd_ovpn._native fast path) is not built"))]


def engine_log(workdir: str, name: str) -> str:
    with open(os.path.join(workdir, f"{name}.log")) as f:
        return f.read()


@pytest.fixture(params=DATAPLANES)
def tunnel(request: pytest.FixtureRequest, two_hosts: TwoHosts) -> Iterator[Tunnel]:
    """Both engine data planes behind the same command handler."""
    workdir = tempfile.mkdtemp(prefix="h6eng-")          # AF_UNIX paths must stay short
    t = Tunnel(two_hosts, workdir, request.param)
    try:
        t.start()
        for name in t.sides:                             # the engine says what it runs
            assert (f"data plane: {request.param} (--dataplane {request.param})"
                    in engine_log(workdir, name))
        yield t
    finally:
        try:
            t.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def packet_socket(host: Host, ifname: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
        s.settimeout(0.2)
        return s
    return in_netns(host, make)


def udp_payloads(frames: list[bytes], port: int = PORT) -> list[tuple[bytes, bytes, bytes]]:
    """(frame, source ip, UDP payload) of the IPv4/UDP frames to or from ``port``."""
    out = []
    for f in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 0x0F) * 4
        sport, dport = struct.unpack("!HH", f[14 + ihl:18 + ihl])
        if port in (sport, dport):
            out.append((f, f[26:30], f[14 + ihl + 8:]))
    return out


def capture(sock: socket.socket, seconds: float) -> list[bytes]:
    frames = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frames.append(sock.recv(65535))
        except socket.timeout:
            pass
    return frames


def spec_decrypt(key: bytes, iv: bytes, payload: bytes) -> tuple[int, int, int, bytes]:
    """if_ovpn.md §7, independently: op32 seq32 tag16 ct; nonce = seq||iv; AAD = 8 bytes."""
    op, seq = struct.unpack("!II", payload[:8])
    pt = AESGCM(key).decrypt(payload[4:8] + iv, payload[24:] + payload[8:24], payload[:8])
    return op >> 27, op & 0xFFFFFF, seq, pt


def segments(key: bytes, iv: bytes, payload: bytes) -> list[bytes]:
    """The datagrams in one captured UDP payload.

    The C data plane sends with UDP GSO, and a packet socket on the veth can
    see the coalesced super-packet before it is split: equal-size segments,
    the last one possibly shorter.  The segment size is not in the capture, so
    find the one at which every piece decrypts."""
    try:
        spec_decrypt(key, iv, payload)
        return [payload]
    except InvalidTag:
        pass
    for size in range(25, len(payload) // 2 + 1):
        pieces = [payload[i:i + size] for i in range(0, len(payload), size)]
        try:
            for piece in pieces:
                spec_decrypt(key, iv, piece)
        except (InvalidTag, ValueError, struct.error):
            continue
        return pieces
    raise AssertionError(f"a captured {len(payload)}-byte UDP payload does not decrypt")


# ---------------------------------------------------------------------------

def test_ping_both_ways(tunnel: Tunnel) -> None:
    two = tunnel.two
    # (IPv6 chatter sent while the other tun was still down may be lost: count from here)
    lost = {n: s.ifc.stats().lost_data for n, s in tunnel.sides.items()}
    assert two.client.ping(TUN["server"], count=3, timeout=10)
    assert two.server.ping(TUN["client"], count=3, timeout=10)
    for n, s in tunnel.sides.items():
        stats = s.ifc.peer_stats()[PEER_ID]
        assert stats.packets_in >= 6 and stats.packets_out >= 6
        assert s.ifc.stats().lost_data == lost[n]


def test_control_packets_still_reach_the_control_socket(tunnel: Tunnel) -> None:
    """The shared port: P_CONTROL and unknown peer ids go to the caller's socket."""
    two = tunnel.two
    srv = tunnel.sides["server"]
    srv.sock.settimeout(5)
    probes = [bytes([0x38]) + os.urandom(13),                     # P_CONTROL_HARD_RESET_CLIENT_V2
              bytes([9 << 3]) + (77).to_bytes(3, "big") + bytes(30)]   # P_DATA_V2, unknown peer

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((two.client_ip, 0))
            for p in probes:
                s.sendto(p, (two.server_ip, PORT))
    in_netns(two.client, send)
    got = [srv.sock.recvfrom(2048)[0] for _ in probes]
    assert sorted(got) == sorted(probes)


@pytest.mark.iperf3
def test_short_iperf3(tunnel: Tunnel, iperf) -> None:
    two = tunnel.two
    assert two.client.ping(TUN["server"], count=1, timeout=10)
    res = iperf.run(two.server, two.client, TUN["server"], seconds=2)
    print(f"engine ({tunnel.dataplane} data plane) TCP throughput: "
          f"{res.received_bps / 1e6:.1f} Mbit/s")
    assert res.received_bytes > 0 and res.received_bps > 1e6, res


def test_replayed_packet_is_dropped(tunnel: Tunnel) -> None:
    two = tunnel.two
    cli = tunnel.sides["client"]
    assert two.server.ping(TUN["client"], count=1, timeout=10)
    ps = packet_socket(two.server, two.server_if)
    try:
        # one server -> client data packet, captured leaving the server
        pinger = two.server.popen(["ping", "-c", "3", "-i", "0.2", TUN["client"]],
                                  stdout=subprocess.DEVNULL)
        frames = capture(ps, 1.0)
        pinger.wait(timeout=10)
        key_s, iv_s = tunnel.keys["server"]
        outgoing = [(f, p) for f, src, p in udp_payloads(frames)
                    if socket.inet_ntoa(src) == two.server_ip and p[0] >> 3 == 9
                    and segments(key_s, iv_s, p) == [p]]     # not a GSO super-packet
        assert outgoing, "no data packet captured"
        frame = bytearray(outgoing[0][0])
        # captured before checksum offload filled it in: send with "no checksum" (IPv4)
        udp_at = 14 + (frame[14] & 0x0F) * 4
        frame[udp_at + 6:udp_at + 8] = b"\0\0"
        time.sleep(0.5)
        before_peer = cli.ifc.peer_stats()[PEER_ID]
        before = cli.ifc.stats()
        ps.send(bytes(frame))                            # re-inject the same packet
        time.sleep(0.5)
        after_peer = cli.ifc.peer_stats()[PEER_ID]
        after = cli.ifc.stats()
    finally:
        ps.close()
    assert after_peer.packets_in == before_peer.packets_in
    assert after_peer.bytes_in == before_peer.bytes_in
    assert after.data.in_ == before.data.in_ and after.tunnel.in_ == before.tunnel.in_
    assert after.lost_data.in_ == before.lost_data.in_ + 1


def test_wire_decrypts_with_an_independent_decryptor(tunnel: Tunnel) -> None:
    two = tunnel.two
    ps = packet_socket(two.server, two.server_if)
    try:
        pinger = two.client.popen(["ping", "-c", "3", "-i", "0.2", TUN["server"]],
                                  stdout=subprocess.DEVNULL)
        frames = capture(ps, 1.2)
        pinger.wait(timeout=10)
    finally:
        ps.close()
    key_c, iv_c = tunnel.keys["client"]
    key_s, iv_s = tunnel.keys["server"]
    seen = {"request": 0, "reply": 0}
    datagrams = []
    for _f, src, payload in udp_payloads(frames):
        if payload[0] >> 3 != 9:
            continue
        from_client = socket.inet_ntoa(src) == two.client_ip
        key, iv = (key_c, iv_c) if from_client else (key_s, iv_s)
        datagrams += [(from_client, key, iv, seg) for seg in segments(key, iv, payload)]
    for from_client, key, iv, payload in datagrams:
        opcode, peer_id, seq, pt = spec_decrypt(key, iv, payload)
        assert (opcode, peer_id) == (9, PEER_ID) and seq >= 1
        assert pt[0] >> 4 in (4, 6)                 # decrypted to an IP packet
        if pt[0] >> 4 != 4 or pt[9] != 1:
            continue                                # IPv6 chatter of the tun devices
        src_ip, dst_ip = socket.inet_ntoa(pt[12:16]), socket.inet_ntoa(pt[16:20])
        ihl = (pt[0] & 0x0F) * 4
        if from_client:
            assert (src_ip, dst_ip, pt[ihl]) == (TUN["client"], TUN["server"], 8)
            seen["request"] += 1
        else:
            assert (src_ip, dst_ip, pt[ihl]) == (TUN["server"], TUN["client"], 0)
            seen["reply"] += 1
    assert seen["request"] >= 3 and seen["reply"] >= 3


@pytest.mark.slow
def test_key_rotation_during_continuous_ping_loses_nothing(tunnel: Tunnel) -> None:
    two = tunnel.two
    srv, cli = tunnel.sides["server"], tunnel.sides["client"]
    assert two.client.ping(TUN["server"], count=1, timeout=10)
    pinger = two.client.popen(["ping", "-c", "80", "-i", "0.05", "-W", "2", TUN["server"]],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    new = {n: (os.urandom(32), os.urandom(8)) for n in ("server", "client")}
    # NEW_KEY(secondary) on both: both key ids now decrypt
    Tunnel.install(srv, slot=1, key_id=1, tx=new["server"], rx=new["client"])
    Tunnel.install(cli, slot=1, key_id=1, tx=new["client"], rx=new["server"])
    time.sleep(0.5)
    srv.ifc.swap_keys(PEER_ID)            # server sends with key id 1, client still 0
    time.sleep(0.5)
    cli.ifc.swap_keys(PEER_ID)
    time.sleep(0.5)
    srv.ifc.del_key(PEER_ID, 1)           # the old key (id 0) is gone on both sides
    cli.ifc.del_key(PEER_ID, 1)
    out, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in out, out
    assert "80 received" in out, out
    # and traffic really moved to the new key: the old one cannot decrypt anymore
    ps = packet_socket(two.server, two.server_if)
    try:
        p = two.client.popen(["ping", "-c", "2", "-i", "0.2", TUN["server"]],
                             stdout=subprocess.DEVNULL)
        frames = capture(ps, 0.8)
        p.wait(timeout=10)
    finally:
        ps.close()
    data = [pl for _f, _s, pl in udp_payloads(frames) if pl[0] >> 3 == 9]
    assert data and all(pl[0] & 7 == 1 for pl in data)


@pytest.mark.slow
def test_keepalive_pings_then_timeout_deletes_peer(tunnel: Tunnel) -> None:
    srv, cli = tunnel.sides["server"], tunnel.sides["client"]
    before = srv.ifc.stats()
    cli.ifc.set_peer(PEER_ID, 1, 3)
    time.sleep(2.5)
    after = srv.ifc.stats()
    # pings arrive every second, decrypt, and are dropped as non-IP (lost_data)
    assert after.data.in_ - before.data.in_ >= 2
    assert after.lost_data.in_ - before.lost_data.in_ >= 2
    assert list(cli.ifc.iter_notifications()) == []
    srv.ifc.del_peer(PEER_ID)             # the server goes silent
    deadline = time.monotonic() + 8
    notes: list = []
    while time.monotonic() < deadline and not notes:
        notes = list(cli.ifc.iter_notifications())
        time.sleep(0.2)
    assert len(notes) == 1, notes
    note = notes[0]
    assert isinstance(note, PeerDeleted)
    assert note.peer_id == PEER_ID and note.reason == DelReason.TIMEOUT
    assert note.packets_out and note.packets_out >= 3
    assert cli.ifc.peer_stats() == {}


def test_sigterm_destroys_interfaces_and_removes_socket(tunnel: Tunnel) -> None:
    cli = tunnel.sides["client"]
    name = cli.ifc.name
    assert name in cli.host.interfaces()
    cli.proc.terminate()
    cli.proc.wait(timeout=10)
    assert cli.proc.returncode == 0
    assert not os.path.exists(cli.path)
    assert name not in cli.host.interfaces()
    cli.ifc.detach()                      # nothing left to destroy
    with pytest.raises(Exception, match="not running"):
        EngineTransport(cli.path)


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_ipv6_outer_transport(two_hosts: TwoHosts, dataplane: str) -> None:
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    t = Tunnel(two_hosts, workdir, dataplane)
    try:
        t.start(outer6=True)
        assert two_hosts.client.ping(TUN["server"], count=3, timeout=10)
        peer = t.sides["server"].ifc.peer_stats()[PEER_ID]
        assert peer.packets_in >= 3
    finally:
        t.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_float_moves_the_peer_and_notifies(two_hosts: TwoHosts, dataplane: str) -> None:
    """A client bound to the wildcard changes its source address: FLOAT on the server."""
    two = two_hosts
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    t = Tunnel(two, workdir, dataplane)
    try:
        t.start(client_bind="0.0.0.0")
        srv = t.sides["server"]
        assert two.client.ping(TUN["server"], count=1, timeout=10)
        assert list(srv.ifc.iter_notifications()) == []
        two.client.run(["ip", "addr", "add", "192.0.2.3/24", "dev", two.client_if])
        two.client.run(["ip", "route", "replace", f"{two.server_ip}/32", "dev", two.client_if,
                        "src", "192.0.2.3"])
        assert two.client.ping(TUN["server"], count=3, timeout=10)   # replies follow the peer
        notes = list(srv.ifc.iter_notifications())
        assert len(notes) == 1, notes
        note = notes[0]
        assert note.peer_id == PEER_ID
        assert (str(note.address.address), note.address.port) == ("192.0.2.3", PORT)
    finally:
        t.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_server_routes_among_peers_and_iroutes(lab, dataplane: str) -> None:
    """One interface, one socket, two peers: exact vpn_ipv4 match, then a route's gateway."""
    srv, c1, c2 = lab.host("server"), lab.host("c1"), lab.host("c2")
    ifs = lab.segment([srv, c1, c2], ["192.0.2.1/24", "192.0.2.2/24", "192.0.2.3/24"])
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    closers: list[Callable[[], None]] = []
    try:
        keys = {n: (os.urandom(32), os.urandom(8)) for n in ("s1", "s2", "c1", "c2")}
        proc, path = spawn_engine(srv, workdir, "server", dataplane)
        tr = EngineTransport(path)
        closers.append(tr.close)
        s_ifc = Interface.create("ovpn", transport=tr, ifmode="subnet")
        closers.insert(0, s_ifc.close)
        s_sock = in_netns(srv, lambda: make_udp_socket(("192.0.2.1", PORT)))
        closers.append(s_sock.close)
        for pid, (cname, outer, vpn) in enumerate((("c1", "192.0.2.2", "198.51.100.2"),
                                                   ("c2", "192.0.2.3", "198.51.100.3")), 1):
            s_ifc.new_peer(pid, s_sock, (outer, PORT), vpn_ipv4=vpn)
            s_ifc.new_key(pid, 0, 0, "AES-256-GCM", KeyMaterial(*keys[f"s{pid}"]),
                          KeyMaterial(*keys[cname]))
        s_ifc.start_vpn()
        srv.run(["ip", "addr", "add", "198.51.100.1/25", "dev", s_ifc.name])
        for pid, host, cname, outer, vpn in ((1, c1, "c1", "192.0.2.2", "198.51.100.2"),
                                             (2, c2, "c2", "192.0.2.3", "198.51.100.3")):
            cproc, cpath = spawn_engine(host, workdir, cname, dataplane)
            ctr = EngineTransport(cpath)
            closers.append(ctr.close)
            c_ifc = Interface.create("ovpn", transport=ctr)
            closers.insert(0, c_ifc.close)
            c_sock = in_netns(host, lambda outer=outer: make_udp_socket((outer, PORT)))
            closers.append(c_sock.close)
            c_ifc.new_peer(pid, c_sock, ("192.0.2.1", PORT))
            c_ifc.new_key(pid, 0, 0, "AES-256-GCM", KeyMaterial(*keys[cname]),
                          KeyMaterial(*keys[f"s{pid}"]))
            c_ifc.start_vpn()
            host.run(["ip", "addr", "add", f"{vpn}/25", "dev", c_ifc.name])
        # exact vpn_ipv4 matches, both ways
        assert srv.ping("198.51.100.2", count=2, timeout=10)
        assert srv.ping("198.51.100.3", count=2, timeout=10)
        # client to client through the server (forwarded, routed by vpn_ipv4)
        assert c1.ping("198.51.100.3", count=2, timeout=10)
        # an iroute: a network behind c2, reached via c2's tunnel address as gateway
        c2.run(["ip", "addr", "add", "198.51.100.200/32", "dev", "lo"])
        srv.run(["ip", "route", "add", "198.51.100.192/26", "via", "198.51.100.3",
                 "dev", s_ifc.name])
        assert srv.ping("198.51.100.200", count=2, timeout=10)    # route refresh <= 1 s
        stats = s_ifc.peer_stats()
        assert stats[1].packets_out >= 4 and stats[2].packets_out >= 8
        del ifs
    finally:
        for close in closers:
            try:
                close()
            except Exception:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("dataplane", DATAPLANES)
@pytest.mark.parametrize("server_local", [None, "192.0.2.1"])
def test_dual_stack_server_socket_with_ipv4_client(two_hosts: TwoHosts, server_local,
                                                   dataplane: str) -> None:
    """A server on [::]:1194 (v6only off) and a v4-mapped remote, as OpenVPN's udp6 does;
    with ``local`` (multihome) the source address is chosen per packet."""
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    t = Tunnel(two_hosts, workdir, dataplane)
    try:
        t.start(server_dual_stack=True, server_local=server_local)
        two_hosts.server.run(["ip", "addr", "add", "192.0.2.9/24", "dev", two_hosts.server_if])
        assert two_hosts.client.ping(TUN["server"], count=3, timeout=10)
        assert two_hosts.server.ping(TUN["client"], count=3, timeout=10)
        assert list(t.sides["server"].ifc.iter_notifications()) == []     # no float
    finally:
        t.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_link_down_until_start_vpn(two_hosts: TwoHosts, dataplane: str) -> None:
    """Before START_VPN the interface carries nothing; TX is dropped and counted."""
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    t = Tunnel(two_hosts, workdir, dataplane)
    try:
        t.start(start_client=False)
        cli = t.sides["client"]
        assert not two_hosts.client.ping(TUN["server"], count=1, timeout=1)   # tun is down
        two_hosts.client.run(["ip", "link", "set", "dev", cli.ifc.name, "up"])  # up by hand
        with pytest.raises(Exception) as exc:                  # IFF_UP: SET_IFMODE is EBUSY
            cli.ifc.set_ifmode("subnet")
        assert getattr(exc.value, "errno", None) == 16
        assert not two_hosts.client.ping(TUN["server"], count=2, timeout=1.5)
        assert cli.ifc.stats().lost_data.out >= 2                # routed in, dropped
        assert cli.ifc.peer_stats()[PEER_ID].packets_out == 0
        cli.ifc.start_vpn()
        assert two_hosts.client.ping(TUN["server"], count=2, timeout=10)
    finally:
        t.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_peer_re_added_on_the_same_socket(tunnel: Tunnel) -> None:
    """A client reconnect: DEL_PEER (the socket is released), NEW_PEER + NEW_KEY again."""
    two = tunnel.two
    srv = tunnel.sides["server"]
    assert two.client.ping(TUN["server"], count=1, timeout=10)
    srv.ifc.del_peer(PEER_ID)
    assert not two.client.ping(TUN["server"], count=1, timeout=1)
    srv.ifc.new_peer(PEER_ID, srv.sock, (two.client_ip, PORT))
    Tunnel.install(srv, slot=0, key_id=0, tx=tunnel.keys["server"], rx=tunnel.keys["client"])
    srv.ifc.start_vpn()
    # the client's sequence numbers went on; the server's new key accepts them
    assert two.client.ping(TUN["server"], count=3, timeout=10)


def test_auto_dataplane_is_logged(two_hosts: TwoHosts) -> None:
    """``--dataplane auto`` names its pick in the log: the C one whenever it is built."""
    workdir = tempfile.mkdtemp(prefix="h6eng-")
    try:
        proc, _path = spawn_engine(two_hosts.server, workdir, "auto", "auto")
        try:
            want = "fast" if _fast_available() else "python"
            assert f"data plane: {want} (--dataplane auto)" in engine_log(workdir, "auto")
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
