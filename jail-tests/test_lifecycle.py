"""Lifecycle scenarios of FreeBSD's if_ovpn.sh (timeout_client, explicit_exit,
destroy_unused, float) plus a server restart with clients reconnecting.

What each proves:

* timeout_client: a client that vanishes (SIGKILL, no goodbye) is dropped by the
  server's keepalive timeout (if_ovpn DEL_PEER/TIMEOUT -> daemon), not kept forever;
  the mirror case: our client notices a vanished server and tears its interface down.
* explicit_exit: a client with explicit-exit-notify that is stopped is forgotten at
  once (well before any keepalive timeout).
* destroy_unused: an if_ovpn interface that never had a peer can be destroyed, and
  daemons that never got a peer leave no interface behind.
* float: the client's address changes under a running tunnel; the server follows it
  (if_ovpn FLOAT notification -> the daemon moves the control channel too) and the
  status shows the new address.
* restart: the server is restarted; its clients come back without intervention.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from bsd_ovpn.testbed.daemons import Engines, OvpnctlFactory
from hostops import del_address
from scenario import (
    CLIENT_IP, CLIENT_NEW_IP, OURS, SERVER_IP, SIDES_ALL, STOCK,
    VPN_CLIENT4, VPN_SERVER4, Scenario, assert_pings, at_host,
)

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]


def _ours_gone(engines: Engines, host: Any, timeout: float = 10.0) -> None:
    """No if_ovpn interface left in ``host`` (polls: teardown is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        left = engines.interfaces(host)
        if not left:
            return
        assert time.monotonic() < deadline, f"interfaces left in {host.name}: {left}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("client_kind", [STOCK, OURS])
def test_timeout_client(pair: Any, scenario: Scenario, ovpn_engines: Engines,
                        client_kind: str) -> None:
    """Our server, keepalive 1 3 (server side: ping-restart 6 s): the client's host
    loses every process at once; the server must drop it after the timeout."""
    t = scenario.tunnel((OURS, client_kind), pair.server, pair.client,
                        server_opts=dict(local=SERVER_IP, keepalive=(1, 3)),
                        client_opts=dict(keepalive=(1, 3)))
    assert_pings(pair.client, [VPN_SERVER4], count=3)
    c = t.server_view()
    assert c["vpn_ipv4"] == VPN_CLIENT4
    t.client.proc.kill()
    eng = ovpn_engines.engine(pair.client)
    if eng is not None:
        eng.kill()      # the client machine is gone: its data channel too
    took = scenario.wait_no_client(t.server, t.cn, timeout=20)
    # gone by timeout, not by a goodbye: at least a few keepalive intervals later
    assert took >= 2.0, f"dropped after {took:.1f} s: too early for a keepalive timeout"
    assert not pair.server.ping(VPN_CLIENT4, count=1, timeout=2)
    assert t.server.running


@pytest.mark.slow
def test_our_client_notices_vanished_server(pair: Any, scenario: Scenario,
                                            ovpn_engines: Engines) -> None:
    """Mirror of timeout_client: a stock server is SIGKILLed; our client's keepalive
    timeout fires, its interface is removed and its status says it is reconnecting."""
    t = scenario.tunnel((STOCK, OURS), pair.server, pair.client,
                        server_opts=dict(local=SERVER_IP, keepalive=(1, 3)),
                        client_opts=dict(keepalive=(1, 3)))
    assert_pings(pair.client, [VPN_SERVER4], count=2)
    assert t.client_view()["state"] == "connected"
    t.server.proc.kill()
    t.client.wait_for(r"keepalive timeout|ping-restart|Inactivity", timeout=20)
    st = t.ours_client.wait_status(lambda s: s["state"] in ("connecting", "reconnecting"),
                                   timeout=10, what="reconnecting state")
    assert st["clients"] == [], st
    _ours_gone(ovpn_engines, pair.client)


@pytest.mark.parametrize("sides", SIDES_ALL)
def test_explicit_exit(pair: Any, scenario: Scenario, sides: tuple[str, str]) -> None:
    """explicit-exit-notify: the stopped client is forgotten at once (keepalive 2 10
    would take 20 s on the server)."""
    t = scenario.tunnel(sides, pair.server, pair.client, server_opts=dict(local=SERVER_IP),
                        client_opts=dict(extra=("explicit-exit-notify 1",)))
    assert_pings(pair.client, [VPN_SERVER4], count=3)
    c = t.server_view()
    assert at_host(c["real_address"], CLIENT_IP), c
    rc = t.client.stop()
    assert rc == 0, f"client exit status {rc}:\n{t.client.log_tail(20)}"
    if sides[0] == OURS:
        took = scenario.wait_no_client(t.server, t.cn, timeout=3)
    else:
        # a stock server lingers 5 s after the exit message ("Delayed exit in 5 seconds")
        # and its status file lags; its log says when the instance really goes
        t0 = time.monotonic()
        t.server.wait_for(r"EEN exit message received|exit message received", timeout=3)
        t.server.wait_for(r"client-instance exiting", timeout=10)
        took = time.monotonic() - t0
    assert took < 10, "forgotten by keepalive timeout, not by the exit notification"
    print(f"{sides}: server forgot the client {took:.2f} s after SIGTERM")
    assert t.server.running


def test_destroy_unused(pair: Any, ovpn_engines: Engines, ovpnctl: OvpnctlFactory,
                        scenario: Scenario) -> None:
    """An interface without peers is created and destroyed; daemons that never got a
    peer (a server nobody called, a client whose server does not answer) leave none."""
    from bsd_ovpn.testbed.daemons import OVPNCTL

    host = pair.server
    before = ovpn_engines.interfaces(host)
    args = ovpn_engines.args(host)
    name = host.run([*OVPNCTL, "interface", "create", *args]).stdout.strip()
    assert name.startswith("ovpn") and name in ovpn_engines.interfaces(host), name
    assert ovpn_engines.interfaces(host)[name] == []
    host.run([*OVPNCTL, "interface", "destroy", name, *args])
    assert ovpn_engines.interfaces(host) == before
    assert name not in host.interfaces()

    srv = scenario.server(OURS, host, local=SERVER_IP)
    assert len(ovpn_engines.interfaces(host)) == len(before) + 1
    assert srv.status()["clients"] == []
    assert srv.stop() == 0
    assert ovpn_engines.interfaces(host) == before

    # a client of a server that is not there: stopped while still connecting
    cli = scenario.client(OURS, pair.client, remote=SERVER_IP, cn="nobody")
    cli.wait_status(lambda s: s["state"] in ("connecting", "reconnecting"), timeout=15,
                    what="connecting state")
    assert cli.stop() == 0
    _ours_gone(ovpn_engines, pair.client)


@pytest.mark.slow
@pytest.mark.parametrize("sides", SIDES_ALL)
def test_server_restart_clients_reconnect(pair: Any, scenario: Scenario,
                                          sides: tuple[str, str]) -> None:
    """SIGTERM the server (it tells clients RESTART), start it again: the client is back
    on its own and the tunnel carries traffic."""
    sopts = dict(local=SERVER_IP, extra=("explicit-exit-notify 1",) if sides[0] == STOCK else ())
    # A client may reconnect while the old server is still shutting down; that handshake
    # then dies with the old process and only hand-window ends it (60 s by default,
    # for stock openvpn as for us), so keep it short here.
    copts = dict(extra=("connect-retry 1 2", "hand-window 8"))
    t = scenario.tunnel(sides, pair.server, pair.client, server_opts=sopts, client_opts=copts)
    assert_pings(pair.client, [VPN_SERVER4], count=2)
    first = t.server_view()
    mark = t.client.mark()
    assert t.server.stop() == 0
    assert not pair.client.ping(VPN_SERVER4, count=1, timeout=1)
    again = scenario.server(sides[0], pair.server, name="server2", **sopts)
    t.client.wait_for(r"Initialization Sequence Completed", timeout=30, since=mark)
    assert_pings(pair.client, [VPN_SERVER4], count=3, why="after the server restart")
    assert_pings(pair.server, [VPN_CLIENT4], count=1)
    c = scenario.wait_client(again, lambda c: c["common_name"] == t.cn)
    assert c["vpn_ipv4"] == VPN_CLIENT4 and at_host(c["real_address"], CLIENT_IP), (first, c)
    if sides[1] == OURS:
        st = t.client_view()
        assert st["state"] == "connected" and st["clients"][0]["packets_in"] >= 3, st


@pytest.mark.slow
@pytest.mark.parametrize("sides", SIDES_ALL)
def test_float(fresh_pair: Any, scenario: Scenario, sides: tuple[str, str]) -> None:
    """The client's address changes from .2 to .5 under a live tunnel (keepalive 1 s):
    the server follows it and reports the new address."""
    p = fresh_pair
    t = scenario.tunnel(sides, p.server, p.client,
                        server_opts=dict(local=SERVER_IP, keepalive=(1, 10)),
                        client_opts=dict(keepalive=(1, 10)))
    assert_pings(p.client, [VPN_SERVER4], count=2)
    assert at_host(t.server_view()["real_address"], CLIENT_IP)
    # delete first: on Linux, removing a subnet's primary address also removes its
    # secondaries (promote_secondaries is off by default)
    del_address(p.client, p.client_if, f"{CLIENT_IP}/24")
    p.client.add_address(p.client_if, f"{CLIENT_NEW_IP}/24")
    c = t.server_view(timeout=10, predicate=lambda c: at_host(c["real_address"], CLIENT_NEW_IP))
    assert c["vpn_ipv4"] == VPN_CLIENT4
    assert_pings(p.client, [VPN_SERVER4], count=3, why="after the float")
    assert_pings(p.server, [VPN_CLIENT4], count=2, why="after the float")
    if t.ours_server is not None:
        assert len(t.ours_server.clients()) == 1
    assert t.client.log.count("Initialization Sequence Completed") == 1, "reconnected, not floated"
