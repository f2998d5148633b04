"""The control socket: permissions, one JSON request per connection, errors, JSON shape."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from bsd_ovpn.daemon.control import (
    ClientStatus, ControlError, ControlServer, DaemonStatus, default_socket_path, request,
)
from bsd_ovpn.daemon.loop import Loop
from bsd_ovpn.daemon.status import render_json


def sample() -> DaemonStatus:
    return DaemonStatus(role="server", config="/etc/openvpn/server.conf", pid=42,
                        engine="kernel", interface="tun0", started=1.7e9, state="running",
                        clients=[ClientStatus(3, "alice", None, "192.0.2.2:40000",
                                              "198.51.100.2", None, "AES-256-GCM", 1,
                                              1.7e9 + 5, 1.7e9 + 65, 10, 20, 1, 2)],
                        local="192.0.2.1:1194", max_clients=1024)


class Running:
    def __init__(self, path: str, handler) -> None:
        self.loop = Loop()
        self.srv = ControlServer(path, handler)
        self.srv.register(self.loop)
        self.t = threading.Thread(target=self.loop.run, args=(lambda: None, lambda now: None))
        self.t.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)
        self.srv.close()
        self.loop.close()


@pytest.fixture
def running(tmp_path):
    made = []

    def start(handler):
        r = Running(str(tmp_path / "run" / "d.ctl"), handler)
        made.append(r)
        return r
    yield start
    for r in made:
        r.close()


def test_roundtrip_and_permissions(running, tmp_path) -> None:
    seen = []

    def handler(req):
        seen.append(req)
        return {"ok": True, "status": sample().as_dict()}

    r = running(handler)
    mode = os.stat(r.srv.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(r.srv.path)).st_mode) == 0o700
    answer = request(r.srv.path, {"cmd": "status"})
    assert seen == [{"cmd": "status"}]
    st = DaemonStatus.from_dict(answer["status"])
    assert st == sample()
    # the JSON shape documented in docs/json.md
    d = json.loads(render_json(st))
    assert sorted(d) == ["clients", "config", "engine", "interface", "local", "max_clients",
                         "pid", "remote", "role", "schema", "started", "state"]
    assert sorted(d["clients"][0]) == [
        "bytes_in", "bytes_out", "cipher", "common_name", "connected_since", "iroutes",
        "key_id", "last_handshake", "packets_in", "packets_out", "peer_id", "real_address",
        "username", "vpn_ipv4", "vpn_ipv6"]
    assert d["schema"] == 1


def test_errors_are_answers_not_crashes(running) -> None:
    def handler(req):
        if req.get("cmd") == "boom":
            raise RuntimeError("bug")
        from bsd_ovpn.daemon.loop import DaemonError
        raise DaemonError("no client with common name or peer id 'x'")

    r = running(handler)
    with pytest.raises(ControlError, match="no client"):
        request(r.srv.path, {"cmd": "kill", "target": "x"})
    with pytest.raises(ControlError, match="internal error: bug"):
        request(r.srv.path, {"cmd": "boom"})
    # garbage and oversized requests get an error line, and the server lives on
    for payload in (b"not json\n", b"[1,2]\n", b"x" * 5000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(r.srv.path)
        s.sendall(payload)
        ans = json.loads(s.makefile().readline())
        s.close()
        assert ans["ok"] is False
    with pytest.raises(ControlError, match="no client"):
        request(r.srv.path, {"cmd": "kill", "target": "x"})


def test_second_daemon_on_same_socket_is_refused(running) -> None:
    r = running(lambda req: {"ok": True})
    with pytest.raises(ControlError, match="in use"):
        ControlServer(r.srv.path, lambda req: {"ok": True})


def test_stale_socket_file_is_replaced(tmp_path) -> None:
    path = str(tmp_path / "stale.ctl")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                  # a dead daemon's leftover
    srv = ControlServer(path, lambda req: {"ok": True})
    srv.close()
    assert not os.path.exists(path)


def test_missing_socket_message(tmp_path) -> None:
    with pytest.raises(ControlError, match="no control socket"):
        request(str(tmp_path / "nope.ctl"), {"cmd": "status"})


def test_default_socket_path() -> None:
    assert default_socket_path("/etc/openvpn/server.conf") == "/var/run/bsd_ovpn/server.ctl"
