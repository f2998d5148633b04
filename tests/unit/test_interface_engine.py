"""The typed Interface API driving the userspace engine, checked against the kernel contract.

Path under test: ``bsd_ovpn.interface.Interface`` -> ``EngineTransport`` (UNIX
socket, SCM_RIGHTS for NEW_PEER's fd) -> an in-process ``EngineDaemon`` ->
``engine.commands.Engine`` -> ``PythonDataPlane``.  No root: the engine's host
edge gives each interface an AF_UNIX datagram socketpair instead of a tun
device (one packet per read/write, like IFF_TUN|IFF_NO_PI), and the UDP
sockets are real loopback sockets, so packets really are encrypted, sent,
received and decrypted between two interfaces.
"""
from __future__ import annotations

import errno as E
import os
import select
import socket
import struct
import tempfile
import threading
import time

import pytest

from bsd_ovpn.binding import IfOvpnExists, IfOvpnNoSuchInterface, IfOvpnNotFound
from bsd_ovpn.engine.commands import Engine
from bsd_ovpn.engine.daemon import EngineDaemon
from bsd_ovpn.engines import engine_kind, open_transport
from bsd_ovpn.errors import IfOvpnError, ValidationError
from bsd_ovpn.ifovpn import DelReason, KeySlot
from bsd_ovpn.interface import Interface, KeyMaterial, PeerDeleted
from tests.unit.conftest import PairHost


@pytest.fixture
def engine():
    host = PairHost()
    d = tempfile.mkdtemp(prefix="ovi")
    path = os.path.join(d, "e.sock")
    daemon = EngineDaemon(path, engine=Engine(host))
    t = threading.Thread(target=daemon.serve_forever, daemon=True)
    t.start()
    tr = open_transport("userspace", socket_path=path)
    yield tr, host
    tr.close()
    daemon.stop()
    t.join(5)
    os.rmdir(d)


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + payload


def recv_tun(host: PairHost, name: str, timeout: float = 5.0) -> bytes | None:
    end = host.tuns[name][1]
    ready, _, _ = select.select([end], [], [], timeout)
    return end.recv(65535) if ready else None


K1, IV1 = bytes(range(32)), bytes(range(8))
K2, IV2 = bytes(range(32, 64)), bytes(range(8, 16))


def tunnel(tr):
    """ovpn0 <-> ovpn1 over loopback, peer id 1 on both, mirrored AES-256-GCM keys."""
    a = Interface.create(transport=tr)
    b = Interface.create(transport=tr)
    sa, sb = udp(), udp()
    a.new_peer(1, sa, sb.getsockname())
    b.new_peer(1, sb, sa.getsockname())
    sa.close()          # the engine holds its own reference (SCM_RIGHTS), like the kernel
    sb.close()
    a.new_key(1, KeySlot.PRIMARY, 0, "AES-256-GCM", KeyMaterial(K1, IV1), KeyMaterial(K2, IV2))
    b.new_key(1, KeySlot.PRIMARY, 0, "AES-256-GCM", KeyMaterial(K2, IV2), KeyMaterial(K1, IV1))
    a.start_vpn()
    b.start_vpn()
    return a, b


def test_create_names_and_errors(engine):
    tr, host = engine
    assert engine_kind(tr) == "userspace"
    a = Interface.create(transport=tr)
    b = Interface.create("ovpn7", transport=tr)
    assert (a.name, b.name) == ("ovpn0", "ovpn7")
    assert tr.list_interfaces() == ["ovpn0", "ovpn7"]
    with pytest.raises(IfOvpnExists, match="SIOCIFCREATE2"):
        Interface.create("ovpn7", transport=tr)
    with pytest.raises(ValidationError):
        Interface.create("tun0", transport=tr)
    with pytest.raises(IfOvpnNoSuchInterface):
        Interface.open("ovpn3", transport=tr)
    assert Interface.open("ovpn7", transport=tr).poll() == 0
    a.destroy()
    b.close()                        # created by this object: destroyed on close
    assert tr.list_interfaces() == [] and host.tuns == {}


def test_data_flows_both_ways_and_is_counted(engine):
    tr, host = engine
    a, b = tunnel(tr)
    assert {"ovpn0", "ovpn1"} <= host.up
    ping = ipv4_packet("198.51.100.1", "198.51.100.2", b"hello through the tunnel")
    host.tuns["ovpn0"][1].send(ping)
    assert recv_tun(host, "ovpn1") == ping
    pong = ipv4_packet("198.51.100.2", "198.51.100.1", b"and back")
    host.tuns["ovpn1"][1].send(pong)
    assert recv_tun(host, "ovpn0") == pong
    pa, pb = a.peer_stats()[1], b.peer_stats()[1]
    assert (pa.packets_out, pa.packets_in, pb.packets_in, pb.packets_out) == (1, 1, 1, 1)
    assert pa.bytes_out == len(ping) == pb.bytes_in
    st = a.stats()
    assert st.data.out == 1 and st.data.in_ == 1
    assert st.tunnel.out == st.tunnel.in_       # the kernel's quirk, kept by the engine
    a.destroy()
    b.destroy()


def test_wrong_keys_are_dropped(engine):
    tr, host = engine
    a, b = tunnel(tr)
    b.new_key(1, KeySlot.PRIMARY, 0, "AES-256-GCM", KeyMaterial(K2, IV2),
              KeyMaterial(bytes(32), IV1))
    host.tuns["ovpn0"][1].send(ipv4_packet("198.51.100.1", "198.51.100.2", b"x"))
    assert recv_tun(host, "ovpn1", timeout=0.5) is None
    deadline = time.monotonic() + 5
    while b.stats().lost_data.in_ == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.stats().lost_data.in_ == 1 and b.peer_stats()[1].packets_in == 0


def test_key_slots_swap_and_delete(engine):
    tr, host = engine
    a, b = tunnel(tr)
    with pytest.raises(IfOvpnError) as info:
        a.swap_keys(1)                                  # nothing in the secondary slot
    assert info.value.errno == E.ENOLINK and "secondary slot" in str(info.value)
    # install key id 1 in both secondaries, swap both: traffic continues on the new key
    a.new_key(1, KeySlot.SECONDARY, 1, "CHACHA20-POLY1305", KeyMaterial(K2, IV1),
              KeyMaterial(K1, IV2))
    b.new_key(1, KeySlot.SECONDARY, 1, "CHACHA20-POLY1305", KeyMaterial(K1, IV2),
              KeyMaterial(K2, IV1))
    a.swap_keys(1)
    b.swap_keys(1)
    pkt = ipv4_packet("198.51.100.1", "198.51.100.2", b"new key")
    host.tuns["ovpn0"][1].send(pkt)
    assert recv_tun(host, "ovpn1") == pkt
    a.del_key(1, KeySlot.SECONDARY)
    a.del_key(1, KeySlot.SECONDARY)                     # freeing an empty slot succeeds
    a.del_key(1, KeySlot.PRIMARY)
    host.tuns["ovpn0"][1].send(pkt)                     # no primary key: nothing is sent
    assert recv_tun(host, "ovpn1", timeout=0.5) is None
    with pytest.raises(IfOvpnNotFound, match="peer id 9 does not exist"):
        a.new_key(9, KeySlot.PRIMARY, 0, "none")


def test_new_peer_contract(engine):
    tr, _host = engine
    a = Interface.create(transport=tr)
    s = udp()
    a.new_peer(5, s, ("127.0.0.1", 1194), vpn_ipv4="198.51.100.5", vpn_ipv6="2001:db8:100::5")
    with pytest.raises(IfOvpnExists, match="peer id 5 already exists"):
        a.new_peer(5, s, ("127.0.0.1", 1194))
    other = udp()
    with pytest.raises(IfOvpnError) as info:                # one socket per interface
        a.new_peer(6, other, ("127.0.0.1", 1195))
    assert info.value.errno == E.EBUSY
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    b = Interface.create(transport=tr)
    with pytest.raises(ValidationError, match="needs a UDP socket"):
        b.new_peer(1, tcp, ("127.0.0.1", 1194))        # the library refuses first ...
    with pytest.raises(IfOvpnError) as info:
        b.new_peer(1, tcp.fileno(), ("127.0.0.1", 1194))   # ... and so does the engine
    assert info.value.errno == E.EPROTOTYPE and "not a datagram" in str(info.value)
    for x in (s, other, tcp):
        x.close()
    assert sorted(a.peer_stats()) == [5]
    a.destroy()
    b.destroy()


def test_notifications_del_peer_and_timeout(engine):
    tr, host = engine
    a, b = tunnel(tr)
    pkt = ipv4_packet("198.51.100.1", "198.51.100.2", b"count me")
    host.tuns["ovpn0"][1].send(pkt)
    assert recv_tun(host, "ovpn1") == pkt
    before = a.peer_stats()[1]
    a.del_peer(1)
    with pytest.raises(IfOvpnNotFound):
        a.del_peer(1)
    (n,) = a.notifications()
    assert n == PeerDeleted(1, DelReason.REQUESTED, before.packets_in, before.packets_out,
                            before.bytes_in, before.bytes_out)
    assert a.notifications() == [] and a.poll() == 0
    assert a.peer_stats() == {}
    # keepalive timeout: no data for 1 s deletes the peer, reason TIMEOUT
    b.set_peer(1, interval=0, timeout=1)
    deadline = time.monotonic() + 6
    events: list = []
    while not events and time.monotonic() < deadline:
        time.sleep(0.2)
        events = b.notifications()
    assert [(e.peer_id, e.reason) for e in events] == [(1, DelReason.TIMEOUT)]
    assert b.peer_stats() == {}


def test_destroy_deletes_peers_and_flushes(engine):
    tr, host = engine
    a, b = tunnel(tr)
    a.destroy()
    assert "ovpn0" not in host.tuns
    with pytest.raises(IfOvpnNoSuchInterface):
        Interface.open("ovpn0", transport=tr)
    assert tr.list_interfaces() == ["ovpn1"]
    b.destroy()


def test_pipelined_requests_run_in_order_and_name_the_failing_command(engine):
    tr, _host = engine
    a = Interface.create(transport=tr)
    s = udp()
    key = KeyMaterial(bytes(32), bytes(8))
    with a.pipelined():                       # one round trip for the whole new-client dance
        a.new_peer(3, s, ("127.0.0.1", 1194))
        a.set_peer(3, 10, 60)
        a.new_key(3, KeySlot.PRIMARY, 0, "AES-256-GCM", encrypt=key, decrypt=key)
        a.start_vpn()
        assert sorted(a.peer_stats()) == [3]      # a query sends what is held first
    assert sorted(a.peer_stats()) == [3]
    # NEW_PEER of an existing id fails; the requests after it still run (SET_PEER on
    # peer 4 is refused: it was never added) and the FIRST failure is raised, by name
    with pytest.raises(IfOvpnExists, match="peer id 3 already exists"):
        with a.pipelined():
            a.new_peer(3, s, ("127.0.0.1", 1194))
            a.del_peer(3)
    assert sorted(a.peer_stats()) == []      # the DEL_PEER after the failure ran
    with pytest.raises(IfOvpnNotFound):
        with a.pipelined():
            a.set_peer(9, 10, 60)
    # an error inside the block: what was held is still sent, the error is the caller's
    with pytest.raises(RuntimeError, match="boom"):
        with a.pipelined():
            a.new_peer(7, s, ("127.0.0.1", 1194))
            raise RuntimeError("boom")
    assert sorted(a.peer_stats()) == [7]
    # a block inside another joins it: nothing leaves before the outer block ends
    with a.pipelined():
        with a.pipelined():
            a.new_peer(8, s, ("127.0.0.1", 1195))
        assert a._held is not None and len(a._held) == 1      # noqa: SLF001
    assert sorted(a.peer_stats()) == [7, 8]
    s.close()
    a.destroy()


def test_pipelined_collect_reports_every_failure_with_its_client(engine):
    """A server batching several clients' steps learns each client that failed:
    every failure, named by command, with the peer it belonged to (START_VPN,
    interface-wide, belongs to the peer whose NEW_KEY it followed)."""
    from bsd_ovpn.ifovpn import Command
    from bsd_ovpn.interface import PipelineFailure

    tr, _host = engine
    a = Interface.create(transport=tr)
    s = udp()
    key = KeyMaterial(bytes(32), bytes(8))
    a.new_peer(5, s, ("127.0.0.1", 1194))
    failures: list[PipelineFailure] = []
    with a.pipelined(collect=failures):
        a.new_peer(5, s, ("127.0.0.1", 1194))        # exists: EEXIST, peer 5
        a.new_peer(6, s, ("127.0.0.1", 1196))        # fine
        a.new_key(6, KeySlot.PRIMARY, 0, "AES-256-GCM", encrypt=key, decrypt=key)
        a.start_vpn()
        a.set_peer(9, 10, 60)                        # never added: ENOENT, peer 9
        a.del_peer(11)                               # ENOENT, peer 11
    assert [(f.command, f.peer_id) for f in failures] == [
        (Command.OVPN_NEW_PEER, 5), (Command.OVPN_SET_PEER, 9), (Command.OVPN_DEL_PEER, 11)]
    assert isinstance(failures[0].error, IfOvpnExists)
    assert "peer id 5 already exists" in str(failures[0].error)
    assert isinstance(failures[1].error, IfOvpnNotFound)
    assert sorted(a.peer_stats()) == [5, 6]          # the requests after a failure ran
    # collect belongs to its block only: the next block raises again
    with pytest.raises(IfOvpnNotFound):
        with a.pipelined():
            a.set_peer(9, 10, 60)
    assert len(failures) == 3
    s.close()
    a.destroy()


def test_request_many_in_chunks_keeps_reply_order(engine):
    tr, _host = engine
    a = Interface.create(transport=tr)
    s = udp()
    a.new_peer(1, s, ("127.0.0.1", 1194))
    # 40 requests: more than one chunk in flight; every other one must fail
    from bsd_ovpn import nv
    from bsd_ovpn.ifovpn import Command
    reqs = []
    for i in range(40):
        pid = 1 if i % 2 == 0 else 100 + i
        reqs.append((Command.OVPN_SET_PEER,
                     nv.pack({"peerid": pid, "interval": 10, "timeout": 60}), None))
    errors = tr.request_many(a.name, reqs)
    assert [e is None for e in errors] == [i % 2 == 0 for i in range(40)]
    assert all(e.errno == E.ENOENT for e in errors if e is not None)
    s.close()
    a.destroy()
