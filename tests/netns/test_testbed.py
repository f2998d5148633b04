"""The test bed itself, end to end: namespaces, veth, a stock OpenVPN tunnel, cleanup.

Every other netns test builds on these pieces, so this proves them first:
two hosts, stock openvpn 2.6 server and client (tls-crypt, AES-256-GCM,
DCO off) reach "Initialization Sequence Completed", ping each other's tunnel
address both ways over IPv4 and IPv6, and afterwards nothing of ours is left
(no namespace, no openvpn process).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from bsd_ovpn.testbed.hosts import Lab, cleanup_stale, stale_idents
from bsd_ovpn.testbed.netns import NetnsBackend
from bsd_ovpn.testbed.stockovpn import OvpnConfig, StockOpenVPN, WrapKeys

pytestmark = pytest.mark.netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _openvpn_pids_with(config_dir: str) -> list[int]:
    """openvpn processes whose command line mentions our config directory."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"openvpn") and any(config_dir.encode() in a for a in cmd):
            pids.append(int(entry))
    return pids


def test_link_ipv4_ipv6_and_cleanup() -> None:
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        if_a, if_b = lab.link(a, b, ["192.0.2.1/24", "2001:db8:2::1/64"],
                              ["192.0.2.2/24", "2001:db8:2::2/64"])
        assert len(if_a) <= 15 and len(if_b) <= 15
        assert if_a in a.interfaces() and "lo" in a.interfaces()
        assert "192.0.2.2/24" in b.addresses(if_b)
        assert b.ping("192.0.2.1", count=2, timeout=5)
        assert a.ping("2001:db8:2::2", count=2, timeout=5)
        res = a.ping("192.0.2.99", count=1, timeout=1)
        assert not res and res.received == 0
        sleeper = a.popen(["sleep", "300"])
        mine = {h.ident for h in lab.hosts.values()}
        assert mine <= _namespaces()
    assert not (mine & _namespaces())
    assert sleeper.poll() is not None


def test_segment_three_hosts() -> None:
    with Lab() as lab:
        hosts = [lab.host(n) for n in ("s", "c1", "c2")]
        names = lab.segment(hosts, ["192.0.2.1/24", "192.0.2.11/24", "192.0.2.12/24"])
        assert len(names) == 3
        assert hosts[1].ping("192.0.2.12", timeout=5)
        assert hosts[2].ping("192.0.2.1", timeout=5)
        mine = {h.ident for h in lab.hosts.values()}
    assert not (mine & _namespaces())


def test_routed_chain_with_mtu() -> None:
    """a - r - b on two links: add_route (v4 via, v6 dev) and forwarding in r."""
    with Lab() as lab:
        a, r, b = lab.host("a"), lab.host("r"), lab.host("b")
        if_a, _ = lab.link(a, r, ["192.0.2.1/30", "2001:db8:3::1/64"],
                           ["192.0.2.2/30", "2001:db8:3::2/64"], mtu=1400)
        _, if_b = lab.link(r, b, ["192.0.2.5/30", "2001:db8:4::1/64"],
                           ["192.0.2.6/30", "2001:db8:4::2/64"])
        a.add_route("default", via="192.0.2.2")
        a.add_route("2001:db8:4::/64", via="2001:db8:3::2")
        b.add_route("192.0.2.0/30", via="192.0.2.5")
        b.add_route("default", via="2001:db8:4::1")
        assert a.ping("192.0.2.6", timeout=5)
        assert b.ping("2001:db8:3::1", timeout=5)
        assert "mtu 1400" in a.ip("link", "show", "dev", if_a).stdout
        with pytest.raises(Exception, match="Nexthop|unreachable|Network"):
            b.add_route("198.51.100.0/24", via="192.0.2.200")


def test_cleanup_stale_removes_only_dead_runs() -> None:
    be = NetnsBackend()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ident = f"bovpn-{dead.pid}-zzzz-stale"
    subprocess.run(["ip", "netns", "add", ident], check=True)
    try:
        with Lab() as live:
            live.host("alive")
            assert ident in stale_idents(be.list_idents())
            removed = cleanup_stale()
            assert ident in removed
            assert live.hosts["alive"].ident in _namespaces()
    finally:
        if ident in _namespaces():
            subprocess.run(["ip", "netns", "del", ident], check=False)
    assert ident not in _namespaces()


@pytest.mark.openvpn
def test_stock_openvpn_tunnel_both_ways(tmp_path) -> None:
    from bsd_ovpn.testbed.pki import PKI
    pki = PKI(tmp_path / "pki")
    keys = WrapKeys(tmp_path / "keys")
    workdir = tmp_path / "run"
    with Lab() as lab:
        s, c = lab.host("server"), lab.host("client")
        lab.link(s, c, "192.0.2.1/24", "192.0.2.2/24")
        srv_cfg = OvpnConfig.server(pki, keys, wrap="tls-crypt", subnet6="2001:db8:100::/64",
                                    data_ciphers="AES-256-GCM", local="192.0.2.1")
        cli_cfg = OvpnConfig.client(pki, keys, remote="192.0.2.1", wrap="tls-crypt",
                                    data_ciphers="AES-256-GCM")
        text = cli_cfg.render()
        assert "disable-dco" in text and "tls-crypt " in text
        srv = StockOpenVPN(s, srv_cfg, workdir, "server").start()
        cli = StockOpenVPN(c, cli_cfg, workdir, "client").start()
        try:
            srv.wait_ready(timeout=20)
            cli.wait_ready(timeout=30)
            srv.wait_for(r"Data Channel: cipher 'AES-256-GCM'", timeout=10)
            assert c.ping("198.51.100.1", count=3, timeout=10), cli.log_tail()
            assert s.ping("198.51.100.2", count=3, timeout=10), srv.log_tail()
            assert c.ping("2001:db8:100::1", count=3, timeout=10), cli.log_tail()
            assert s.ping("2001:db8:100::1000", count=3, timeout=10), srv.log_tail()
            assert cli.opened_dev == cli_cfg.dev
            assert "198.51.100.2/24" in c.addresses(cli_cfg.dev)
            assert _openvpn_pids_with(str(workdir))
        finally:
            cli.stop()
            srv.stop()
        assert "process exiting" in cli.log
        mine = {h.ident for h in lab.hosts.values()}
    assert not (mine & _namespaces())
    assert _openvpn_pids_with(str(workdir)) == []


@pytest.mark.openvpn
@pytest.mark.parametrize("wrap", ["none", "tls-auth", "tls-crypt-v2"])
def test_fixtures_stock_peers_with_each_wrapping(two_hosts, stock_openvpn, wrap) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap=wrap, local=two_hosts.server_ip)
    cli = stock_openvpn.client(two_hosts.client, remote=two_hosts.server_ip, wrap=wrap)
    cli.wait_ready(timeout=30)
    assert two_hosts.client.ping("198.51.100.1", count=2, timeout=10), cli.log_tail()
    assert srv.running and cli.running


@pytest.mark.openvpn
def test_fixture_teardown_kills_everything(lab, stock_openvpn) -> None:
    """A lab closed while openvpn still runs leaves no process and no namespace."""
    s, c = lab.host("server"), lab.host("client")
    lab.link(s, c, "192.0.2.1/24", "192.0.2.2/24")
    srv = stock_openvpn.server(s)
    srv.wait_ready(timeout=20)
    pid = srv.proc.pid
    mine = {h.ident for h in lab.hosts.values()}
    lab.close()
    assert srv.proc.poll() is not None
    assert not os.path.exists(f"/proc/{pid}/cmdline") or not open(
        f"/proc/{pid}/cmdline", "rb").read()
    assert not (mine & _namespaces())


@pytest.mark.openvpn
def test_wrong_ca_client_is_rejected(two_hosts, stock_openvpn, pki) -> None:
    srv = stock_openvpn.server(two_hosts.server, local=two_hosts.server_ip)
    evil = pki.unrelated_ca().client("mallory")
    cli = stock_openvpn.client(two_hosts.client, remote=two_hosts.server_ip, cert=evil,
                               name="mallory")
    srv.wait_for(r"VERIFY ERROR: depth=0", timeout=30)
    srv.wait_for(r"TLS Error: TLS handshake failed|TLS_ERROR", timeout=30)
    assert "Initialization Sequence Completed" not in cli.log


@pytest.mark.iperf3
@pytest.mark.openvpn
def test_iperf_through_stock_tunnel(two_hosts, stock_openvpn, iperf) -> None:
    stock_openvpn.server(two_hosts.server, local=two_hosts.server_ip)
    cli = stock_openvpn.client(two_hosts.client, remote=two_hosts.server_ip)
    cli.wait_ready(timeout=30)
    assert two_hosts.client.ping("198.51.100.1", timeout=10)
    res = iperf.run(two_hosts.server, two_hosts.client, "198.51.100.1", seconds=1)
    assert res.protocol == "TCP" and res.received_bps > 1e6, res
    udp = iperf.run(two_hosts.server, two_hosts.client, "198.51.100.1", seconds=1, udp=True,
                    bitrate="10M")
    assert udp.protocol == "UDP" and udp.received_bps > 1e6 and udp.lost_percent is not None
