"""FreeBSD vnet-jail backend of the test bed, driven through a simulated FreeBSD.

The backend cannot run on Linux, so a fake runner plays the part of
jail(8)/jexec/ifconfig: it keeps track of which interfaces are in the host
and in which jail, answers the commands the backend sends, and fails like
FreeBSD when a name is wrong.  The tests check the command lines and that a
lab leaves neither jails nor epairs behind.
"""
from __future__ import annotations

import subprocess
from typing import Sequence

import pytest

from bsd_ovpn.errors import UnsupportedPlatform
from bsd_ovpn.testbed.hosts import HostCommandError, Lab, cleanup_stale, parse_ping
from bsd_ovpn.testbed.jail import JailBackend, JailHost, parse_ifconfig_addresses


class FakeFreeBSD:
    """Enough of FreeBSD's jail/ifconfig behaviour to exercise the backend."""

    def __init__(self, vimage: str = "1") -> None:
        self.vimage = vimage
        self.calls: list[list[str]] = []
        self.host_ifs: set[str] = {"lo0", "em0"}
        self.jails: dict[str, set[str]] = {}
        self.peer: dict[str, str] = {}
        self.next_epair = 3
        self.kmods: list[str] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
                 input: str | None = None, host: str = "-", env: object = None,
                 ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        rc, out, err = self._do(argv)
        if check and rc != 0:
            raise HostCommandError(host, argv, rc, out, err)
        return subprocess.CompletedProcess(argv, rc, out, err)

    def _rename(self, ifs: set[str], old: str, new: str) -> None:
        ifs.discard(old)
        ifs.add(new)
        if old in self.peer:  # epairs: keep the pairing under the new name
            p = self.peer.pop(old)
            self.peer[new] = p
            self.peer[p] = new

    def _do(self, argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["sysctl", "-n"]:
            return 0, self.vimage + "\n", ""
        if argv[:2] == ["kldload", "-n"]:
            self.kmods.append(argv[2])
            return 0, "", ""
        if argv[:2] == ["jail", "-c"]:
            name = argv[2].split("=", 1)[1]
            self.jails[name] = {"lo0"}
            return 0, "", ""
        if argv[:2] == ["jail", "-r"]:
            if argv[2] not in self.jails:
                return 1, "", f"jail: \"{argv[2]}\" not found\n"
            ifs = self.jails.pop(argv[2])
            self.host_ifs |= {i for i in ifs if i in self.peer}  # moved-in epairs go home
            return 0, "", ""
        if argv == ["jls", "name"]:
            return 0, "".join(f"{j}\n" for j in self.jails), ""
        if argv[0] == "jexec":
            jail, cmd = argv[1], argv[2:]
            if jail not in self.jails:
                return 1, "", f"jexec: jail \"{jail}\" not found\n"
            return self._in_jail(self.jails[jail], cmd)
        if argv[0] == "ifconfig":
            return self._ifconfig(self.host_ifs, argv[1:])
        return 127, "", f"fake: unknown command {argv}\n"

    def _ifconfig(self, ifs: set[str], args: list[str]) -> tuple[int, str, str]:
        if args == ["epair", "create"]:
            a, b = f"epair{self.next_epair}a", f"epair{self.next_epair}b"
            self.next_epair += 1
            ifs |= {a, b}
            self.peer[a], self.peer[b] = b, a
            return 0, a + "\n", ""
        if args == ["-l"]:
            return 0, " ".join(sorted(ifs)) + "\n", ""
        name = args[0]
        if name not in ifs:
            return 1, "", f"ifconfig: interface {name} does not exist\n"
        if args[1:2] == ["name"]:
            self._rename(ifs, name, args[2])
            return 0, args[2] + "\n", ""
        if args[1:2] == ["vnet"]:
            if args[2] not in self.jails:
                return 1, "", "ifconfig: SIOCSIFVNET: Invalid argument\n"
            ifs.discard(name)
            self.jails[args[2]].add(name)
            return 0, "", ""
        if args[1:2] == ["destroy"]:
            ifs.discard(name)
            ifs.discard(self.peer.get(name, ""))
            return 0, "", ""
        return 0, "", ""

    def _in_jail(self, ifs: set[str], cmd: list[str]) -> tuple[int, str, str]:
        if cmd[0] == "ifconfig":
            if cmd[1:] == ["bridge", "create"]:
                ifs.add("bridge0")  # cloned inside the vnet: dies with the jail
                return 0, "bridge0\n", ""
            if cmd[1] == "-a":
                return 0, ("b1234x0a: flags=8843<UP> metric 0 mtu 1500\n"
                           "\tinet 192.0.2.1 netmask 0xffffff00 broadcast 192.0.2.255\n"
                           "\tinet6 fe80::1%b1234x0a prefixlen 64 scopeid 0x2\n"), ""
            return self._ifconfig(ifs, cmd[1:])
        if cmd[0] in ("sysctl", "route"):
            return 0, "", ""
        if cmd[0] in ("ping", "ping6"):
            return 0, ("--- 192.0.2.2 ping statistics ---\n"
                       "2 packets transmitted, 2 packets received, 0.0% packet loss\n"
                       "round-trip min/avg/max/stddev = 0.041/0.052/0.063/0.011 ms\n"), ""
        return 127, "", f"fake jexec: unknown {cmd}\n"


def test_lab_on_fake_freebsd_builds_and_removes_everything() -> None:
    fb = FakeFreeBSD()
    lab = Lab(backend=JailBackend(fb))
    a, b = lab.host("server"), lab.host("client")
    assert isinstance(a, JailHost)
    if_a, if_b = lab.link(a, b, ["192.0.2.1/24", "2001:db8:2::1/64"], "192.0.2.2/24", mtu=1400)
    assert if_a == f"{lab.ifprefix}0a" and if_b == f"{lab.ifprefix}0b"
    calls = fb.calls
    assert ["kldload", "-n", "if_epair"] in calls
    assert ["jail", "-c", f"name={a.ident}", "host.hostname=server", "path=/", "vnet",
            "persist"] in calls
    assert ["ifconfig", "epair3a", "name", if_a] in calls
    assert ["ifconfig", "epair3b", "name", if_b] in calls
    assert ["ifconfig", if_a, "vnet", a.ident] in calls
    assert ["ifconfig", if_b, "vnet", b.ident] in calls
    assert ["jexec", a.ident, "ifconfig", if_a, "mtu", "1400", "up"] in calls
    assert ["jexec", a.ident, "ifconfig", if_a, "inet", "192.0.2.1/24", "alias"] in calls
    assert ["jexec", a.ident, "ifconfig", if_a, "inet6", "2001:db8:2::1/64", "alias",
            "no_dad"] in calls
    assert ["jexec", a.ident, "sysctl", "net.inet.ip.forwarding=1", "net.inet6.ip6.forwarding=1",
            "net.inet6.ip6.dad_count=0"] in calls
    assert if_a in fb.jails[a.ident] and if_a not in fb.host_ifs
    assert a.interfaces() == sorted(fb.jails[a.ident])

    a.add_route("default", via="192.0.2.2")
    b.add_route("2001:db8:100::/64", dev=if_b)
    assert ["jexec", a.ident, "route", "-n", "add", "-inet", "default", "192.0.2.2"] in calls
    assert ["jexec", b.ident, "route", "-n", "add", "-inet6", "2001:db8:100::/64",
            "-interface", if_b] in calls

    res = b.ping("192.0.2.1", count=2, timeout=3)
    assert res and res.received == 2 and res.rtt_avg_ms == pytest.approx(0.052)
    assert calls[-1] == ["jexec", b.ident, "ping", "-n", "-q", "-c", "2", "-t", "3", "-i",
                         "0.2", "192.0.2.1"]
    b.ping("2001:db8:100::1", timeout=1)
    assert calls[-1][2] == "ping6"

    lab.close()
    assert fb.jails == {}
    assert fb.host_ifs == {"lo0", "em0"}  # epairs came back and were destroyed
    assert ["jail", "-r", a.ident] in calls and ["ifconfig", if_a, "destroy"] in calls


def test_segment_creates_bridge_in_hub_jail() -> None:
    fb = FakeFreeBSD()
    with Lab(backend=JailBackend(fb)) as lab:
        hosts = [lab.host(n) for n in ("s", "c1", "c2")]
        names = lab.segment(hosts, ["192.0.2.1/24", "192.0.2.11/24", "192.0.2.12/24"])
        hub = lab.hosts["hub0"]
        assert len(names) == 3 and all(n.endswith("a") for n in names)
        ports = [f"{lab.ifprefix}{i}b" for i in range(3)]
        br = f"{lab.ifprefix}br0"
        assert ["kldload", "-n", "if_bridge"] in fb.calls
        assert ["jexec", hub.ident, "ifconfig", "bridge0", "name", br] in fb.calls
        assert ["jexec", hub.ident, "ifconfig", br, "addm", ports[0], "addm", ports[1],
                "addm", ports[2], "up"] in fb.calls
    assert fb.jails == {} and fb.host_ifs == {"lo0", "em0"}


def test_no_vimage_is_unsupported() -> None:
    with pytest.raises(UnsupportedPlatform, match="VIMAGE"):
        Lab(backend=JailBackend(FakeFreeBSD(vimage="0"))).host("a")


def test_failed_vnet_move_still_cleans_up() -> None:
    fb = FakeFreeBSD()
    lab = Lab(backend=JailBackend(fb))
    a = lab.host("a")
    b = lab.host("b")
    del fb.jails[b.ident]  # jail vanished behind our back: the move fails
    with pytest.raises(HostCommandError, match="SIOCSIFVNET"):
        lab.link(a, b)
    with pytest.raises(Exception, match="not found"):
        lab.close()  # reports the jail it could not remove ...
    assert fb.jails == {}
    assert fb.host_ifs == {"lo0", "em0"}  # ... but still destroyed the epair


def test_cleanup_stale_removes_dead_runs_jails_and_epairs() -> None:
    fb = FakeFreeBSD()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"bovpn-{dead.pid}-q9q9-server"
    fb.jails[stale] = {"lo0"}
    fb.host_ifs |= {"bq9q90a", "bq9q90b"}
    fb.peer.update({"bq9q90a": "bq9q90b", "bq9q90b": "bq9q90a"})
    with Lab(backend=JailBackend(fb)) as live:
        live.host("alive")
        removed = cleanup_stale(backend=JailBackend(fb))
        assert removed == [stale]
        assert live.hosts["alive"].ident in fb.jails
    assert fb.host_ifs == {"lo0", "em0"}


def test_parse_ifconfig_addresses() -> None:
    text = ("epair0a: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> metric 0 mtu 1500\n"
            "\tinet 192.0.2.1 netmask 0xffffff00 broadcast 192.0.2.255\n"
            "\tinet6 fe80::1%epair0a prefixlen 64 scopeid 0x2\n"
            "\tinet6 2001:db8:2::1 prefixlen 64\n"
            "\tinet 198.51.100.1 netmask 0xffffff80\n")
    assert parse_ifconfig_addresses(text) == ["192.0.2.1/24", "fe80::1/64", "2001:db8:2::1/64",
                                              "198.51.100.1/25"]


def test_parse_ping_linux_and_freebsd() -> None:
    linux = ("--- 192.0.2.1 ping statistics ---\n"
             "3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n"
             "rtt min/avg/max/mdev = 0.050/0.075/0.100/0.025 ms\n")
    r = parse_ping("192.0.2.1", 1, linux, 3)
    assert (r.transmitted, r.received, bool(r)) == (3, 2, False)
    assert r.loss == pytest.approx(1 / 3) and r.rtt_avg_ms == pytest.approx(0.075)
    bsd = "1 packets transmitted, 1 packets received, 0.0% packet loss\n"
    assert parse_ping("192.0.2.1", 0, bsd, 1)
    assert not parse_ping("192.0.2.1", 0, "garbage", 1)
