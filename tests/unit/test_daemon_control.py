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


# --------------------------------------------------------------------------- status renderers

def _status(n_clients: int) -> "DaemonStatus":
    from bsd_ovpn.daemon.control import ClientStatus, DaemonStatus

    clients = [ClientStatus(peer_id=i, common_name=f"user{i}", username=None,
                            real_address=f"192.0.2.{10 + i}:40000",
                            vpn_ipv4=f"198.51.100.{2 + i}", vpn_ipv6=None, cipher="AES-256-GCM",
                            key_id=0, connected_since=1795551234.56, last_handshake=1795551299.25,
                            bytes_in=104600123 + i, bytes_out=2211433, packets_in=71853,
                            packets_out=35210)
               for i in range(n_clients)]
    return DaemonStatus(role="server", config="/etc/openvpn/server.conf", pid=42,
                        engine="test", interface="tun0", started=1795551234.56,
                        state="running", clients=clients)


def test_prometheus_samples_keep_every_digit() -> None:
    """A byte counter must keep counting and a Unix time keep its seconds (``:g`` had 6
    significant digits: 1.04600e+08, 1.79555e+09)."""
    from bsd_ovpn.daemon.status import render_prometheus

    text = render_prometheus(_status(1))
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    labels = 'role="server",interface="tun0"'
    per = labels + ',peer_id="0",common_name="user0"'
    assert samples[f"ovpnctl_start_time_seconds{{{labels}}}"] == "1795551234.56"
    assert samples[f"ovpnctl_peer_bytes_received_total{{{per}}}"] == "104600123"
    assert samples[f"ovpnctl_peer_connected_since_seconds{{{per}}}"] == "1795551234.56"
    assert samples[f"ovpnctl_peers{{{labels}}}"] == "1"
    assert all(float(v) == float(v) for v in samples.values())       # all parse as numbers


def test_status_file_is_rewritten_in_place(tmp_path) -> None:
    from bsd_ovpn.daemon.status import StatusFileWriter, render_status_file

    path = tmp_path / "status.log"
    w = StatusFileWriter(str(path))
    try:
        w.write(_status(3), 2)
        ino = path.stat().st_ino
        assert path.read_text() == render_status_file(_status(3), 2)
        w.write(_status(1), 2)                      # shorter: no stale tail left behind
        assert path.stat().st_ino == ino
        text = path.read_text()
        assert "user2" not in text and text.endswith("END\n") and "CLIENT_LIST,user0," in text
        assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    finally:
        w.close()
    with pytest.raises(OSError):
        w.write(_status(1), 2)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_status_file_still_written_after_dropping_privileges(tmp_path) -> None:
    """``user nobody`` + ``status FILE`` in a root-owned directory (H15's walkthrough case):
    opened before the privilege drop, the file stays writable."""
    import pwd

    from bsd_ovpn.daemon.status import StatusFileWriter

    nobody = pwd.getpwnam("nobody")
    d = tmp_path / "log"
    d.mkdir(mode=0o755)
    path = d / "status.log"
    w = StatusFileWriter(str(path))
    try:
        pid = os.fork()
        if pid == 0:                                # child: become nobody, then write
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                try:                                # the directory really is closed to us
                    open(d / "other", "w").close()
                    code = 2
                except PermissionError:
                    w.write(_status(2), 2)
                    code = 0
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "CLIENT_LIST,user1," in path.read_text()
    finally:
        w.close()


def test_status_file_is_written_on_time_when_nothing_else_wakes_the_loop(tmp_path) -> None:
    """An idle daemon (no timers) still rewrites the status file every interval, not
    at the next housekeeping wake-up after it (which could be a second late)."""
    import signal

    from bsd_ovpn.config import StatusFile
    from bsd_ovpn.daemon.loop import serve

    path = tmp_path / "status"
    writes: list[float] = []
    loop = Loop()

    class Idle:
        def deadline(self):
            return None

        def wake(self, now):
            pass

        def shutdown_done(self):
            return True

        def finished(self):
            return False

        def begin_shutdown(self, now):
            loop.stop()

        def exit_status(self):
            return 0

        def status(self):
            writes.append(loop.clock())
            if len(writes) >= 5:
                loop.stop()
            return sample()

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                             signal.SIGUSR2)}
    try:
        start = loop.clock()
        assert serve(Idle(), loop, status_file=StatusFile(str(path), 0.2)) == 0
    finally:
        loop.close()
        for s, h in old.items():
            signal.signal(s, h)
    assert len(writes) == 5
    # five writes 0.2 s apart: about 0.8 s; waiting for 1-second wake-ups takes 4 s
    assert writes[-1] - start < 2.0
    assert "alice,192.0.2.2:40000" in path.read_text()
