"""Transport scenarios of FreeBSD's if_ovpn.sh: which outer and inner address families,
which local addresses, and what arrives on the outer socket.

FreeBSD case -> test here:

* 4in4, 6in4, 4in6, 6in6: the tunnel carries IPv4/IPv6 over an IPv4/IPv6 UDP link
  (``test_transport[4in4-...]`` ...); 4in4 also counts traffic on the interface
  (our ``status --json`` counters) and survives a garbage datagram ("foo" to 1194).
* 4mapped: an IPv6 (dual-stack) server socket with an IPv4 client: the client
  arrives as a v4-mapped address and the data channel must still reach it.
* multihome4 / multihome6: the server listens on the wildcard address and is
  reached on a secondary address; replies must leave from that address (a client
  drops packets from any other source, as OpenVPN does, so no firewall is needed).
* bz283426: a broadcast datagram on the outer link must not break the tunnel.
* linklocal: the server listens on a link-local address with a scope.
* routing loop protection (part of 4in4/6in6): a route to the server through the
  tunnel itself must not loop.
"""
from __future__ import annotations

from typing import Any

import pytest

from hostops import del_route, send_udp
from scenario import (
    CLIENT_IP, CLIENT_IP6, CLIENT_LL, OURS, SERVER_ALIAS, SERVER_ALIAS6, SERVER_IP, SERVER_IP6,
    SERVER_LL, SIDES_ALL, SIDES_BOTH_WAYS, VPN_CLIENT4, VPN_CLIENT6, VPN_NET6,
    VPN_SERVER4, VPN_SERVER6, Scenario, assert_pings, assert_tunnel_counts, at_host,
    drop_directive,
)

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]


def v6_only(text: str) -> str:
    """An IPv6-only tunnel: no IPv4 pool (``server`` line removed), as FreeBSD's 6in4/6in6."""
    return drop_directive(text, "server") + "mode server\ntls-server\npush \"topology subnet\"\n"


#: name -> server options, client options, inner addresses (server's, client's),
#: where the client's packets come from, and the server address the client talks to.
CASES: dict[str, dict[str, Any]] = {
    "4in4": dict(server=dict(local=SERVER_IP, proto="udp4"),
                 client=dict(remote=SERVER_IP, proto="udp4"),
                 inner=[(VPN_SERVER4, VPN_CLIENT4)], real=CLIENT_IP, remote=SERVER_IP),
    "6in4": dict(server=dict(local=SERVER_IP, proto="udp4", subnet6=VPN_NET6), v6only=True,
                 client=dict(remote=SERVER_IP, proto="udp4"),
                 inner=[(VPN_SERVER6, VPN_CLIENT6)], real=CLIENT_IP, remote=SERVER_IP),
    "4in6": dict(server=dict(local=SERVER_IP6, proto="udp6"),
                 client=dict(remote=SERVER_IP6, proto="udp6"),
                 inner=[(VPN_SERVER4, VPN_CLIENT4)], real=CLIENT_IP6, remote=SERVER_IP6),
    "6in6": dict(server=dict(local=SERVER_IP6, proto="udp6", subnet6=VPN_NET6), v6only=True,
                 client=dict(remote=SERVER_IP6, proto="udp6"),
                 inner=[(VPN_SERVER6, VPN_CLIENT6)], real=CLIENT_IP6, remote=SERVER_IP6),
    # a dual-stack socket on "::" reached over IPv4
    "4mapped": dict(server=dict(proto="udp6"),
                    client=dict(remote=SERVER_IP, proto="udp4"),
                    inner=[(VPN_SERVER4, VPN_CLIENT4)], real=CLIENT_IP, remote=SERVER_IP),
    "multihome4": dict(server=dict(proto="udp4", extra=("multihome",)),
                       client=dict(remote=SERVER_ALIAS, proto="udp4"),
                       inner=[(VPN_SERVER4, VPN_CLIENT4)], real=CLIENT_IP, remote=SERVER_ALIAS),
    "multihome6": dict(server=dict(proto="udp6", subnet6=VPN_NET6, extra=("multihome",)),
                       client=dict(remote=SERVER_ALIAS6, proto="udp6"),
                       inner=[(VPN_SERVER4, VPN_CLIENT4), (VPN_SERVER6, VPN_CLIENT6)],
                       real=CLIENT_IP6, remote=SERVER_ALIAS6),
}


def check_tunnel(t: Any, case: dict[str, Any]) -> None:
    """Traffic both ways (small and near-MTU pings) and each of our sides' status."""
    for server_addr, client_addr in case["inner"]:
        assert_pings(t.client_host, [server_addr], count=3, timeout=15)
        assert_pings(t.client_host, [server_addr], count=2, size=1200, timeout=5)
        assert_pings(t.server_host, [client_addr], count=2, timeout=10)
    c = t.server_view()
    assert at_host(c["real_address"], case["real"]), c
    inner_client = {a for _, a in case["inner"]}
    if VPN_CLIENT4 in inner_client:
        assert c["vpn_ipv4"] == VPN_CLIENT4, c
    if VPN_CLIENT6 in inner_client:
        assert c["vpn_ipv6"] == VPN_CLIENT6, c
    if t.ours_client is not None:
        st = t.client_view()
        assert st["state"] == "connected", st
        [srv] = st["clients"]
        assert at_host(srv["real_address"], case["remote"]), srv
        assert at_host(st["remote"], case["remote"]), st
    assert_tunnel_counts(t)


@pytest.mark.parametrize("sides", SIDES_ALL)
@pytest.mark.parametrize("name", list(CASES))
def test_transport(pair: Any, scenario: Scenario, name: str, sides: tuple[str, str]) -> None:
    case = CASES[name]
    t = scenario.tunnel(sides, pair.server, pair.client, remote=case["client"]["remote"],
                        server_opts=case["server"],
                        client_opts={k: v for k, v in case["client"].items() if k != "remote"},
                        server_edit=v6_only if case.get("v6only") else None)
    check_tunnel(t, case)
    if name == "4in4":
        # FreeBSD's 4in4 also sends junk to the server port: the tunnel must survive it
        send_udp(pair.client, SERVER_IP, 1194, size=4)
        assert_pings(pair.client, [VPN_SERVER4], count=3, why="after a junk datagram")
        assert t.server.running


@pytest.mark.iperf3
@pytest.mark.parametrize("sides", SIDES_ALL)
def test_4in4_throughput(pair: Any, scenario: Scenario, iperf: Any,
                         sides: tuple[str, str]) -> None:
    """iperf3 TCP through the tunnel (1 s each way); our side counts the bytes."""
    t = scenario.tunnel(sides, pair.server, pair.client,
                        server_opts=dict(local=SERVER_IP))
    assert_pings(pair.client, [VPN_SERVER4], count=1)
    up = iperf.run(pair.server, pair.client, VPN_SERVER4, seconds=1)
    down = iperf.run(pair.server, pair.client, VPN_SERVER4, seconds=1, reverse=True)
    assert up.received_bps > 5e6 and down.received_bps > 5e6, (up, down)
    if t.ours_server is not None:
        c = t.server_view(predicate=lambda c: c["bytes_in"] >= up.received_bytes)
        assert c["bytes_out"] >= down.received_bytes, c
    if t.ours_client is not None:
        [srv] = t.client_view()["clients"]
        assert srv["bytes_out"] >= up.received_bytes and srv["bytes_in"] >= down.received_bytes
    print(f"{sides}: up {up.received_mbps:.0f} Mbit/s, down {down.received_mbps:.0f} Mbit/s")


@pytest.mark.parametrize("sides", SIDES_BOTH_WAYS)
def test_bz283426_broadcast_on_outer_link(pair: Any, scenario: Scenario,
                                          sides: tuple[str, str]) -> None:
    """FreeBSD bug 283426: a server bound to the wildcard address receives a broadcast
    datagram (1000 x 'x') on its port; it must neither crash nor drop the tunnel."""
    t = scenario.tunnel(sides, pair.server, pair.client, server_opts=dict(proto="udp4"))
    assert_pings(pair.client, [VPN_SERVER4], count=1)
    send_udp(pair.client, "192.0.2.255", 1194, size=1000, broadcast=True)
    assert_pings(pair.client, [VPN_SERVER4], count=3, why="after the broadcast")
    assert t.server.running and t.client.running
    c = t.server_view()
    assert at_host(c["real_address"], CLIENT_IP), c
    assert_tunnel_counts(t)


@pytest.mark.parametrize("sides", SIDES_ALL)
def test_linklocal(pair: Any, scenario: Scenario, sides: tuple[str, str]) -> None:
    """Outer link on IPv6 link-local addresses with a scope (fe80::a%if).  FreeBSD's case
    asks for openvpn >= 2.7 (its DCO); Debian's 2.6 without DCO already handles it."""
    t = scenario.tunnel(sides, pair.server, pair.client,
                        remote=f"{SERVER_LL}%{pair.client_if}",
                        server_opts=dict(local=f"{SERVER_LL}%{pair.server_if}", proto="udp6",
                                         subnet6=VPN_NET6),
                        client_opts=dict(proto="udp6"), server_edit=v6_only)
    assert_pings(pair.client, [VPN_SERVER6], count=3, timeout=15)
    assert_pings(pair.client, [VPN_SERVER6], count=2, size=1200)
    c = t.server_view()
    assert at_host(c["real_address"], CLIENT_LL), c
    assert_tunnel_counts(t)


@pytest.mark.parametrize("family", ["4in4", "6in6"])
def test_routing_loop_protection(pair: Any, scenario: Scenario, family: str) -> None:
    """A route to the server's outer address *through the tunnel* must not loop: pings
    then fail (no reply), nothing melts, and removing the route heals the tunnel.
    Our client only: a stock openvpn without DCO loops in userspace by design."""
    case = CASES[family]
    t = scenario.tunnel((OURS, OURS), pair.server, pair.client, remote=case["client"]["remote"],
                        server_opts=case["server"],
                        client_opts={k: v for k, v in case["client"].items() if k != "remote"},
                        server_edit=v6_only if case.get("v6only") else None)
    inner = case["inner"][0][0]
    outer = case["remote"]
    assert_pings(pair.client, [inner], count=1)
    dst = f"{outer}/128" if family == "6in6" else f"{outer}/32"
    pair.client.add_route(dst, via=inner)
    try:
        res = pair.client.ping(inner, count=1, timeout=3)
        assert not res, "a packet looped back through its own tunnel and still got a reply"
        assert t.client.running and t.server.running
    finally:
        del_route(pair.client, dst, inner)
    # keepalive/ping-restart may have fired meanwhile: allow a reconnect
    assert_pings(pair.client, [inner], count=2, timeout=30, why="after removing the loop route")
