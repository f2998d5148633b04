"""Faults around ``ovpnctl server``: crashes, a dead engine, a taken port, a vanished tun.

Why: a daemon that dies leaves if_ovpn state behind (the interface, its peers,
routes) that the next start must find and clean, or clients end up talking to
a half-configured tunnel; and errors an admin can fix (port in use, device
gone, engine dead) must say what is wrong and end the daemon with a non-zero
status instead of hanging or spinning.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bsd_ovpn.testbed.daemons import OvpnctlFactory
from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.hosts import Host
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]

SERVER_VPN = "198.51.100.1"


def links(h: Host) -> list[str]:
    return sorted(i for i in h.interfaces() if i != "lo")


def engine_ifaces(ovpnctl: OvpnctlFactory, h: Host) -> dict:
    return ovpnctl.engines.interfaces(h)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def server_cfg(pki: PKI, keys: WrapKeys, two: TwoHosts, **kw: object) -> OvpnConfig:
    kw.setdefault("keepalive", (1, 5))
    return OvpnConfig.server(pki, keys, local=two.server_ip, topology="subnet", **kw)


@pytest.mark.slow
def test_kill_9_then_restart_cleans_stale_state_and_clients_reconnect(
        two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys, ovpnctl: OvpnctlFactory,
        stock_openvpn) -> None:
    two = two_hosts
    before = links(two.server)
    cfg = server_cfg(pki, wrap_keys, two)
    srv = ovpnctl.server(two.server, cfg, name="first")
    srv.wait_ready(30)
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("crash"))
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=2, timeout=10)
    [iface] = engine_ifaces(ovpnctl, two.server)
    srv.kill()                                          # SIGKILL: no cleanup at all
    # the stale interface and its peer are still in the engine
    stale = engine_ifaces(ovpnctl, two.server)
    assert stale == {iface: [0]}, stale
    again = ovpnctl.server(two.server, cfg, name="second")
    again.wait_ready(30)
    # the restarted daemon found the leftovers: one interface, no stale peer
    ifs = engine_ifaces(ovpnctl, two.server)
    assert len(ifs) == 1 and list(ifs.values())[0] in ([], None), ifs
    assert again.count("Traceback") == 0, again.log_tail()
    # the client notices (ping-restart 5 s) and reconnects to the new daemon
    mark = cli.mark()
    cli.wait_for(r"Initialization Sequence Completed", timeout=40, since=mark)
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), again.log_tail()
    [c] = again.clients()
    assert c["common_name"] == "crash"
    ifs = engine_ifaces(ovpnctl, two.server)
    assert len(ifs) == 1 and list(ifs.values())[0] == [c["peer_id"]], ifs
    assert again.stop() == 0
    assert engine_ifaces(ovpnctl, two.server) == {}
    assert links(two.server) == before


@pytest.mark.slow
def test_engine_killed_under_a_running_server(two_hosts: TwoHosts, pki: PKI,
                                              wrap_keys: WrapKeys, ovpnctl: OvpnctlFactory,
                                              stock_openvpn) -> None:
    two = two_hosts
    before = links(two.server)
    srv = ovpnctl.server(two.server, server_cfg(pki, wrap_keys, two), name="victim")
    srv.wait_ready(30)
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("orphan"))
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=2, timeout=10)
    eng = ovpnctl.engines.engine(two.server)
    assert eng is not None
    eng.kill()
    # the server notices (its next engine call fails) and exits non-zero, saying why
    code = wait_exit(srv.proc, 20)
    assert code is not None, "server still running 20 s after its engine died:\n" + \
        srv.log_tail()
    assert code != 0, srv.log_tail()
    assert re.search(r"(?i)engine", srv.log_tail(10)), srv.log_tail()
    assert srv.count("Traceback") == 0, srv.log_tail()
    # nothing half-configured is left: the tun went with the engine; a new engine is empty
    assert links(two.server) == before
    assert engine_ifaces(ovpnctl, two.server) == {}


def test_udp_port_taken_is_a_clear_error(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                         ovpnctl: OvpnctlFactory, tmp_path: Path) -> None:
    two = two_hosts
    before = links(two.server)
    squatter = two.server.popen([sys.executable, "-c",
                                 "import socket,sys,time\n"
                                 "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                                 f"s.bind(('{two.server_ip}',1194))\n"
                                 "print('bound',flush=True)\ntime.sleep(60)\n"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        srv = ovpnctl.server(two.server, server_cfg(pki, wrap_keys, two), name="late")
        code = wait_exit(srv.proc, 20)
        assert code is not None and code != 0, srv.log_tail()
        tail = srv.log_tail(5)
        assert "1194" in tail and re.search(r"(?i)in use", tail), tail
        assert "Traceback" not in srv.log, srv.log_tail()
    finally:
        squatter.kill()
        squatter.wait(5)
    # nothing created on the way (no interface left in the engine or the host)
    assert engine_ifaces(ovpnctl, two.server) == {}
    assert links(two.server) == before


def test_tun_device_gone_is_a_clear_error(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                          ovpnctl: OvpnctlFactory, stock_openvpn) -> None:
    two = two_hosts
    before = links(two.server)
    srv = ovpnctl.server(two.server, server_cfg(pki, wrap_keys, two), name="devgone")
    srv.wait_ready(30)
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("devgone"))
    cli.wait_ready(30)
    [iface] = engine_ifaces(ovpnctl, two.server)
    tun = [i for i in links(two.server) if i not in before]
    assert tun, links(two.server)
    two.server.run(["ip", "link", "del", tun[0]])
    code = wait_exit(srv.proc, 20)
    assert code is not None, "server still running 20 s after its tun vanished:\n" + \
        srv.log_tail()
    assert code != 0
    tail = srv.log_tail(10)
    assert tun[0] in tail or iface in tail, tail
    assert re.search(r"(?i)(gone|vanished|no such device|does not exist|removed)", tail), tail
    assert srv.count("Traceback") == 0, srv.log_tail()
    assert engine_ifaces(ovpnctl, two.server) == {}
    assert links(two.server) == before


def test_second_server_on_the_same_port_is_a_clear_error(two_hosts: TwoHosts, pki: PKI,
                                                         wrap_keys: WrapKeys,
                                                         ovpnctl: OvpnctlFactory) -> None:
    """The control socket needs SO_REUSEPORT (the engine joins its port), and Linux lets a
    second SO_REUSEPORT socket of the same user bind the same address: a second daemon
    must still be refused, or the two would split every client's packets between them."""
    two = two_hosts
    first = ovpnctl.server(two.server, server_cfg(pki, wrap_keys, two), name="one")
    first.wait_ready(30)
    second = ovpnctl.server(two.server, server_cfg(pki, wrap_keys, two), name="two")
    code = wait_exit(second.proc, 20)
    assert code is not None and code != 0, \
        "a second server bound the same UDP port:\n" + second.log_tail()
    tail = second.log_tail(5)
    assert "1194" in tail and re.search(r"(?i)in use", tail), tail
    assert first.running
    assert len(engine_ifaces(ovpnctl, two.server)) == 1
