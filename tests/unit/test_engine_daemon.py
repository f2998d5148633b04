"""The engine daemon and EngineTransport over a real UNIX socket (no root, no tun).

The daemon runs in a thread with an Engine whose host edge is a recording
fake, so this covers framing, SCM_RIGHTS, errno mapping and the typed API
driving the engine exactly as it drives the kernel.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest

from bsd_ovpn import nv
from bsd_ovpn.binding import IfOvpnExists, IfOvpnNotFound, IfOvpnNotSupported
from bsd_ovpn.engine.commands import Engine, inspect_socket
from bsd_ovpn.engine.daemon import EngineDaemon
from bsd_ovpn.engine.dataplane import PythonDataPlane
from bsd_ovpn.engine.steering import make_udp_socket
from bsd_ovpn.engine.transport import EngineNotRunning, EngineTransport
from bsd_ovpn.errors import IfOvpnError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Interface, KeyMaterial


class Host:
    def __init__(self):
        self.links, self.up, self.hooked = set(), set(), {}

    def inspect_socket(self, fd):
        return inspect_socket(fd)

    def select_source(self, remote):
        raise OSError(errno.EHOSTUNREACH, "none")

    def create_link(self, name):
        self.links.add(name)
        return name

    def destroy_link(self, name):
        self.links.discard(name)

    def rename_link(self, a, b):
        self.links.discard(a)
        self.links.add(b)

    def set_link_up(self, name):
        self.up.add(name)

    def link_is_up(self, name):
        return name in self.up

    def link_exists(self, name):
        return name in self.links

    def make_dataplane(self, name):
        return PythonDataPlane()

    def hook_socket(self, name, fd, dp):
        # the daemon closes received descriptors after the request: prove we got
        # the caller's socket by looking at it now
        self.hooked[name] = inspect_socket(fd).ident

    def unhook_socket(self, name, dp):
        self.hooked.pop(name, None)

    def set_steering(self, name, ids):
        pass

    def gateway_routes(self, name):
        return []


@pytest.fixture
def daemon(tmp_path):
    host = Host()
    path = str(tmp_path / "engine.sock")
    d = EngineDaemon(path, engine=Engine(host))
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    yield d, host, path
    d.stop()
    t.join(timeout=5)
    assert not t.is_alive()
    assert not os.path.exists(path)            # socket file removed on shutdown


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
            ifc.new_peer(7, udp, ("192.0.2.1", 1194), vpn_ipv4="10.8.0.2")
            assert host.hooked["ovpn0"] == inspect_socket(udp.fileno()).ident   # SCM_RIGHTS
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


def test_second_daemon_on_the_same_socket_is_refused(daemon):
    _, _, path = daemon
    with pytest.raises(RuntimeError, match="already running"):
        EngineDaemon(path, engine=Engine(Host()))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to root:<group> needs root")
def test_group_socket_is_0660(tmp_path):
    path = str(tmp_path / "g.sock")
    d = EngineDaemon(path, group="root", engine=Engine(Host()))
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
