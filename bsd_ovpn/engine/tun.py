"""The engine's network device: a tun interface standing in for an if_ovpn clone.

if_ovpn is a layer-3 point-to-point interface with MTU 1428 whose link stays
down until OVPN_START_VPN.  On Linux the closest thing is a tun device opened
with IFF_TUN|IFF_NO_PI (bare IP packets, one per read/write), created down
with MTU 1428; START_VPN sets it up.  Addresses and routes stay the caller's
business (``ip addr``/``ip route``, as with ifconfig/route on FreeBSD); this
module only needs ``ip`` for up/down/rename/MTU and to read the routes whose
gateway selects a peer (the kernel's FIB step of TX peer selection).

The FreeBSD tun(4) path (:class:`FreeBSDTun`) is written for completeness —
the engine is meant for hosts without if_ovpn — but cannot be tested here.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import struct
import subprocess
import sys

from bsd_ovpn.errors import OvpnError

DEFAULT_MTU = 1428          # if_ovpn's default

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TunError(OvpnError, OSError):
    """A tun device or an ``ip`` command failed; carries the errno and the command's words."""


def _ip(*args: str, json_out: bool = False) -> str:
    argv = ["ip", *(["-j"] if json_out else []), *args]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except FileNotFoundError as exc:
        raise TunError(2, "the ip command (iproute2) is not installed") from exc
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        err = 17 if "File exists" in msg else 19 if "Cannot find device" in msg else 22
        raise TunError(err, f"{' '.join(argv)}: {msg}")
    return res.stdout


class LinuxTun:
    """One Linux tun device (IFF_TUN | IFF_NO_PI) owned by the engine."""

    header = 0              # bytes in front of each packet (none with IFF_NO_PI)

    def __init__(self, name: str, *, mtu: int = DEFAULT_MTU) -> None:
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ:
            raise TunError(22, f"bad interface name {name!r}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", raw, IFF_TUN | IFF_NO_PI)
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.name = out[:16].rstrip(b"\0").decode()
            self.fd = fd
            _ip("link", "set", "dev", self.name, "mtu", str(mtu))
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, TunError):
                raise
            raise TunError(exc.errno or 5, f"cannot create tun {name!r}: {exc.strerror}") from exc

    def set_up(self) -> None:
        _ip("link", "set", "dev", self.name, "up")

    def is_up(self) -> bool:
        return link_is_up(self.name)

    def rename(self, new_name: str) -> None:
        """Linux renames only down devices: down, rename, up again if it was up."""
        was_up = self.is_up()
        if was_up:
            _ip("link", "set", "dev", self.name, "down")
        try:
            _ip("link", "set", "dev", self.name, "name", new_name)
            self.name = new_name
        finally:
            if was_up:
                _ip("link", "set", "dev", self.name, "up")

    def close(self) -> None:
        """Closing the (non-persistent) tun fd removes the device."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def link_is_up(name: str) -> bool:
    try:
        with open(f"/sys/class/net/{name}/flags", encoding="ascii") as f:
            return bool(int(f.read().strip(), 16) & 0x1)
    except OSError:
        return False


def gateway_routes(name: str) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, bytes]]:
    """Routes through ``name`` that have a gateway: (prefix, gateway bytes), both families.

    This is the kernel's FIB step (route with NHF_GATEWAY -> match the gateway
    against the peers' VPN addresses) as a table the data plane can consult.
    """
    out = []
    for fam in ("-4", "-6"):
        text = _ip(fam, "route", "show", "dev", name, json_out=True)
        for r in json.loads(text or "[]"):
            gw = r.get("gateway")
            dst = r.get("dst")
            if not gw or not dst:
                continue
            net = ipaddress.ip_network("0.0.0.0/0" if dst == "default" and fam == "-4" else
                                       "::/0" if dst == "default" else dst, strict=False)
            out.append((net, ipaddress.ip_address(gw).packed))
    out.sort(key=lambda r: (r[0].version, str(r[0])))
    return out


class FreeBSDTun:  # pragma: no cover - no FreeBSD host in this test bed
    """tun(4) on FreeBSD, for running the engine where if_ovpn is absent.

    Opening /dev/tun clones tunN; TUNSIFHEAD prefixes every packet with its
    address family (4 bytes, network order) so IPv6 works; ifconfig renames.
    """

    header = 4
    TUNSIFHEAD = 0x80047460          # _IOW('t', 96, int)
    TUNSIFMODE = 0x8004745E          # _IOW('t', 94, int)
    IFF_POINTOPOINT = 0x10

    def __init__(self, name: str, *, mtu: int = DEFAULT_MTU) -> None:
        fd = -1
        for unit in range(1024):            # opening a missing /dev/tunN clones it
            try:
                fd = os.open(f"/dev/tun{unit}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            self.name = f"tun{unit}"
            break
        if fd < 0:
            raise TunError(6, "no free /dev/tunN")
        try:
            fcntl.ioctl(fd, self.TUNSIFHEAD, struct.pack("i", 1))
            fcntl.ioctl(fd, self.TUNSIFMODE, struct.pack("i", self.IFF_POINTOPOINT))
            self.fd = fd
            subprocess.run(["ifconfig", self.name, "name", name, "mtu", str(mtu), "down"],
                           check=True, capture_output=True)
            self.name = name
        except BaseException:
            os.close(fd)
            raise

    def set_up(self) -> None:
        subprocess.run(["ifconfig", self.name, "up"], check=True, capture_output=True)

    def is_up(self) -> bool:
        out = subprocess.run(["ifconfig", self.name], capture_output=True, text=True).stdout
        return "<UP" in out

    def rename(self, new_name: str) -> None:
        subprocess.run(["ifconfig", self.name, "name", new_name], check=True, capture_output=True)
        self.name = new_name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            subprocess.run(["ifconfig", self.name, "destroy"], capture_output=True)


def open_tun(name: str, *, mtu: int = DEFAULT_MTU) -> LinuxTun | FreeBSDTun:
    if sys.platform.startswith("freebsd"):
        return FreeBSDTun(name, mtu=mtu)
    return LinuxTun(name, mtu=mtu)
