"""Addresses, MTU and routes on the tunnel interface: the host's own tools, nothing clever.

if_ovpn (and the userspace engine's tun) leave addressing to userspace, as
OpenVPN does with ifconfig/route on FreeBSD and ``ip`` on Linux.  The daemons
call a :class:`NetConfig` so tests can record the calls instead of touching
the host (:class:`RecordingNetConfig`), and so both platforms share one shape.
Every change is remembered and :meth:`NetConfig.undo_all` removes it again:
a daemon that exits leaves no route behind.
"""
from __future__ import annotations

import ipaddress
import logging
import subprocess
import sys
from dataclasses import dataclass, field

from bsd_ovpn.errors import OvpnError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetConfigError(OvpnError):
    """An ifconfig/ip/route command failed; the message has the command and its output."""


@dataclass
class NetConfig:
    """Apply interface settings with ``ip`` (Linux) or ``ifconfig``/``route`` (FreeBSD)."""

    platform: str = field(default_factory=lambda: "freebsd" if sys.platform.startswith("freebsd")
                          else "linux")
    _undo: list[list[str]] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ helpers
    def _run(self, argv: list[str], *, tolerate: tuple[str, ...] = ()) -> bool:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        except FileNotFoundError as exc:
            raise NetConfigError(f"{argv[0]} is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise NetConfigError(f"{' '.join(argv)}: timed out") from exc
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip()
            if any(t in msg for t in tolerate):
                return False
            raise NetConfigError(f"{' '.join(argv)}: {msg}")
        return True

    # ------------------------------------------------------------------ host state
    def ip_forwarding(self) -> bool | None:
        """Whether the host forwards IPv4 (None: cannot tell).

        if_ovpn hands every decrypted packet to the host's IP stack, so this
        -- not the daemon -- decides whether clients reach one another.
        """
        try:
            if self.platform == "linux":
                with open("/proc/sys/net/ipv4/ip_forward") as f:
                    return f.read().strip() != "0"
            res = subprocess.run(["sysctl", "-n", "net.inet.ip.forwarding"],
                                 capture_output=True, text=True, timeout=5)
            return res.stdout.strip() != "0" if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    # ------------------------------------------------------------------ interface
    def set_mtu(self, ifname: str, mtu: int) -> None:
        if self.platform == "linux":
            self._run(["ip", "link", "set", "dev", ifname, "mtu", str(mtu)])
        else:
            self._run(["ifconfig", ifname, "mtu", str(mtu)])

    def add_address(self, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                    peer: ipaddress.IPv4Address | None = None) -> None:
        """``iface`` is address/prefix; ``peer`` makes it point-to-point (net30/p2p)."""
        if self.platform == "linux":
            fam = "-6" if iface.version == 6 else "-4"
            spec = [f"{iface.ip}", "peer", f"{peer}"] if peer is not None else [str(iface)]
            if iface.version == 6:
                spec.append("nodad")          # DAD means nothing on a tunnel; it delays use
            self._run(["ip", fam, "addr", "add", *spec, "dev", ifname],
                      tolerate=("File exists",))
        else:
            if iface.version == 6:
                self._run(["ifconfig", ifname, "inet6", str(iface), "alias"])
            elif peer is not None:
                self._run(["ifconfig", ifname, "inet", str(iface.ip), str(peer), "alias"])
            else:
                self._run(["ifconfig", ifname, "inet", str(iface), "alias"])

    def add_route(self, ifname: str, network: Network, gateway: str | None = None, *,
                  metric: int | None = None) -> None:
        """Route ``network`` into the tunnel, via ``gateway`` (a VPN address) when given."""
        if self.platform == "linux":
            fam = "-6" if network.version == 6 else "-4"
            argv = ["ip", fam, "route", "add", str(network)]
            if gateway is not None:
                argv += ["via", gateway]
            argv += ["dev", ifname]
            if metric is not None:
                argv += ["metric", str(metric)]
            self._run(argv)
            self._undo.append(["ip", fam, "route", "del", *argv[4:]])
        else:
            fam = "-inet6" if network.version == 6 else "-net"
            argv = ["route", "-q", "add", fam, str(network)]
            argv += [gateway] if gateway is not None else ["-interface", ifname]
            self._run(argv)
            self._undo.append(["route", "-q", "delete", *argv[3:]])

    def del_route(self, ifname: str, network: Network, gateway: str | None = None, *,
                  metric: int | None = None) -> None:
        """Remove a route added by :meth:`add_route` (missing routes are not an error)."""
        if self.platform == "linux":
            fam = "-6" if network.version == 6 else "-4"
            argv = ["ip", fam, "route", "del", str(network)]
            if gateway is not None:
                argv += ["via", gateway]
            argv += ["dev", ifname]
            if metric is not None:
                argv += ["metric", str(metric)]
        else:
            fam = "-inet6" if network.version == 6 else "-net"
            argv = ["route", "-q", "delete", fam, str(network)]
            argv += [gateway] if gateway is not None else ["-interface", ifname]
        if argv in self._undo:
            self._undo.remove(argv)
        self._run(argv, tolerate=("No such process", "not in table", "Cannot find device"))

    def undo_all(self) -> None:
        """Remove every route still installed (reverse order); errors are only logged."""
        while self._undo:
            argv = self._undo.pop()
            try:
                self._run(argv, tolerate=("No such process", "not in table",
                                          "Cannot find device"))
            except NetConfigError as exc:
                log.warning("cleanup: %s", exc)


@dataclass
class RecordingNetConfig:
    """Remembers what would be configured, in order (unit tests, dry runs)."""

    calls: list[tuple] = field(default_factory=list)
    forwarding: bool | None = None

    def ip_forwarding(self) -> bool | None:
        return self.forwarding

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self.calls.append(("mtu", ifname, mtu))

    def add_address(self, ifname: str, iface: object, peer: object = None) -> None:
        self.calls.append(("addr", ifname, str(iface), None if peer is None else str(peer)))

    def add_route(self, ifname: str, network: Network, gateway: str | None = None, *,
                  metric: int | None = None) -> None:
        self.calls.append(("route-add", ifname, str(network), gateway, metric))

    def del_route(self, ifname: str, network: Network, gateway: str | None = None, *,
                  metric: int | None = None) -> None:
        self.calls.append(("route-del", ifname, str(network), gateway, metric))

    def undo_all(self) -> None:
        self.calls.append(("undo-all",))
