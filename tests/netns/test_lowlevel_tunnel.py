"""A static-key tunnel built only with the low-level ovpnctl commands (the `wg set` case).

Two network namespaces on 192.0.2.0/24 (+ 2001:db8:2::/64), an ``ovpnctl
engine run`` in each (own socket path), then per side: ``interface create
--address``, ``peer add``, ``key new`` with mirrored random keys (A's encrypt
= B's decrypt), ``start``/``interface up``.  Pings must cross the tunnel
both ways, ``stats --json`` must count them, ``peer del`` must stop them and
``events --json`` must report the deletion.  Every command is a separate
ovpnctl process, exactly as an admin would type them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-c", "from bsd_ovpn.cli import main; main()"]

pytestmark = pytest.mark.netns


class Side:
    """One namespace with its engine; ``ctl(...)`` runs ovpnctl there against that engine."""

    def __init__(self, host, workdir: Path, name: str) -> None:
        self.host = host
        self.name = name
        self.sock = str(workdir / f"{name}.sock")
        self.log = workdir / f"{name}-engine.log"
        self.env = ["env", f"PYTHONPATH={ROOT}", "BSD_OVPN_ENGINE=userspace",
                    f"BSD_OVPN_ENGINE_SOCKET={self.sock}"]
        self.proc: subprocess.Popen | None = None

    def start_engine(self) -> None:
        with open(self.log, "w") as log:
            self.proc = self.host.popen(
                ["env", f"PYTHONPATH={ROOT}", *PY, "engine", "run", "--socket", self.sock],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"engine {self.name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop_engine(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = self.host.run([*self.env, *PY, *args], check=False, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"[{self.name}] ovpnctl {' '.join(args)} -> "
                                 f"{res.returncode}\n{res.stdout}{res.stderr}")
        return res


@pytest.fixture
def sides(two_hosts):
    workdir = Path(tempfile.mkdtemp(prefix=f"ovl{os.getpid()}"))
    a = Side(two_hosts.server, workdir, "a")
    b = Side(two_hosts.client, workdir, "b")
    try:
        a.start_engine()
        b.start_engine()
        yield a, b
    finally:
        codes = (a.stop_engine(), b.stop_engine())
        left = [p.name for p in workdir.glob("*.sock")]
        logs = {s.name: s.log.read_text() if s.log.exists() else "" for s in (a, b)}
        shutil.rmtree(workdir, ignore_errors=True)
        assert codes == (0, 0), logs
        assert left == [], f"engine sockets not removed: {left}"


def keys(workdir: Path) -> tuple[list[str], list[str]]:
    """Mirrored AES-256-GCM key options; one of B's keys comes from a file (raw bytes)."""
    k1, k2 = os.urandom(32), os.urandom(32)
    iv1, iv2 = os.urandom(8), os.urandom(8)
    kfile = workdir / "k1.bin"
    kfile.write_bytes(k1)
    a = ["--cipher", "AES-256-GCM", "--encrypt-key", k1.hex(), "--encrypt-iv", iv1.hex(),
         "--decrypt-key", k2.hex(), "--decrypt-iv", iv2.hex()]
    b = ["--cipher", "aes-256-gcm", "--encrypt-key", k2.hex(), "--encrypt-iv", iv2.hex(),
         "--decrypt-key", f"@{kfile}", "--decrypt-iv", iv1.hex()]
    return a, b


def build(a: Side, b: Side, a_peer: list[str], b_peer: list[str]) -> None:
    out = a.ctl("interface", "create", "--address", "198.51.100.1/24",
                "--address", "2001:db8:100::1/64").stdout
    assert out == "ovpn0\n"
    assert b.ctl("interface", "create", "ovpn0", "--address", "198.51.100.2/24",
                 "--address", "2001:db8:100::2/64", "--mtu", "1400").stdout == "ovpn0\n"
    a.ctl("peer", "add", "ovpn0", "1", *a_peer, "--vpn-ip", "198.51.100.2",
          "--vpn-ip", "2001:db8:100::2")
    b.ctl("peer", "add", "ovpn0", "1", *b_peer)
    ka, kb = keys(Path(a.sock).parent)
    a.ctl("key", "new", "ovpn0", "1", *ka)
    b.ctl("key", "new", "ovpn0", "1", "--slot", "primary", "--key-id", "0", *kb)
    a.ctl("start", "ovpn0")
    b.ctl("interface", "up", "ovpn0")


@pytest.mark.slow
def test_static_tunnel_with_lowlevel_commands(sides):
    a, b = sides
    build(a, b, ["--remote", "192.0.2.2:1194", "--local", "192.0.2.1:1194"],
          ["--remote", "192.0.2.1:1194"])
    assert "1400" in b.host.ip("link", "show", "ovpn0").stdout
    assert "198.51.100.1/24" in a.host.ip("addr", "show", "ovpn0").stdout

    assert a.host.ping("198.51.100.2", count=3, timeout=15), "A -> B over the tunnel"
    assert b.host.ping("198.51.100.1", count=3, timeout=15), "B -> A over the tunnel"
    assert a.host.ping("2001:db8:100::2", count=2, timeout=15), "IPv6 A -> B"
    assert b.host.ping("2001:db8:100::1", count=2, timeout=15), "IPv6 B -> A"

    doc = json.loads(a.ctl("stats", "ovpn0", "--json").stdout)
    assert doc["interface"] == "ovpn0" and doc["engine"] == "userspace"
    (peer,) = doc["peers"]
    assert peer["peer_id"] == 1
    assert peer["packets_in"] >= 10 and peer["packets_out"] >= 10
    assert peer["bytes_in"] > 0 and peer["bytes_out"] > 0
    assert doc["stats"]["data"]["in"] >= 10 and doc["stats"]["data"]["out"] >= 10
    listed = json.loads(b.ctl("peer", "list", "ovpn0", "--json").stdout)
    assert [p["peer_id"] for p in listed["peers"]] == [1]
    assert json.loads(a.ctl("interface", "list", "--json").stdout)["interfaces"] == \
        [{"name": "ovpn0", "peer_ids": [1]}]

    # a second interface cannot take the port the first one's socket holds
    assert a.ctl("interface", "create").stdout == "ovpn1\n"
    res = a.ctl("peer", "add", "ovpn1", "2", "--remote", "192.0.2.2:1194",
                "--local", "192.0.2.1:1194", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "192.0.2.1:1194 is in use" in res.stderr
    a.ctl("interface", "destroy", "ovpn1")

    # peer del stops the traffic, both ways, and is reported
    a.ctl("peer", "del", "ovpn0", "1")
    assert not a.host.ping("198.51.100.2", count=1, timeout=2)
    assert not b.host.ping("198.51.100.1", count=1, timeout=2)
    events = [json.loads(x) for x in a.ctl("events", "ovpn0", "--json").stdout.splitlines()]
    assert len(events) == 1
    ev = events[0]
    assert (ev["notification"], ev["del_reason"], ev["peer_id"]) == ("del_peer", "requested", 1)
    assert ev["packets_out"] >= peer["packets_out"]
    res = a.ctl("peer", "del", "ovpn0", "1", check=False)
    assert res.returncode == 1 and "peer id 1 does not exist" in res.stderr

    for s in (a, b):
        s.ctl("interface", "destroy", "ovpn0")
        assert json.loads(s.ctl("interface", "list", "--json").stdout)["interfaces"] == []
        assert "ovpn0" not in s.host.interfaces()


@pytest.mark.parametrize("a_peer, b_peer", [
    (["--remote", "[2001:db8:2::2]:1194", "--local", "[2001:db8:2::1]:1194"],
     ["--remote", "[2001:db8:2::1]:1194"]),
    (["--remote", "192.0.2.2:1194", "--local", "[::]:1194"],          # dual-stack, v4-mapped
     ["--remote", "192.0.2.1:1194", "--local", "192.0.2.2:1194"]),
], ids=["ipv6-outer", "dual-stack"])
def test_static_tunnel_other_transports(sides, a_peer, b_peer):
    a, b = sides
    build(a, b, a_peer, b_peer)
    assert a.host.ping("198.51.100.2", count=2, timeout=15)
    assert b.host.ping("2001:db8:100::1", count=2, timeout=15)
    doc = json.loads(b.ctl("stats", "ovpn0", "--json").stdout)
    assert doc["peers"][0]["packets_in"] >= 4


def test_engine_errors_are_one_line(sides):
    a, _b = sides
    res = a.ctl("peer", "add", "ovpn9", "1", "--remote", "192.0.2.2:1194", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "ovpn9" in res.stderr
    res = a.host.run(["env", f"PYTHONPATH={ROOT}", *PY, "stats", "ovpn0", "--engine",
                      "userspace", "--engine-socket", a.sock + ".missing"], check=False)
    assert res.returncode == 1
    assert res.stderr == (f"ovpnctl: error: userspace engine not running at {a.sock}.missing; "
                          f"start it with `ovpnctl engine run --socket {a.sock}.missing`\n")
    res = a.host.run(["env", f"PYTHONPATH={ROOT}", *PY, "engine", "run", "--socket", a.sock],
                     check=False, timeout=30)
    assert res.returncode == 1 and "already running" in res.stderr
