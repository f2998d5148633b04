"""Several clients on one server: FreeBSD's multi_client, ra ("remote access") and
route_to scenarios.

Topology (one lab for the module)::

    one 192.0.2.2 ─┐                       ┌─ lan 192.0.2.130 (default via .129)
    two 192.0.2.3 ─┼─ segment ─ srv 192.0.2.1 ─┘ 192.0.2.129/26
                   │
    one ── void (a dead-end cable, 192.0.2.225/27: route_to "breaks" a route into it)

Tunnel 198.51.100.0/25 (server .1); "two" has 198.51.100.193/26 behind it (on its
loopback), announced with a client-config-dir ``iroute``; the server pushes routes
to its LAN and to two's network.

* multi_client: both clients reach the server and each other (client-to-client;
  with if_ovpn the server's IP stack forwards), one reaches the network behind two
  (the server picks the peer by the route's next hop: iroute).
* ra: the LAN host behind the server reaches every client and nothing else;
  clients reach the LAN (pushed route).
* route_to: on a client, a route to a tunnel address is broken on purpose and
  a source-policy route (FreeBSD: pf route-to; Linux: ip rule) sends the traffic
  through the tunnel interface again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from bsd_ovpn.testbed.hosts import Host, Lab
from hostops import LOOPBACK, del_host_route, ping_from, route_via_tunnel_from, undo_route_via_tunnel
from scenario import OURS, STOCK, Scenario, assert_pings

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]

SRV, ONE, TWO = "192.0.2.1", "192.0.2.2", "192.0.2.3"
SRV_LAN, LAN = "192.0.2.129", "192.0.2.130"
VPN_NET = "198.51.100.0/25"
VPN_SRV, VPN_ONE, VPN_TWO, VPN_FREE = "198.51.100.1", "198.51.100.2", "198.51.100.3", \
    "198.51.100.4"
BEHIND_TWO, BEHIND_TWO_NET = "198.51.100.193", "198.51.100.192/26"
SRV_TUN_ALIAS = "198.51.100.126"

#: (server kind, client "one" kind, client "two" kind)
KINDS = [pytest.param((OURS, STOCK, OURS), id="ours-server"),
         pytest.param((STOCK, OURS, OURS), id="stock-server")]


@dataclass(frozen=True)
class Net:
    srv: Host
    one: Host
    two: Host
    lan: Host
    void: Host
    one_void_if: str


@pytest.fixture(scope="module")
def net(_testbed_stale_cleanup: None) -> Iterator[Net]:
    lab = Lab()
    try:
        srv, one, two, lan, void = (lab.host(n) for n in ("srv", "one", "two", "lan", "void"))
        lab.segment([srv, one, two], [f"{SRV}/25", f"{ONE}/25", f"{TWO}/25"])
        lab.link(srv, lan, f"{SRV_LAN}/26", f"{LAN}/26")
        lan.add_route("default", via=SRV_LAN)
        one_void_if, _ = lab.link(one, void, "192.0.2.225/27", "192.0.2.226/27")
        two.add_address(LOOPBACK, f"{BEHIND_TWO}/26")
        assert one.ping(SRV, timeout=5) and two.ping(SRV, timeout=5) and srv.ping(LAN, timeout=5)
        yield Net(srv, one, two, lan, void, one_void_if)
    finally:
        lab.close()


@dataclass
class Deployment:
    server: Any
    one: Any
    two: Any
    kinds: tuple[str, str, str]


def deploy(scenario: Scenario, net: Net, kinds: tuple[str, str, str]) -> Deployment:
    ccd = scenario.workdir / "ccd"
    ccd.mkdir(exist_ok=True)
    (ccd / "two").write_text("iroute 198.51.100.192 255.255.255.192\n")
    server = scenario.server(kinds[0], net.srv, local=SRV, subnet=VPN_NET, extra=(
        "client-to-client",
        f"client-config-dir {ccd}",
        "route 198.51.100.192 255.255.255.192",
        'push "route 192.0.2.128 255.255.255.192"',
        'push "route 198.51.100.192 255.255.255.192"',
    ))
    one = scenario.client(kinds[1], net.one, remote=SRV, cn="one")
    one.wait_ready(30)          # one connects first: it gets .2, two gets .3
    two = scenario.client(kinds[2], net.two, remote=SRV, cn="two")
    two.wait_ready(30)
    return Deployment(server, one, two, kinds)


def tun_name(peer: Any) -> str:
    """The tunnel interface a peer uses (ours: from its status; stock: from its log)."""
    if peer.__class__.__name__ == "OvpnctlDaemon":
        return peer.status()["interface"]
    return peer.opened_dev or peer.dev


@pytest.mark.parametrize("kinds", KINDS)
def test_multi_client(net: Net, scenario: Scenario, kinds: tuple[str, str, str]) -> None:
    d = deploy(scenario, net, kinds)
    assert_pings(net.one, [VPN_SRV], count=2)
    assert_pings(net.two, [VPN_SRV], count=2)
    # client to client, both ways
    assert_pings(net.one, [VPN_TWO], count=3, why="(client-to-client)")
    assert_pings(net.two, [VPN_ONE], count=3, why="(client-to-client)")
    # iroute: the network behind two, from one and from the server
    assert_pings(net.one, [BEHIND_TWO], count=3, why="(iroute behind two)")
    assert_pings(net.srv, [BEHIND_TWO], count=2, why="(iroute behind two)")
    clients = {c["common_name"]: c for c in scenario.clients(d.server)}
    assert set(clients) == {"one", "two"}, clients
    assert clients["one"]["vpn_ipv4"] == VPN_ONE and clients["two"]["vpn_ipv4"] == VPN_TWO
    assert clients["one"]["peer_id"] != clients["two"]["peer_id"]
    if kinds[0] == OURS:
        assert clients["two"]["iroutes"] == [BEHIND_TWO_NET], clients["two"]
        assert clients["one"]["iroutes"] == []
        # one's pings to two's network went in from one and out to two
        c = d.server.wait_status(lambda s: all(x["packets_in"] >= 5 and x["packets_out"] >= 5
                                               for x in s["clients"]), what="counters")
        assert len(c["clients"]) == 2
    for cli, cn in ((d.one, "one"), (d.two, "two")):
        if cli.__class__.__name__ == "OvpnctlDaemon":
            st = cli.status()
            assert st["state"] == "connected", st
            assert st["clients"][0]["vpn_ipv4"] == (VPN_ONE if cn == "one" else VPN_TWO)


@pytest.mark.parametrize("kinds", KINDS)
def test_ra_remote_access(net: Net, scenario: Scenario, kinds: tuple[str, str, str]) -> None:
    """FreeBSD's "ra": a LAN behind the server and the clients reach each other."""
    d = deploy(scenario, net, kinds)
    for c in (net.one, net.two):
        assert_pings(c, [SRV_LAN, LAN], count=1, why="(pushed route to the server's LAN)")
    assert_pings(net.lan, [VPN_SRV, VPN_ONE, VPN_TWO], count=1, why="(LAN -> clients)")
    assert not net.lan.ping(VPN_FREE, count=1, timeout=2), "an unused tunnel address answered"
    assert ping_from(net.srv, SRV_LAN, VPN_ONE) and ping_from(net.srv, SRV_LAN, VPN_TWO)
    assert_views(scenario, d)


def assert_views(scenario: Scenario, d: Deployment, min_packets: int = 2) -> None:
    """Both clients listed by the server with their addresses; our peers counted traffic."""
    clients = {c["common_name"]: c for c in scenario.clients(d.server)}
    assert {n: c["vpn_ipv4"] for n, c in clients.items()} == {"one": VPN_ONE, "two": VPN_TWO}
    if d.kinds[0] == OURS:
        for c in d.server.clients():
            assert c["packets_in"] >= min_packets and c["packets_out"] >= min_packets, c
    for cli in (d.one, d.two):
        if cli.__class__.__name__ == "OvpnctlDaemon":
            st = cli.status()
            assert st["state"] == "connected", st
            assert st["clients"][0]["packets_in"] >= min_packets, st


@pytest.mark.parametrize("kinds", KINDS)
def test_route_to(net: Net, scenario: Scenario, kinds: tuple[str, str, str]) -> None:
    """A source-policy route sends traffic into the tunnel although the main table
    points elsewhere (FreeBSD: pf route-to (tun0 198.51.100.1))."""
    d = deploy(scenario, net, kinds)
    srv_tun = tun_name(d.server)
    net.srv.add_address(srv_tun, f"{SRV_TUN_ALIAS}/25")
    assert ping_from(net.one, VPN_ONE, VPN_SRV)
    assert ping_from(net.one, VPN_ONE, SRV_TUN_ALIAS, timeout=5)
    net.one.add_route(f"{SRV_TUN_ALIAS}/32", dev=net.one_void_if)
    assert not ping_from(net.one, VPN_ONE, SRV_TUN_ALIAS, timeout=2), "route was not broken"
    route_via_tunnel_from(net.one, VPN_ONE, SRV_TUN_ALIAS, tun_name(d.one), VPN_SRV)
    try:
        assert ping_from(net.one, VPN_ONE, SRV_TUN_ALIAS, count=3, timeout=10)
        assert_views(scenario, d)
    finally:
        undo_route_via_tunnel(net.one)
        del_host_route(net.one, SRV_TUN_ALIAS)
