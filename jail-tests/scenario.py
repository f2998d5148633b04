"""Building blocks of the jail-tests scenarios: who serves, who connects, what to check.

Each scenario of FreeBSD's if_ovpn test suite is one topology plus one
property.  The topology comes from :mod:`bsd_ovpn.testbed` (vnet jails on
FreeBSD, network namespaces on Linux); this module adds what every scenario
repeats: starting a server and a client of a chosen *kind* ("ours" =
``ovpnctl server|client``, "stock" = the openvpn program) from one set of
options, and reading back each side's view of the tunnel in one shape so
that assertions do not care which implementation they look at.

Our daemons are read with ``ovpnctl status --json`` (docs/json.md); a stock
server writes OpenVPN's status file (``status FILE 1``, version 2), parsed
here into the same field names.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

from bsd_ovpn.testbed.daemons import OvpnctlDaemon, OvpnctlFactory
from bsd_ovpn.testbed.fixtures import StockFactory
from bsd_ovpn.testbed.hosts import Host
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys

OURS, STOCK = "ours", "stock"
Peer = Any  # OvpnctlDaemon | StockOpenVPN: both have wait_ready/wait_for/mark/stop/log_tail

# Outer link (documentation ranges only, see /work/notes/common.md).
SERVER_IP, CLIENT_IP, SERVER_ALIAS, CLIENT_NEW_IP = "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.5"
SERVER_IP6, CLIENT_IP6, SERVER_ALIAS6 = "2001:db8:2::1", "2001:db8:2::2", "2001:db8:2::3"
SERVER_LL, CLIENT_LL = "fe80::a", "fe80::b"
# Inside the tunnel.
VPN_NET4, VPN_NET6 = "198.51.100.0/24", "2001:db8:100::/64"
VPN_SERVER4, VPN_CLIENT4 = "198.51.100.1", "198.51.100.2"
VPN_SERVER6, VPN_CLIENT6 = "2001:db8:100::1", "2001:db8:100::1000"

#: (server kind, client kind) pairs; ids read "server-client".
SIDES_BOTH_WAYS = [pytest.param((OURS, STOCK), id="ours-stock"),
                   pytest.param((STOCK, OURS), id="stock-ours")]
SIDES_ALL = SIDES_BOTH_WAYS + [pytest.param((OURS, OURS), id="ours-ours")]
#: Where a stock server cannot judge our code (the property is the server's).
SIDES_OUR_SERVER = [pytest.param((OURS, STOCK), id="ours-stock"),
                    pytest.param((OURS, OURS), id="ours-ours")]


def drop_directive(text: str, name: str) -> str:
    """A config without the lines of directive ``name`` (e.g. "server" for an IPv6-only tunnel)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.split()[:1] != [name])


@dataclass
class Tunnel:
    """One server and one client of known kinds, started by :class:`Scenario`."""

    server_kind: str
    client_kind: str
    server: Peer
    client: Peer
    server_host: Host
    client_host: Host
    cn: str
    scenario: "Scenario"

    @property
    def ours_server(self) -> OvpnctlDaemon | None:
        return self.server if self.server_kind == OURS else None

    @property
    def ours_client(self) -> OvpnctlDaemon | None:
        return self.client if self.client_kind == OURS else None

    def wait_up(self, timeout: float = 30.0) -> "Tunnel":
        self.client.wait_ready(timeout)
        return self

    def server_view(self, timeout: float = 15.0,
                    predicate: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The server's entry for our client (ours: status --json; stock: status file)."""
        pred = predicate or (lambda c: True)
        return self.scenario.wait_client(self.server, lambda c: c["common_name"] == self.cn
                                         and pred(c), timeout)

    def client_view(self) -> dict[str, Any]:
        """Our client's status (``state``, ``clients[0]`` = the server); ours only."""
        assert self.ours_client is not None, "only our client has a status"
        return self.ours_client.status()


@dataclass
class Scenario:
    """Starts servers and clients of either kind from the same options."""

    pki: PKI
    keys: WrapKeys
    stock: StockFactory
    ours: OvpnctlFactory
    workdir: Path
    started: list[Peer] = field(default_factory=list)

    # -- peers -------------------------------------------------------------------

    def server(self, kind: str, host: Host, *, name: str = "server",
               edit: Callable[[str], str] | None = None, **opts: Any) -> Peer:
        """A server of ``kind`` with ``OvpnConfig.server`` options; started and ready.

        ``edit`` rewrites the rendered config text (directives OvpnConfig does
        not model, or removing one).  A stock server also writes a status file
        every second so :meth:`clients` can read it.
        """
        opts.setdefault("keepalive", (2, 10))
        if kind == STOCK:
            opts.setdefault("status", self.workdir / f"{name}-status.txt")
        cfg = OvpnConfig.server(self.pki, self.keys, **opts)
        text = cfg.render()
        if edit is not None:
            text = edit(text)
        peer = (self.stock(host, text, f"stock-{name}") if kind == STOCK
                else self.ours.server(host, text, f"ours-{name}"))
        if kind == STOCK:
            peer.status_path = opts["status"]
        self.started.append(peer)
        peer.wait_ready(30)
        return peer

    def client(self, kind: str, host: Host, *, remote: str, cn: str = "client",
               name: str | None = None, edit: Callable[[str], str] | None = None,
               **opts: Any) -> Peer:
        """A client of ``kind`` with certificate CN ``cn``; started, not yet waited for."""
        opts.setdefault("keepalive", (2, 10))
        cfg = OvpnConfig.client(self.pki, self.keys, remote=remote, cert=self.pki.client(cn),
                                **opts)
        text = cfg.render()
        if edit is not None:
            text = edit(text)
        name = name or f"client-{cn}"
        peer = (self.stock(host, text, f"stock-{name}") if kind == STOCK
                else self.ours.client(host, text, f"ours-{name}"))
        self.started.append(peer)
        return peer

    def tunnel(self, sides: tuple[str, str], server_host: Host, client_host: Host, *,
               remote: str = SERVER_IP, cn: str = "client",
               server_opts: dict[str, Any] | None = None,
               client_opts: dict[str, Any] | None = None,
               server_edit: Callable[[str], str] | None = None,
               client_edit: Callable[[str], str] | None = None,
               wait: bool = True) -> Tunnel:
        """Server of kind ``sides[0]``, client of kind ``sides[1]``, connected."""
        skind, ckind = sides
        srv = self.server(skind, server_host, edit=server_edit, **(server_opts or {}))
        cli = self.client(ckind, client_host, remote=remote, cn=cn, edit=client_edit,
                          **(client_opts or {}))
        t = Tunnel(skind, ckind, srv, cli, server_host, client_host, cn, self)
        return t.wait_up() if wait else t

    # -- what the server sees -------------------------------------------------------

    def clients(self, server: Peer) -> list[dict[str, Any]]:
        """The server's connected clients, in docs/json.md field names, whatever its kind."""
        if isinstance(server, OvpnctlDaemon):
            return server.clients()
        return stock_status_clients(Path(server.status_path))

    def wait_client(self, server: Peer, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 15.0) -> dict[str, Any]:
        """Wait until one of the server's clients satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            try:
                seen = self.clients(server)
            except Exception:  # noqa: BLE001 - file being rewritten / socket not up yet
                seen = []
            for c in seen:
                if predicate(c):
                    return c
            if time.monotonic() > deadline:
                raise AssertionError(f"{server.name}: no matching client within {timeout:g} s; "
                                     f"clients: {seen}\n{server.log_tail(30)}")
            time.sleep(0.25)

    def wait_no_client(self, server: Peer, cn: str, timeout: float) -> float:
        """Wait until ``cn`` is gone from the server's list; returns how long it took."""
        t0 = time.monotonic()
        while True:
            try:
                names = [c["common_name"] for c in self.clients(server)]
            except Exception:  # noqa: BLE001
                names = [cn]
            if cn not in names:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{server.name} still lists {cn} after {timeout:g} s\n"
                                     f"{server.log_tail(30)}")
            time.sleep(0.25)


def stock_status_clients(path: Path) -> list[dict[str, Any]]:
    """CLIENT_LIST rows of an OpenVPN ``status-version 2`` file, as docs/json.md fields."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        f = line.split(",")
        if f[0] != "CLIENT_LIST" or len(f) < 13:
            continue
        out.append({
            "common_name": f[1], "real_address": f[2], "vpn_ipv4": f[3] or None,
            "vpn_ipv6": f[4] or None, "bytes_in": int(f[5]), "bytes_out": int(f[6]),
            "peer_id": int(f[11]) if f[11].isdigit() else None, "cipher": f[12],
        })
    return out


def addr_host(real_address: str) -> str:
    """The IP of a status ``real_address``: "192.0.2.2:40000", "[2001:db8::2]:1194",
    OpenVPN's unbracketed "2001:db8::2:1194" or "[AF_INET6]..." forms; v4-mapped
    "::ffff:192.0.2.2" becomes "192.0.2.2"."""
    a = real_address.strip()
    if a.startswith("[AF_INET6]") or a.startswith("[AF_INET]"):
        a = a.split("]", 1)[1]
    if a.startswith("["):
        a = a[1:a.index("]")]
    elif a.count(":") == 1:
        a = a.split(":", 1)[0]
    elif a.count(":") > 1:
        try:
            ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            a = a.rsplit(":", 1)[0]          # unbracketed v6 with a port
    a = a.split("%", 1)[0]
    ip = ipaddress.ip_address(a)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def at_host(real_address: str, ip: str) -> bool:
    """True if a status ``real_address`` is at ``ip`` (any of the forms addr_host reads;
    unbracketed "v6:port" is ambiguous, so a prefix match decides that one)."""
    want = str(ipaddress.ip_address(ip))
    if addr_host(real_address) == want:
        return True
    a = real_address.split("]", 1)[1] if real_address.startswith("[AF_") else real_address
    return a.startswith(want + ":") or a.startswith(f"[{want}]")


def assert_pings(host: Host, addrs: Iterable[str], count: int = 3, timeout: float = 15.0,
                 size: int | None = None, why: str = "") -> None:
    for a in addrs:
        res = host.ping(a, count=count, timeout=timeout, size=size)
        assert res, f"[{host.name}] ping {a} failed {why}:\n{res.output[-1500:]}"


def assert_tunnel_counts(t: Tunnel, min_packets: int = 3) -> None:
    """Our side's if_ovpn counters saw the traffic (FreeBSD's 4in4 checks netstat -I ovpn0)."""
    if t.ours_server is not None:
        c = t.server_view(predicate=lambda c: c["packets_in"] >= min_packets
                          and c["packets_out"] >= min_packets)
        assert c["bytes_in"] > 0 and c["bytes_out"] > 0, c
    if t.ours_client is not None:
        st = t.client_view()
        assert st["role"] == "client" and st["state"] == "connected", st
        [srv] = st["clients"]
        assert srv["packets_in"] >= min_packets and srv["packets_out"] >= min_packets, srv
        assert srv["bytes_in"] > 0 and srv["bytes_out"] > 0, srv
