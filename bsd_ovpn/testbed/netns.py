"""Linux backend of the test bed: network namespaces joined by veth pairs.

Everything goes through iproute2 (``ip netns``, ``ip -n``) so no extra Python
dependency is needed and a failing step prints the same error a human would
see.  veth ends are created directly inside their target namespaces
(``ip link add … netns A type veth peer … netns B``), so the root namespace
never holds our interfaces, and deleting a namespace after its processes are
gone removes its links too.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from typing import Sequence

from bsd_ovpn.testbed.hosts import (
    Backend, Host, HostCommandError, Runner, TestbedError, check_ifname, ip_version,
)

#: Applied in every new namespace.  accept_dad=0 makes IPv6 addresses usable
#: at once (tentative addresses cannot be bound or pinged from); forwarding
#: lets a host act as router in multi-hop scenarios.
NAMESPACE_SYSCTLS: dict[str, str] = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}


class NetnsHost(Host):
    """A Linux network namespace named ``ident``."""

    def __init__(self, name: str, ident: str, runner: Runner | None = None) -> None:
        super().__init__(name, ident, runner)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ident, *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> args`` (no exec into the namespace needed)."""
        self._check_open()
        return self._runner(["ip", "-n", self.ident, *args], timeout=30.0, check=check,
                            host=self.name)

    def sysctl(self, values: dict[str, str]) -> None:
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def add_address(self, ifname: str, cidr: str) -> None:
        check_ifname(ifname)
        extra = ["nodad"] if ip_version(cidr) == 6 else []
        self.ip("addr", "add", cidr, "dev", ifname, *extra)

    def link_up(self, ifname: str, *, mtu: int | None = None) -> None:
        check_ifname(ifname)
        self.ip("link", "set", "dev", ifname, *(["mtu", str(mtu)] if mtu else []), "up")

    def add_route(self, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        if via is None and dev is None:
            raise TestbedError("add_route needs via= or dev=")
        fam = ip_version(via) if via else (6 if ":" in dst else 4)
        if dst != "default":
            ip_version(dst)
        argv = [f"-{fam}", "route", "add", dst]
        if via:
            argv += ["via", via]
        if dev:
            argv += ["dev", check_ifname(dev)]
        self.ip(*argv)

    def interfaces(self) -> list[str]:
        out = self.ip("-j", "link", "show").stdout
        return [entry["ifname"] for entry in json.loads(out or "[]")]

    def addresses(self, ifname: str | None = None) -> list[str]:
        args = ["-j", "addr", "show"] + (["dev", check_ifname(ifname)] if ifname else [])
        out = self.ip(*args).stdout
        return [f"{a['local']}/{a['prefixlen']}"
                for entry in json.loads(out or "[]") for a in entry.get("addr_info", [])]

    def ping_argv(self, addr: str, count: int, timeout: float, interval: float,
                  size: int | None) -> list[str]:
        argv = ["ping", "-n", "-q", f"-{ip_version(addr)}", "-c", str(count),
                "-w", str(max(1, math.ceil(timeout))), "-i", f"{interval:g}"]
        if size is not None:
            argv += ["-s", str(size)]
        return argv + [addr]

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        proc = self._runner(["ip", "netns", "pids", self.ident], timeout=10.0, check=False,
                            host=self.name)
        return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._stop_procs()
        finally:
            self.closed = True
            _destroy_namespace(self.ident, self._runner)


def _destroy_namespace(ident: str, runner: Runner) -> None:
    """SIGKILL everything left in the namespace, wait for it to go, then delete it."""
    deadline = time.monotonic() + 10.0
    while True:
        proc = runner(["ip", "netns", "pids", ident], timeout=10.0, check=False, host=ident)
        pids = [int(tok) for tok in proc.stdout.split() if tok.isdigit()]
        if not pids or proc.returncode != 0:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise TestbedError(f"processes {pids} in namespace {ident} would not die")
        time.sleep(0.05)
    res = runner(["ip", "netns", "del", ident], timeout=30.0, check=False, host=ident)
    if res.returncode != 0 and ident in _list_namespaces(runner):
        raise HostCommandError(ident, ["ip", "netns", "del", ident], res.returncode,
                               res.stdout, res.stderr)


def _list_namespaces(runner: Runner) -> list[str]:
    out = runner(["ip", "netns", "list"], timeout=10.0, check=True, host="-").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class NetnsBackend(Backend):
    """Hosts are namespaces, links are veth pairs, segments are Linux bridges."""

    def create_host(self, name: str, ident: str) -> NetnsHost:
        self.runner(["ip", "netns", "add", ident], timeout=30.0, check=True, host=name)
        host = NetnsHost(name, ident, self.runner)
        try:
            host.link_up("lo")
            host.sysctl(NAMESPACE_SYSCTLS)
        except BaseException:
            host.close()
            raise
        return host

    def create_link(self, a: Host, b: Host, name_a: str, name_b: str,
                    mtu: int | None = None) -> None:
        mtu_args = ["mtu", str(mtu)] if mtu else []
        self.runner(["ip", "link", "add", check_ifname(name_a), *mtu_args, "netns", a.ident,
                     "type", "veth", "peer", "name", check_ifname(name_b), *mtu_args,
                     "netns", b.ident], timeout=30.0, check=True, host=a.name)
        a.link_up(name_a)
        b.link_up(name_b)

    def create_bridge(self, hub: Host, name: str, ports: Sequence[str]) -> None:
        assert isinstance(hub, NetnsHost)
        hub.ip("link", "add", check_ifname(name), "type", "bridge",
               "forward_delay", "0", "stp_state", "0")
        for port in ports:
            hub.ip("link", "set", "dev", check_ifname(port), "master", name)
        hub.link_up(name)

    def list_idents(self) -> list[str]:
        return _list_namespaces(self.runner)

    def destroy_ident(self, ident: str) -> None:
        _destroy_namespace(ident, self.runner)
