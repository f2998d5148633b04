"""Addresses and MTU of a new interface, set with the host's own tools.

if_ovpn has no command for addresses: OpenVPN runs ifconfig/route on the
interface like on any other (spec dco-freebsd-openvpn.md §3 step 6), and so
does ``ovpnctl interface create --address``.  With the userspace engine the
interface is a tun device of the same name in the engine's network
namespace, so ``ip`` configures it -- which means ovpnctl must run in the
same namespace as the engine.

* Linux: ``ip link set dev N mtu M``; ``ip addr add CIDR dev N`` (IPv6 with
  ``nodad``: duplicate address detection means nothing on a point-to-point
  tunnel and would hold the address back for a second).
* FreeBSD: ``ifconfig N mtu M``; IPv6 ``ifconfig N inet6 ADDR/LEN alias``;
  IPv4 on a point-to-point interface needs a destination, so as OpenVPN does
  for if_ovpn the address is its own destination and the prefix is routed to
  the interface (``route add -net NET -interface N``); in subnet mode
  (``--mode subnet``) ``ifconfig N inet ADDR/LEN alias`` suffices.
  (Written from ifconfig(8)/route(8); no FreeBSD host in this test bed.)
"""
from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Sequence
from typing import Union

from bsd_ovpn.errors import OvpnError

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
MIN_MTU = 576                   # if_ovpn accepts 576..65535-20-8-24
MAX_MTU = 65535 - 20 - 8 - 24


class NetConfError(OvpnError):
    """An ip/ifconfig/route command failed; the message has its own words."""


def _run(argv: Sequence[str]) -> None:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetConfError(f"{argv[0]} is not installed; cannot configure the interface") from None
    except subprocess.TimeoutExpired:
        raise NetConfError(f"{' '.join(argv)} did not finish in 30 s") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise NetConfError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {res.returncode}'}")


def commands(ifname: str, addresses: Sequence[IPInterface], mtu: int | None, *,
             subnet_mode: bool = False, platform: str | None = None) -> list[list[str]]:
    """The commands that configure ``ifname`` (pure: tests compare them)."""
    platform = platform or sys.platform
    out: list[list[str]] = []
    if platform.startswith("freebsd"):
        if mtu is not None:
            out.append(["ifconfig", ifname, "mtu", str(mtu)])
        for a in addresses:
            if a.version == 6:
                out.append(["ifconfig", ifname, "inet6", str(a), "alias"])
            elif subnet_mode:
                out.append(["ifconfig", ifname, "inet", str(a), "alias"])
            else:
                out.append(["ifconfig", ifname, "inet", str(a), str(a.ip), "alias"])
                if a.network.prefixlen < 32:
                    out.append(["route", "-q", "add", "-net", str(a.network),
                                "-interface", ifname])
        return out
    if mtu is not None:
        out.append(["ip", "link", "set", "dev", ifname, "mtu", str(mtu)])
    for a in addresses:
        argv = ["ip", "addr", "add", str(a), "dev", ifname]
        if a.version == 6:
            argv.append("nodad")
        out.append(argv)
    return out


def configure(ifname: str, addresses: Sequence[IPInterface], mtu: int | None, *,
              subnet_mode: bool = False) -> None:
    for argv in commands(ifname, addresses, mtu, subnet_mode=subnet_mode):
        _run(argv)
