"""FreeBSD backend of the test bed: vnet jails joined by epair(4) interfaces.

Follows the shape of FreeBSD's own network test helpers
(tests/sys/common/vnet.subr): hosts are persistent vnet jails sharing the
host's file system, cables are epair interfaces created in the host vnet and
moved into jails with ``ifconfig X vnet J``, bridges are if_bridge clones.
Unlike vnet.subr we rename every epair end to a per-run name before moving
it, so concurrent runs never collide and leftovers of killed runs can be
found by name.

When a vnet jail is removed, interfaces that were moved into it go back to
the host vnet; so teardown is "``jail -r`` every jail, then destroy every
epair we created" (destroying one end of an epair destroys both).

Every command goes through the injectable runner, which is how the unit
tests check the exact command lines on Linux.
"""
from __future__ import annotations

import ipaddress
import math
import re
import time
from typing import Sequence

from bsd_ovpn.errors import UnsupportedPlatform
from bsd_ovpn.testbed.hosts import (
    Backend, Host, Runner, TestbedError, check_ifname, ip_version,
)

#: Per-vnet sysctls set in each new jail (DAD off so IPv6 works at once).
JAIL_SYSCTLS: dict[str, str] = {
    "net.inet.ip.forwarding": "1",
    "net.inet6.ip6.forwarding": "1",
    "net.inet6.ip6.dad_count": "0",
}

_NETMASK_HEX = re.compile(r"^0x([0-9a-fA-F]{8})$")


def ensure_kmod(runner: Runner, module: str) -> None:
    """``kldload -n module``: load a kernel module unless it is already there."""
    if not re.fullmatch(r"[a-z_0-9]+", module):
        raise TestbedError(f"bad kernel module name {module!r}")
    runner(["kldload", "-n", module], timeout=30.0, check=True, host="-")


class JailHost(Host):
    """A persistent vnet jail named ``ident``."""

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["jexec", self.ident, *argv]

    def _x(self, *argv: str) -> str:
        return self.run(list(argv)).stdout

    def sysctl(self, values: dict[str, str]) -> None:
        self.run(["sysctl", *(f"{k}={v}" for k, v in values.items())])

    def add_address(self, ifname: str, cidr: str) -> None:
        check_ifname(ifname)
        iface = ipaddress.ip_interface(cidr)
        if iface.version == 6:
            self._x("ifconfig", ifname, "inet6", str(iface), "alias", "no_dad")
        else:
            self._x("ifconfig", ifname, "inet", str(iface), "alias")

    def link_up(self, ifname: str, *, mtu: int | None = None) -> None:
        check_ifname(ifname)
        self._x("ifconfig", ifname, *(["mtu", str(mtu)] if mtu else []), "up")

    def add_route(self, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        if via is None and dev is None:
            raise TestbedError("add_route needs via= or dev=")
        fam = ip_version(via) if via else (6 if ":" in dst else 4)
        if dst != "default":
            ip_version(dst)
        argv = ["route", "-n", "add", "-inet6" if fam == 6 else "-inet", dst]
        if via:
            argv.append(via)
        else:
            argv += ["-interface", check_ifname(dev or "")]
        self._x(*argv)

    def interfaces(self) -> list[str]:
        return self._x("ifconfig", "-l").split()

    def addresses(self, ifname: str | None = None) -> list[str]:
        out = self._x("ifconfig", check_ifname(ifname) if ifname else "-a")
        return parse_ifconfig_addresses(out)

    def ping_argv(self, addr: str, count: int, timeout: float, interval: float,
                  size: int | None) -> list[str]:
        prog = "ping6" if ip_version(addr) == 6 else "ping"
        argv = [prog, "-n", "-q", "-c", str(count), "-t", str(max(1, math.ceil(timeout))),
                "-i", f"{interval:g}"]
        if size is not None:
            argv += ["-s", str(size)]
        return argv + [addr]

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._stop_procs()
        finally:
            self.closed = True
            # jail -r kills every process left in the jail, then removes it.
            self._runner(["jail", "-r", self.ident], timeout=60.0, check=True, host=self.name)


def parse_ifconfig_addresses(text: str) -> list[str]:
    """CIDRs from FreeBSD ``ifconfig`` output (inet ... netmask 0x..., inet6 ... prefixlen N)."""
    out = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) >= 4 and tok[0] == "inet" and tok[2] == "netmask":
            m = _NETMASK_HEX.match(tok[3])
            plen = bin(int(m.group(1), 16)).count("1") if m else 32
            out.append(f"{tok[1]}/{plen}")
        elif len(tok) >= 4 and tok[0] == "inet6" and "prefixlen" in tok:
            plen = tok[tok.index("prefixlen") + 1]
            out.append(f"{tok[1].split('%')[0]}/{plen}")
    return out


class JailBackend(Backend):
    """Hosts are vnet jails, links are renamed epairs, segments are if_bridge in a hub jail."""

    def __init__(self, runner: Runner | None = None) -> None:
        super().__init__(runner)
        self.epairs: list[str] = []       # one end of each epair we created (host names)
        self._checked = False

    def _preflight(self) -> None:
        if self._checked:
            return
        vimage = self.runner(["sysctl", "-n", "kern.features.vimage"], timeout=10.0,
                             check=False, host="-").stdout.strip()
        if vimage != "1":
            raise UnsupportedPlatform("vnet jails need a kernel with VIMAGE "
                                      "(sysctl kern.features.vimage is not 1)")
        ensure_kmod(self.runner, "if_epair")
        self._checked = True

    def create_host(self, name: str, ident: str) -> JailHost:
        self._preflight()
        self.runner(["jail", "-c", f"name={ident}", f"host.hostname={name}", "path=/",
                     "vnet", "persist"], timeout=60.0, check=True, host=name)
        host = JailHost(name, ident, self.runner)
        try:
            host.run(["ifconfig", "lo0", "inet", "127.0.0.1/8", "up"])
            host.sysctl(JAIL_SYSCTLS)
        except BaseException:
            host.close()
            raise
        return host

    def create_link(self, a: Host, b: Host, name_a: str, name_b: str,
                    mtu: int | None = None) -> None:
        check_ifname(name_a)
        check_ifname(name_b)
        created = self.runner(["ifconfig", "epair", "create"], timeout=30.0, check=True,
                              host="-").stdout.strip()
        if not re.fullmatch(r"epair\d+a", created):
            raise TestbedError(f"ifconfig epair create printed {created!r}, expected epairNa")
        other = created[:-1] + "b"
        self.epairs.append(created)  # tracked from birth, so a failed rename cannot leak it
        self.runner(["ifconfig", created, "name", name_a], timeout=30.0, check=True, host="-")
        self.epairs[-1] = name_a
        self.runner(["ifconfig", other, "name", name_b], timeout=30.0, check=True, host="-")
        self.runner(["ifconfig", name_a, "vnet", a.ident], timeout=30.0, check=True, host=a.name)
        self.runner(["ifconfig", name_b, "vnet", b.ident], timeout=30.0, check=True, host=b.name)
        a.link_up(name_a, mtu=mtu)
        b.link_up(name_b, mtu=mtu)

    def create_bridge(self, hub: Host, name: str, ports: Sequence[str]) -> None:
        check_ifname(name)
        ensure_kmod(self.runner, "if_bridge")
        created = hub.run(["ifconfig", "bridge", "create"]).stdout.strip()
        if not re.fullmatch(r"bridge\d+", created):
            raise TestbedError(f"ifconfig bridge create printed {created!r}, expected bridgeN")
        hub.run(["ifconfig", created, "name", name])
        argv = ["ifconfig", name]
        for port in ports:
            argv += ["addm", check_ifname(port)]
        hub.run(argv + ["up"])

    def load_if_ovpn(self) -> None:
        """Load if_ovpn(4) (done from the host: jails may not load modules)."""
        ensure_kmod(self.runner, "if_ovpn")

    def after_close(self, lab: object) -> None:
        """Destroy our epairs once the removed jails have handed them back."""
        errors = []
        for ifname in self.epairs:
            if not self._wait_in_host(ifname):
                continue  # already gone with its pair
            res = self.runner(["ifconfig", ifname, "destroy"], timeout=30.0, check=False, host="-")
            if res.returncode != 0 and ifname in self._host_interfaces():
                errors.append(f"{ifname}: {res.stderr.strip()}")
        self.epairs.clear()
        if errors:
            raise TestbedError("could not destroy epairs: " + "; ".join(errors))

    def _host_interfaces(self) -> list[str]:
        return self.runner(["ifconfig", "-l"], timeout=10.0, check=True, host="-").stdout.split()

    def _wait_in_host(self, ifname: str, timeout: float = 5.0) -> bool:
        """vnet teardown is asynchronous: wait until the interface is back in the host."""
        deadline = time.monotonic() + timeout
        while True:
            if ifname in self._host_interfaces():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def list_idents(self) -> list[str]:
        out = self.runner(["jls", "name"], timeout=10.0, check=True, host="-").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def destroy_ident(self, ident: str) -> None:
        """Remove a stale jail and the epairs of its run (names ``b<tag>...``)."""
        self.runner(["jail", "-r", ident], timeout=60.0, check=False, host=ident)
        parts = ident.split("-")
        if len(parts) < 4:
            return
        rx = re.compile(rf"b{re.escape(parts[2])}\d+[ab]")
        for _ in range(3):  # interfaces come back from the dying vnet asynchronously
            for ifname in self._host_interfaces():
                if rx.fullmatch(ifname):
                    self.runner(["ifconfig", ifname, "destroy"], timeout=30.0, check=False,
                                host="-")
            time.sleep(0.2)
