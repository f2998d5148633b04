"""The C data plane between two network namespaces: real tun devices, real UDP.

Each namespace runs ``python3 -m bsd_ovpn.engine.fastpath`` (tun + UDP socket
+ one peer whose keys are installed by hand, mirrored on the other side), so
the C threads carry ping and iperf3 traffic through the kernel's stack.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.hosts import Host
from bsd_ovpn.testbed.iperf import Iperf

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
PORT = 1194


class ManualEngine:
    """One fast-path tunnel endpoint process in a host (stopped by ``stop``)."""

    def __init__(self, host: Host, args: list[str]) -> None:
        self.proc = host.popen([sys.executable, "-m", "bsd_ovpn.engine.fastpath", *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"fast path did not start in {host.name}: {line!r}\n{err}")
        self.ready = json.loads(line[6:])
        self.done: dict = {}

    def stop(self) -> dict:
        if self.proc.poll() is None or not self.done:
            out, err = self.proc.communicate(timeout=15)
            for line in out.splitlines():
                if line.startswith("DONE "):
                    self.done = json.loads(line[5:])
            assert self.proc.returncode == 0, err
        return self.done


def endpoint_args(tag: str, tun_addrs: list[str], bind: str, remote: str, cipher: str,
                  enc: tuple[bytes, bytes], dec: tuple[bytes, bytes]) -> list[str]:
    args = ["--tun", tag, "--mtu", "1400", "--bind", bind, "--remote", remote,
            "--peer-id", "7", "--key-id", "2", "--cipher", cipher,
            "--enc-key", enc[0].hex(), "--enc-iv", enc[1].hex(),
            "--dec-key", dec[0].hex(), "--dec-iv", dec[1].hex()]
    for cidr in tun_addrs:
        args += ["--tun-addr", cidr]
    return args


@pytest.fixture
def tunnel(two_hosts: TwoHosts, request: pytest.FixtureRequest) -> Iterator[tuple[TwoHosts, ManualEngine, ManualEngine]]:
    """A fast-path tunnel 198.51.100.1 / 2001:db8:100::1 (server) <-> .2 / ::2 (client)."""
    cipher, outer6 = request.param
    n = 0 if cipher == "none" else 32
    k_sc = (os.urandom(n), os.urandom(8) if n else b"")
    k_cs = (os.urandom(n), os.urandom(8) if n else b"")
    t = two_hosts
    if outer6:
        s_udp, c_udp = f"[{t.server_ip6}]:{PORT}", f"[{t.client_ip6}]:{PORT}"
    else:
        s_udp, c_udp = f"{t.server_ip}:{PORT}", f"{t.client_ip}:{PORT}"
    tag = t.lab.ifprefix
    srv = ManualEngine(t.server, endpoint_args(
        f"{tag}fs", ["198.51.100.1/24", "2001:db8:100::1/64"], s_udp, c_udp, cipher, k_sc, k_cs))
    cli = None
    try:
        cli = ManualEngine(t.client, endpoint_args(
            f"{tag}fc", ["198.51.100.2/24", "2001:db8:100::2/64"], c_udp, s_udp, cipher, k_cs,
            k_sc))
        yield t, srv, cli
    finally:
        if cli is not None:
            cli.stop()
        srv.stop()


@pytest.mark.parametrize("tunnel", [("AES-256-GCM", False), ("CHACHA20-POLY1305", True),
                                    ("none", False)], indirect=True,
                         ids=["aes256-outer4", "chacha-outer6", "none-outer4"])
def test_ping_both_families(tunnel: tuple[TwoHosts, ManualEngine, ManualEngine]) -> None:
    t, srv, cli = tunnel
    t.client.wait_ping("198.51.100.1", timeout=10)
    res = t.client.ping("198.51.100.1", count=5, interval=0.05, size=1300)
    assert res, res.output
    assert t.server.ping("2001:db8:100::2", count=3, interval=0.05, timeout=10), "IPv6 ping"
    done_c, done_s = cli.stop(), srv.stop()
    # Both sides decrypted what the other sent (the ends stop one after the other and
    # IPv6 sends unsolicited MLD/ND packets, so "<=" rather than "=="), with no
    # authentication failures or unroutable packets.
    assert 8 <= done_s["data_in"] <= done_c["data_out"]
    assert 8 <= done_c["data_in"] <= done_s["data_out"]
    assert done_s["lost_data_in"] == done_c["lost_data_in"] == 0
    assert done_s["lost_data_out"] == done_c["lost_data_out"] == 0


@pytest.mark.iperf3
@pytest.mark.slow
@pytest.mark.parametrize("tunnel", [("AES-256-GCM", False)], indirect=True, ids=["aes256"])
def test_iperf3_tcp_and_udp(tunnel: tuple[TwoHosts, ManualEngine, ManualEngine],
                            iperf: Iperf) -> None:
    t, srv, cli = tunnel
    t.client.wait_ping("198.51.100.1", timeout=10)
    tcp = iperf.run(t.server, t.client, "198.51.100.1", seconds=2)
    udp = iperf.run(t.server, t.client, "198.51.100.1", seconds=2, udp=True, bitrate="200M",
                    length=1200)
    rev = iperf.run(t.server, t.client, "198.51.100.1", seconds=2, reverse=True)
    # Loose floors (a loaded 2-core machine): the Python data plane cannot reach them.
    assert tcp.received_mbps > 50, tcp
    assert rev.received_mbps > 50, rev
    assert udp.received_mbps > 20, udp
    done_c, done_s = cli.stop(), srv.stop()
    assert done_s["lost_data_in"] == done_c["lost_data_in"] == 0
    assert done_s["data_in"] > 10000 and done_c["data_in"] > 10000


@pytest.mark.iperf3
@pytest.mark.slow
@pytest.mark.parametrize("tunnel", [("AES-128-GCM", False)], indirect=True, ids=["aes128"])
def test_outer_path_needs_fragments(tunnel: tuple[TwoHosts, ManualEngine, ManualEngine],
                                    iperf: Iperf) -> None:
    """Outer MTU 1280 < tunnel packets (tun MTU 1400): datagrams go out as IP fragments.

    UDP GSO refuses segments larger than the path MTU (EINVAL), so batches
    must fall back to one datagram per send instead of being lost.
    """
    t, srv, cli = tunnel
    for host, ifname in ((t.server, t.server_if), (t.client, t.client_if)):
        host.run(["ip", "link", "set", "dev", ifname, "mtu", "1280"])
    t.client.wait_ping("198.51.100.1", timeout=10)
    assert t.client.ping("198.51.100.1", count=3, interval=0.05, size=1350, timeout=10)
    tcp = iperf.run(t.server, t.client, "198.51.100.1", seconds=2)
    rev = iperf.run(t.server, t.client, "198.51.100.1", seconds=2, reverse=True)
    assert tcp.received_mbps > 20 and rev.received_mbps > 20, (tcp, rev)
    done_c, done_s = cli.stop(), srv.stop()
    assert done_c["lost_data_out"] == done_s["lost_data_out"] == 0
