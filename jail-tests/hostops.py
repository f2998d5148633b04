"""The few host operations the scenarios need beyond bsd_ovpn.testbed's Host API.

Each has a Linux (iproute2) and a FreeBSD (ifconfig/route/pf) form, so the
scenarios stay written once.  They live here, not in the testbed, because only
these scenarios need them.
"""
from __future__ import annotations

import ipaddress
import sys

from bsd_ovpn.testbed.hosts import Host

FREEBSD = sys.platform.startswith("freebsd")
#: The loopback interface's name (a network "behind" a client lives there).
LOOPBACK = "lo0" if FREEBSD else "lo"


def del_address(host: Host, ifname: str, cidr: str) -> None:
    """Remove one address from an interface (the float scenario moves the client)."""
    iface = ipaddress.ip_interface(cidr)
    if FREEBSD:
        fam = "inet6" if iface.version == 6 else "inet"
        host.run(["ifconfig", ifname, fam, str(iface.ip), "-alias"])
    else:
        host.run(["ip", f"-{iface.version}", "addr", "del", str(iface), "dev", ifname])


def send_udp(host: Host, dst: str, port: int, size: int = 1000, *, broadcast: bool = False) -> None:
    """One UDP datagram of ``size`` bytes from ``host`` (bz283426: a broadcast one)."""
    fam = "AF_INET6" if ipaddress.ip_address(dst).version == 6 else "AF_INET"
    code = (f"import socket as s; k = s.socket(s.{fam}, s.SOCK_DGRAM); "
            + ("k.setsockopt(s.SOL_SOCKET, s.SO_BROADCAST, 1); " if broadcast else "")
            + f"k.sendto(b'x' * {int(size)}, ({dst!r}, {int(port)}))")
    host.run([sys.executable, "-c", code])


def route_via_tunnel_from(host: Host, src: str, dst: str, dev: str, gateway: str) -> None:
    """Policy route: packets *from* ``src`` to ``dst`` go out of ``dev`` via ``gateway``,
    whatever the main table says (FreeBSD: pf ``route-to``; Linux: an ``ip rule``)."""
    if FREEBSD:
        host.run(["kldload", "-n", "pf"], check=False)
        host.run(["pfctl", "-e"], check=False)
        host.run(["pfctl", "-f", "-"],
                 input=f"pass out route-to ({dev} {gateway}) proto icmp from {src} to {dst}\n")
    else:
        table = "4242"
        host.run(["ip", "route", "add", f"{dst}/32", "via", gateway, "dev", dev,
                  "table", table])
        host.run(["ip", "rule", "add", "from", src, "to", dst, "lookup", table,
                  "priority", "100"])


def ping_from(host: Host, src: str, dst: str, count: int = 1, timeout: float = 5.0) -> bool:
    """Ping with a chosen source address (route_to needs the tunnel address as source)."""
    v6 = ipaddress.ip_address(dst).version == 6
    if FREEBSD:
        argv = ["ping", "-6" if v6 else "-4", "-c", str(count), "-S", src,
                *([] if v6 else ["-t", str(int(timeout))]), dst]
    else:
        argv = ["ping", "-6" if v6 else "-4", "-c", str(count), "-W", "1",
                "-w", str(int(timeout)), "-I", src, dst]
    return host.run(argv, check=False, timeout=timeout + 10).returncode == 0


def del_route(host: Host, dst: str, via: str) -> None:
    """Remove a route added with ``Host.add_route(dst, via=)``."""
    v = ipaddress.ip_network(dst, strict=False).version
    if FREEBSD:
        host.run(["route", "delete", "-6" if v == 6 else "-4", dst, via])
    else:
        host.run(["ip", f"-{v}", "route", "del", dst, "via", via])


def undo_route_via_tunnel(host: Host) -> None:
    """Remove what :func:`route_via_tunnel_from` installed (best effort, for cleanup)."""
    if FREEBSD:
        host.run(["pfctl", "-F", "rules"], check=False)
    else:
        host.run(["ip", "rule", "del", "priority", "100"], check=False)
        host.run(["ip", "route", "flush", "table", "4242"], check=False)


def del_host_route(host: Host, dst: str) -> None:
    """Remove a host route added with ``Host.add_route(dst + "/32", dev=...)`` (best effort)."""
    if FREEBSD:
        host.run(["route", "delete", dst], check=False)
    else:
        host.run(["ip", "route", "del", f"{dst}/32"], check=False)
