"""The engine daemon and EngineTransport over a real UNIX socket (no root, no tun).

The daemon runs in a thread with an Engine whose host edge is a recording
fake (``engine_daemon`` in tests/unit/conftest.py), so this covers framing,
SCM_RIGHTS, errno mapping and the typed API driving the engine exactly as it
drives the kernel.
"""
from __future__ import annotations

import errno
import os
import socket
import stat

import pytest

from bsd_ovpn import nv
from bsd_ovpn.binding import IfOvpnExists, IfOvpnNotFound, IfOvpnNotSupported
from bsd_ovpn.engine.commands import Engine, inspect_socket
from bsd_ovpn.engine import daemon as daemon_mod
from bsd_ovpn.engine.daemon import EngineDaemon
from bsd_ovpn.engine.dataplane import canon_addr
from bsd_ovpn.engine.steering import make_udp_socket
from bsd_ovpn.engine.transport import EngineNotRunning, EngineTransport
from bsd_ovpn.errors import IfOvpnError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Endpoint, Float, Interface, KeyMaterial


@pytest.fixture
def daemon(engine_daemon):
    """(EngineDaemon, its FakeHost, socket path): tests/unit/conftest.py's engine_daemon."""
    return engine_daemon.daemon, engine_daemon.host, engine_daemon.path


def test_socket_is_root_only(daemon):
    _, _, path = daemon
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_not_running_is_a_clear_error(tmp_path):
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(EngineNotRunning, match=f"userspace engine not running at {path}"):
        EngineTransport(path)


def test_typed_api_drives_the_engine(daemon):
    d, host, path = daemon
    udp = make_udp_socket(("127.0.0.1", 0))
    tr = EngineTransport(path)
    try:
        with Interface.create("ovpn", transport=tr) as ifc:
            assert ifc.name == "ovpn0" and tr.list_interfaces() == ["ovpn0"]
            ifc.set_ifmode("subnet")
            ifc.new_peer(7, udp, ("192.0.2.1", 1194), vpn_ipv4="198.51.100.2")
            assert host.hooked_ident["ovpn0"] == inspect_socket(udp.fileno()).ident   # SCM_RIGHTS
            ifc.new_key(7, 0, 0, "AES-256-GCM", KeyMaterial(bytes(32), bytes(8)),
                        KeyMaterial(bytes(32), bytes(8)))
            ifc.start_vpn()
            ifc.set_peer(7, 10, 60)
            assert list(ifc.peer_stats()) == [7]
            assert ifc.stats().data.in_ == 0
            with pytest.raises(IfOvpnExists):
                ifc.new_peer(7, udp, ("192.0.2.1", 1194))
            with pytest.raises(IfOvpnError) as exc:
                ifc.swap_keys(7)
            assert exc.value.errno == errno.ENOLINK
            ifc.del_peer(7)
            with pytest.raises(IfOvpnNotFound):
                ifc.del_peer(7)
            notes = list(ifc.iter_notifications())
            assert len(notes) == 1 and notes[0].peer_id == 7
            ifc.rename("tun0")
            assert tr.list_interfaces() == ["tun0"]
        assert tr.list_interfaces() == []
    finally:
        tr.close()
        udp.close()


@pytest.mark.parametrize("source, want", [
    (("192.0.2.50", 5000), ("192.0.2.50", 5000, 0)),
    (("::ffff:192.0.2.51", 5001, 0, 0), ("192.0.2.51", 5001, 0)),   # a dual-stack socket
    (("fe80::51", 5002, 0, 3), ("fe80::51", 5002, 3)),
])
def test_float_reaches_the_typed_api_as_an_endpoint(daemon, source, want):
    """The FLOAT path of tests/netns/test_engine.py::test_float_moves_the_peer_and_notifies,
    deterministically: a data packet from a new address becomes an interface.Float whose
    ``address`` is an interface.Endpoint (fields address/port/scope_id, no ``host``), which
    the code consuming it -- that test, the server daemon, Endpoint.parse -- reads as such.
    (That test once failed with "'Endpoint' object has no attribute 'host'": it read the
    notification with a field name the Endpoint does not have.)"""
    d, host, path = daemon
    udp = make_udp_socket(("127.0.0.1", 0))
    tr = EngineTransport(path)
    try:
        with Interface.create("ovpn", transport=tr) as ifc:
            ifc.new_peer(7, udp, ("192.0.2.1", 1194))
            same = KeyMaterial(bytes(range(32)), bytes(8))         # both ways: RX takes our TX
            ifc.new_key(7, 0, 0, "AES-256-GCM", same, same)
            ifc.start_vpn()
            dp = d.engine.interfaces[ifc.name].dataplane
            wire, _dest, _local = dp.handle_tun_packet(bytes([0x45]) + bytes(19))
            assert dp.handle_datagram(wire, source) is not None
            notes = list(ifc.iter_notifications())
            assert len(notes) == 1, notes
            (note,) = notes
            assert isinstance(note, Float) and note.peer_id == 7
            ep = note.address
            assert isinstance(ep, Endpoint) and not hasattr(ep, "host")
            assert (str(ep.address), ep.port, ep.scope_id) == want
            assert Endpoint.parse(ep) == ep                       # feeds back into new_peer
            # the engine moved the peer: TX now goes to the new address
            assert canon_addr(source) == dp.handle_tun_packet(bytes([0x45]) + bytes(19))[1]
            assert list(ifc.iter_notifications()) == []          # one FLOAT, not one per packet
    finally:
        tr.close()
        udp.close()


def test_raw_requests_and_errnos(daemon):
    d, host, path = daemon
    with EngineTransport(path) as tr:
        name = tr.create_interface("ovpn")
        with pytest.raises(IfOvpnError) as exc:
            tr.request(name, Command.OVPN_DEL_PEER, b"\0" * 4097)
        assert exc.value.errno == errno.E2BIG
        with pytest.raises(IfOvpnError) as exc:
            tr.request(name, Command.OVPN_DEL_PEER, b"\0" * 70000)     # beyond the frame
        assert exc.value.errno == errno.E2BIG
        with pytest.raises(IfOvpnNotSupported):
            tr.request(name, Command.OVPN_SEND_PKT, None)
        with pytest.raises(IfOvpnError) as exc:
            tr.query("ovpn9", Command.OVPN_POLL_PKT, 128)
        assert exc.value.errno == errno.ENXIO
        with pytest.raises(IfOvpnError) as exc:
            tr.query(name, Command.OVPN_GET_PKT, 4096)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(IfOvpnError) as exc:
            tr.query(name, Command.OVPN_GET_STATS, 8)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(IfOvpnExists):
            tr.create_interface(name)
        # a TCP socket through SCM_RIGHTS: EPROTOTYPE, like the kernel's ATF test
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        try:
            req = nv.pack({"remote": {"af": 2, "address": b"\xc0\0\2\1", "port": 43524},
                           "fd": tcp.fileno(), "peerid": 1})
            with pytest.raises(IfOvpnError) as exc:        # the typed API refuses earlier
                tr.request(name, Command.OVPN_NEW_PEER, req, fd=tcp.fileno())
            assert exc.value.errno == errno.EPROTOTYPE
        finally:
            tcp.close()
        tr.destroy_interface(name)
        with pytest.raises(IfOvpnError) as exc:
            tr.destroy_interface(name)
        assert exc.value.errno == errno.ENXIO


def test_socket_file_appears_only_when_listening(tmp_path, fake_host, monkeypatch):
    """Whoever waits for the file and connects at once must not get ECONNREFUSED
    (seen as a flaky EngineNotRunning in the netns tests' engine start-up)."""
    path = str(tmp_path / "e.sock")
    real_rename = os.rename
    seen = []

    def rename(src, dst):
        assert dst == path and not os.path.exists(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(src)                 # already listening under the staging name
        finally:
            probe.close()
        seen.append(os.path.basename(src))
        real_rename(src, dst)

    monkeypatch.setattr(daemon_mod.os, "rename", rename)
    d = EngineDaemon(path, engine=Engine(fake_host))
    try:
        assert len(seen) == 1 and seen[0].startswith(".engine-")
        assert sorted(os.listdir(tmp_path)) == ["e.sock"]          # no staging file left
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        d.shutdown()
    assert not os.path.exists(path)


def test_second_daemon_on_the_same_socket_is_refused(daemon, fake_host):
    _, _, path = daemon
    with pytest.raises(RuntimeError, match="already running"):
        EngineDaemon(path, engine=Engine(fake_host))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to root:<group> needs root")
def test_group_socket_is_0660(tmp_path, fake_host):
    path = str(tmp_path / "g.sock")
    d = EngineDaemon(path, group="root", engine=Engine(fake_host))
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
    finally:
        d.shutdown()
    assert not os.path.exists(path)


def test_large_peer_stats_reply(daemon):
    """GET_PEER_STATS grows its buffer on ENOSPC; a reply far above 4096 bytes arrives whole."""
    _, _, path = daemon
    udp = make_udp_socket(("127.0.0.1", 0))
    try:
        with EngineTransport(path) as tr, Interface.create("ovpn", transport=tr) as ifc:
            for peer_id in range(300):
                ifc.new_peer(peer_id, udp, ("192.0.2.1", 1194))
            stats = ifc.peer_stats()
            assert sorted(stats) == list(range(300))
            assert len(tr.query(ifc.name, Command.OVPN_GET_PEER_STATS, 1 << 20)) > 30000
    finally:
        udp.close()


def test_pipelined_requests_are_answered_in_order(daemon):
    """A client may send many requests before reading: one wake-up serves up to
    MAX_PER_WAKEUP of them, and every reply comes back in request order."""
    d, host, path = daemon
    with EngineTransport(path) as tr:
        name = tr.create_interface("ovpn")
    n = 3 * daemon_mod.MAX_PER_WAKEUP + 5
    cmds = [Command.OVPN_POLL_PKT if i % 3 else Command.OVPN_GET_PKT for i in range(n)]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        conn.settimeout(5)
        for cmd in cmds:
            conn.send(daemon_mod.REQ.pack(daemon_mod.MAGIC, daemon_mod.OP_GET, name.encode(),
                                          b"", int(cmd), 4096))
        conn.send(daemon_mod.REQ.pack(daemon_mod.MAGIC, daemon_mod.OP_SET, name.encode(),
                                      b"", int(Command.OVPN_DEL_PEER), 0) + b"\0" * 70000)
        for cmd in cmds:
            magic, err = daemon_mod.REP.unpack_from(reply := conn.recv(4096))
            if cmd == Command.OVPN_GET_PKT:
                assert err == errno.ENOENT
            else:
                assert err == 0 and nv.unpack(reply[daemon_mod.REP.size:]) == {"pending": 0}
        assert daemon_mod.REP.unpack(conn.recv(4096)) == (daemon_mod.MAGIC, errno.E2BIG)
    finally:
        conn.close()
    with EngineTransport(path) as tr:
        tr.destroy_interface(name)
